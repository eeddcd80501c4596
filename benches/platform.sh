#!/usr/bin/env bash
# The delivery platform end to end: orders placed per second with the whole saga (reserve →
# assign → commit → confirm, events through the outbox to notifications), and PlaceOrder
# latency at fixed rates, next to a bare echo through the same server in the same run.
#
# Release build; every service in one `waybill serve` process against the `waybill dev up`
# cluster (durable: fsync and synchronous_commit on, a streaming replica); load from
# `waybill loadgen` on the same machine (open loop, latency from each call's scheduled start).
#
# DETAIL=1 also prints each table's row operations per order.
# CPU=1 also prints each process's CPU per order (primary backends, WAL sender, the replica's
# receiver and replay, waybill serve, the load generator), read from /proc over the middle of
# the run (needs python3).
# Usage: benches/platform.sh [SECONDS] [RATE…]   (default: 20 s at 200 500 1000 1200 1500)
# BIN=PATH runs that waybill binary instead of building this checkout's (to compare with
# another commit's build in the same session).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
shift || true
rates=("$@")
[ ${#rates[@]} -eq 0 ] && rates=(200 500 1000 1200 1500)

scripts/prereqs postgres >/dev/null
if [ -z "${BIN:-}" ]; then
  cargo build --locked --release -p waybill 2>/dev/null
fi
waybill=${BIN:-target/release/waybill}
"$waybill" dev up >/dev/null

status=$("$waybill" dev status)
primary=$(echo "$status" | awk '/^primary/ {print $3}')
replica=$(echo "$status" | awk '/^replica/ {print $3}')
listen=127.0.0.1:50071
addr="http://$listen"
log=$(mktemp)
serve=""
cleanup() { [ -n "$serve" ] && { kill -TERM "$serve" 2>/dev/null; wait "$serve" 2>/dev/null; }; rm -f "$log" "${cpu:-}" "${cpu:-}.a" "${cpu:-}.b"; }
trap cleanup EXIT

# Each run gets a database of its own on the dev cluster (the replica follows it), so sagas
# or events left over by a previous run do not load the next one.
fresh_server() { # database
  local db=$1
  psql "$primary" -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
  # Its errors show: a failed migration here would otherwise end the script without a word.
  "$waybill" migrate --primary-url "${primary%/*}/$db" >/dev/null
  "$waybill" serve --services orders,inventory,delivery,notifications,echo --listen "$listen" \
    --primary-url "${primary%/*}/$db" --replica-url "${replica%/*}/$db" \
    --admin-listen 127.0.0.1:0 >/dev/null 2>"$log" &
  serve=$!
  for _ in $(seq 100); do grep -q "serving" "$log" && break; sleep 0.1; done
}
stop_server() {
  kill -TERM "$serve" 2>/dev/null; wait "$serve" 2>/dev/null; serve=""
}

cpu=$(mktemp)
# Every process's CPU time so far, in clock ticks, with its command line.
cpu_snapshot() {
  python3 -c '
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read()
        cmd = " ".join(open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").replace("\0", " ").split())
    except OSError:
        continue
    fields = stat.rsplit(")", 1)[1].split()
    print(pid, int(fields[11]) + int(fields[12]), cmd)
'
}
# CPU per order stored between two snapshots, by kind of process.
cpu_per_order() { # before after seconds database run_seconds
  local orders
  orders=$(psql "$4" -Atc "SELECT count(*) FROM orders.orders")
  python3 - "$1" "$2" "$3" "$orders" "$5" <<'PY'
import os, re, sys
def load(path):
    out = {}
    for line in open(path):
        pid, ticks, *cmd = line.rstrip("\n").split(" ", 2)
        out[pid] = (int(ticks), cmd[0] if cmd else "")
    return out
before, after = load(sys.argv[1]), load(sys.argv[2])
window, orders, run = float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
rate = orders / run  # orders per second over the run
hz = os.sysconf("SC_CLK_TCK")
kinds = {}
for pid, (ticks, cmd) in after.items():
    if pid not in before or ticks <= before[pid][0]:
        continue
    title = cmd[len("postgres: "):] if cmd.startswith("postgres: ") else None
    if title is None:
        kind = ("waybill serve" if " serve --services" in cmd else
                "load generator" if " loadgen " in cmd else "other processes")
    elif "walsender" in title: kind = "primary: WAL sender"
    elif "walreceiver" in title: kind = "replica: WAL receiver"
    elif "startup" in title: kind = "replica: replay (startup)"
    elif re.search(r"\d+\.\d+\.\d+\.\d+\(\d+\)", title): kind = "primary: backends"
    else: kind = "postgres: other"
    kinds[kind] = kinds.get(kind, 0) + ticks - before[pid][0]
total = sum(kinds.values())
print(f"  CPU per order over {window:.0f} s mid-run, at {rate:.0f} orders/s:")
for kind, ticks in sorted(kinds.items(), key=lambda k: -k[1]):
    seconds = ticks / hz / window
    print(f"    {kind:28s} {seconds:5.2f} cores  {1000 * seconds / rate:5.2f} ms/order")
print(f"    {'all':28s} {total / hz / window:5.2f} cores  {1000 * total / hz / window / rate:5.2f} ms/order")
PY
}

echo "machine: $(nproc) cores, $(uname -r); $(date -u +%FT%TZ)"
run() { # scenario rate
  fresh_server "bench_${1//-/_}_$2"
  "$waybill" loadgen --addr "$addr" --scenario "$1" --rate "$2" --duration "${seconds}s" \
    --connections 4 --timeout 5s --seed 2>/dev/null | sed "s/^/  /" &
  local loadgen=$!
  if [ -n "${CPU:-}" ] && [ "$1" = place-orders ]; then
    # The middle of the run: seeding and warm-up before it, the last calls' drain after.
    local window=$((seconds > 8 ? seconds - 6 : 2))
    sleep 3; cpu_snapshot >"$cpu.a"; sleep "$window"; cpu_snapshot >"$cpu.b"
  fi
  wait "$loadgen"
  stop_server
  if [ -n "${CPU:-}" ] && [ "$1" = place-orders ]; then
    cpu_per_order "$cpu.a" "$cpu.b" "$window" "${primary%/*}/bench_${1//-/_}_$2" "$seconds"
  fi
  if [ "$1" = place-orders ]; then
    # What each order cost the database: commits and rows, per order stored (statistics
    # arrive within a second of the server's exit).
    sleep 1.5
    psql "${primary%/*}/bench_${1//-/_}_$2" -At <<'SQL' | sed "s/^/  /"
SELECT format('per order (%s): %s commits, %s rows inserted, %s updated, %s deleted',
              o.n, round(d.xact_commit::numeric / o.n, 1), round(d.tup_inserted::numeric / o.n, 1),
              round(d.tup_updated::numeric / o.n, 1), round(d.tup_deleted::numeric / o.n, 1))
FROM pg_stat_database d, (SELECT greatest(count(*), 1) AS n FROM orders.orders) o
WHERE d.datname = current_database();
-- Whether the event path kept up: each confirmed order makes 2 notifications.
SELECT format('notifications recorded by the end: %s per order (2 when the consumer keeps up)',
              round(count(*)::numeric / (SELECT greatest(count(*), 1) FROM orders.orders), 2))
FROM notifications.notifications;
SQL
    if [ -n "${DETAIL:-}" ]; then
      # Row operations per order, by table: where the writes go.
      psql "${primary%/*}/bench_${1//-/_}_$2" -At <<'SQL' | sed "s/^/    /"
WITH o AS (SELECT greatest(count(*), 1)::numeric AS n FROM orders.orders)
SELECT format('%-28s inserted %s, updated %s (HOT %s), deleted %s', schemaname || '.' || relname,
              round(n_tup_ins / o.n, 2), round(n_tup_upd / o.n, 2),
              round(n_tup_hot_upd / o.n, 2), round(n_tup_del / o.n, 2))
FROM pg_stat_user_tables, o
WHERE n_tup_ins + n_tup_upd + n_tup_del > 0
ORDER BY schemaname, relname;
SQL
    fi
  fi
  psql "$primary" -qc "DROP DATABASE IF EXISTS bench_${1//-/_}_$2" >/dev/null 2>&1 || true
}
echo "--- echo (bare server path, no database)"
run echo 1000
for rate in "${rates[@]}"; do
  echo "--- place-orders at $rate/s"
  run place-orders "$rate"
done
