#!/usr/bin/env bash
# Executed commands per second with a trivial handler: a backlog of 30,000 ACCEPTED commands
# spread over USERS users, drained by one `waybill serve --services commands --command-dry-run`
# process (workers claim, "run" and record each command, audit rows and notifications
# included, without calling a service), timed until none is open.
#
# QUEUE=postgres (default): the backlog is made by SQL; workers find it by scanning the log.
# QUEUE=nats: a nats-server of this script's own; the backlog is submitted through
# SubmitCommand by a process with workers off (so every command has its JetStream dispatch),
# then a worker process with `--command-queue nats` drains it.
#
# Release build, against the `waybill dev up` cluster (durable commits, a streaming replica).
# Usage: [QUEUE=nats] [DRAIN_LOG=file] [BIN=PATH] benches/commands-drain.sh [USERS] [serve flags…]
#   (default: 10000 users; DRAIN_LOG keeps the draining process's log; BIN runs that waybill
#   binary instead of building this checkout's, to compare two builds in one session)
set -euo pipefail
cd "$(dirname "$0")/.."
users=${1:-10000}
shift || true
queue=${QUEUE:-postgres}
total=30000

scripts/prereqs postgres >/dev/null
[ "$queue" = nats ] && scripts/prereqs nats >/dev/null
if [ -z "${BIN:-}" ]; then
  cargo build --locked --release -p waybill 2>/dev/null
fi
waybill=${BIN:-target/release/waybill}
"$waybill" dev up >/dev/null
status=$("$waybill" dev status)
primary=$(echo "$status" | awk '/^primary/ {print $3}')
replica=$(echo "$status" | awk '/^replica/ {print $3}')
db=bench_commands_drain
url="${primary%/*}/$db"
serve=""
nats=""
natsdir=""
# `|| true` after each wait: a process stopped by a signal makes `wait` fail, and under
# `set -e` that ended the cleanup there (the script exited 1, the NATS folder stayed).
cleanup() {
  [ -n "$serve" ] && { kill -TERM "$serve" 2>/dev/null; wait "$serve" 2>/dev/null || true; }
  [ -n "$nats" ] && { kill "$nats" 2>/dev/null; wait "$nats" 2>/dev/null || true; }
  [ -n "$natsdir" ] && rm -rf "$natsdir"
  psql "$primary" -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
}
trap cleanup EXIT

psql "$primary" -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null 2>&1
"$waybill" migrate --services commands --primary-url "$url" >/dev/null
serve_flags=(--primary-url "$url" --replica-url "${replica%/*}/$db" --admin-listen 127.0.0.1:0)
if [ "$queue" = nats ]; then
  natsdir=$(mktemp -d)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  nats_bin=$(command -v nats-server || echo /usr/sbin/nats-server)
  "$nats_bin" -js -a 127.0.0.1 -p "$port" -sd "$natsdir" >"$natsdir/log" 2>&1 &
  nats=$!
  serve_flags+=(--command-queue nats --nats-url "nats://127.0.0.1:$port")
  sleep 0.5
  "$waybill" serve --services commands --listen 127.0.0.1:50075 "${serve_flags[@]}" \
    --command-workers false >/dev/null 2>&1 &
  serve=$!
  sleep 1
  # 30,000 submissions in 6 s, through SubmitCommand: each stored and dispatched.
  "$waybill" loadgen --addr http://127.0.0.1:50075 --scenario submit-commands --rate 5000 \
    --duration 6s --connections 4 --timeout 5s --customers "$users" 2>/dev/null | head -1
  kill -TERM "$serve"; wait "$serve" 2>/dev/null || true; serve=""
  total=$(psql "$url" -Atc "SELECT count(*) FROM commands.commands")
  psql "$url" -qc "VACUUM ANALYZE commands.commands"
else
  # The payload is a SendNotification{customer_id: "a", message: "b"} encoded by hand.
  psql "$url" -q <<SQL
INSERT INTO commands.settings VALUES (true, 16);
INSERT INTO commands.commands (shard, id, user_id, idempotency_key, kind, payload, status)
SELECT u % 16, gen_random_uuid(), 'user-' || u, 'k' || g, 'SEND_NOTIFICATION',
       '\x22060a0161120162'::bytea, 'ACCEPTED'
FROM generate_series(1, $total) g, LATERAL (SELECT (g::bigint * 7919) % $users AS u) x;
VACUUM ANALYZE commands.commands;
SQL
fi
# Counted through the open-work index: `phase` since commands V3, `status` before (BIN may be
# an older build), so that polling does not read the whole table every 100 ms.
if [ "$(psql "$url" -Atc "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'commands' AND table_name = 'commands' AND column_name = 'phase'")" = 1 ]; then
  open_filter="phase = 'open'"
else
  open_filter="status IN ('ACCEPTED', 'RUNNING', 'RETRYING')"
fi
open_count() {
  psql "$url" -Atc "SELECT count(*) FROM commands.commands WHERE $open_filter"
}
echo "machine: $(nproc) cores, $(uname -r); $(date -u +%FT%TZ); queue $queue; users $users; flags: $*"
start=$(date +%s.%N)
"$waybill" serve --services commands --listen 127.0.0.1:50074 "${serve_flags[@]}" \
  --command-dry-run --command-poll 100ms "$@" >/dev/null 2>"${DRAIN_LOG:-/dev/null}" &
serve=$!
for _ in $(seq 3000); do
  [ "$(open_count)" = 0 ] && break
  sleep 0.1
done
end=$(date +%s.%N)
left=$(open_count)
# The execution window by the audit trail: from the first claim to the last completion.
window=$(psql "$url" -Atc "SELECT extract(epoch FROM max(at) FILTER (WHERE status = 'SUCCEEDED')
                                             - min(at) FILTER (WHERE status = 'RUNNING'))
                           FROM commands.audit")
# Row updates of the log during the drain (a claim and a completion each, at least; marking a
# command blocked and releasing it are two more, non-HOT). Statistics arrive within a second.
sleep 1.5
updates=$(psql "$url" -Atc "SELECT n_tup_upd || ' row updates, ' || n_tup_hot_upd || ' HOT'
                            FROM pg_stat_user_tables
                            WHERE schemaname = 'commands' AND relname = 'commands'")
echo "$updates"
awk -v s="$start" -v e="$end" -v total="$total" -v left="$left" -v w="$window" \
  'BEGIN { printf "executed %d of %d in %.1f s: %.0f commands/s (process start included); %.0f commands/s from the first claim to the last completion (%.2f s)\n", total - left, total, e - s, (total - left) / (e - s), (total - left) / w, w }'
