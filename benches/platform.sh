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
"$waybill" migrate --services orders,inventory,delivery,notifications >/dev/null 2>&1

status=$("$waybill" dev status)
primary=$(echo "$status" | awk '/^primary/ {print $3}')
replica=$(echo "$status" | awk '/^replica/ {print $3}')
listen=127.0.0.1:50071
addr="http://$listen"
log=$(mktemp)
serve=""
cleanup() { [ -n "$serve" ] && { kill -TERM "$serve" 2>/dev/null; wait "$serve" 2>/dev/null; }; rm -f "$log"; }
trap cleanup EXIT

# Each run gets a database of its own on the dev cluster (the replica follows it), so sagas
# or events left over by a previous run do not load the next one.
fresh_server() { # database
  local db=$1
  psql "$primary" -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
  "$waybill" migrate --primary-url "${primary%/*}/$db" >/dev/null 2>&1
  "$waybill" serve --services orders,inventory,delivery,notifications,echo --listen "$listen" \
    --primary-url "${primary%/*}/$db" --replica-url "${replica%/*}/$db" \
    --admin-listen 127.0.0.1:0 >/dev/null 2>"$log" &
  serve=$!
  for _ in $(seq 100); do grep -q "serving" "$log" && break; sleep 0.1; done
}
stop_server() {
  kill -TERM "$serve" 2>/dev/null; wait "$serve" 2>/dev/null; serve=""
}

echo "machine: $(nproc) cores, $(uname -r); $(date -u +%FT%TZ)"
run() { # scenario rate
  fresh_server "bench_${1//-/_}_$2"
  "$waybill" loadgen --addr "$addr" --scenario "$1" --rate "$2" --duration "${seconds}s" \
    --connections 4 --timeout 5s --seed 2>/dev/null | sed "s/^/  /"
  stop_server
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
