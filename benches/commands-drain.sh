#!/usr/bin/env bash
# Executed commands per second with a trivial handler: a backlog of 30,000 ACCEPTED commands
# (made by SQL, spread over USERS users) drained by one `waybill serve --services commands
# --command-dry-run` process (workers claim, "run" and record each command, audit rows and
# notifications included, without calling a service), timed until none is open.
#
# Release build, against the `waybill dev up` cluster (durable commits, a streaming replica).
# Usage: benches/commands-drain.sh [USERS] [serve flags…]   (default: 10000 users)
set -euo pipefail
cd "$(dirname "$0")/.."
users=${1:-10000}
shift || true

scripts/prereqs postgres >/dev/null
cargo build --locked --release -p waybill 2>/dev/null
waybill=target/release/waybill
"$waybill" dev up >/dev/null
status=$("$waybill" dev status)
primary=$(echo "$status" | awk '/^primary/ {print $3}')
replica=$(echo "$status" | awk '/^replica/ {print $3}')
db=bench_commands_drain
url="${primary%/*}/$db"
serve=""
cleanup() {
  [ -n "$serve" ] && { kill -TERM "$serve" 2>/dev/null; wait "$serve" 2>/dev/null; }
  psql "$primary" -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
}
trap cleanup EXIT

psql "$primary" -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null 2>&1
"$waybill" migrate --services commands --primary-url "$url" >/dev/null 2>&1
# The payload is a SendNotification{customer_id: "a", message: "b"} encoded by hand.
psql "$url" -q <<SQL
INSERT INTO commands.settings VALUES (true, 16);
INSERT INTO commands.commands (shard, id, user_id, idempotency_key, kind, payload, status)
SELECT u % 16, gen_random_uuid(), 'user-' || u, 'k' || g, 'SEND_NOTIFICATION',
       '\x22060a0161120162'::bytea, 'ACCEPTED'
FROM generate_series(1, 30000) g, LATERAL (SELECT (g::bigint * 7919) % $users AS u) x;
VACUUM ANALYZE commands.commands;
SQL
open_count() {
  psql "$url" -Atc "SELECT count(*) FROM commands.commands WHERE status IN ('ACCEPTED', 'RUNNING', 'RETRYING')"
}
echo "machine: $(nproc) cores, $(uname -r); $(date -u +%FT%TZ); users $users; flags: $*"
start=$(date +%s.%N)
"$waybill" serve --services commands --listen 127.0.0.1:50074 --primary-url "$url" \
  --replica-url "${replica%/*}/$db" --admin-listen 127.0.0.1:0 --command-dry-run \
  --command-poll 100ms "$@" >/dev/null 2>&1 &
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
awk -v s="$start" -v e="$end" -v left="$left" -v w="$window" \
  'BEGIN { printf "executed %d of 30000 in %.1f s: %.0f commands/s (process start included); %.0f commands/s from the first claim to the last completion (%.2f s)\n", 30000 - left, e - s, (30000 - left) / (e - s), (30000 - left) / w, w }'
