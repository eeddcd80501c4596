#!/usr/bin/env bash
# The command pipeline: durably accepted commands per second (SubmitCommand, group commit),
# SubmitCommand latency at fixed rates, and executed commands per second with a trivial
# handler (`--command-dry-run`: workers claim, "run" and record each command, audit rows and
# all, without calling a service), next to a bare echo through the same server in the same run.
#
# Release build; one `waybill serve --services commands,echo` process against the
# `waybill dev up` cluster (durable: fsync and synchronous_commit on, a streaming replica);
# load from `waybill loadgen` on the same machine (open loop, latency from each call's
# scheduled start). Ingestion runs with workers off, so it measures accepting alone; the
# backlog it leaves is then drained by a worker process, which measures executing alone.
#
# Usage: benches/commands.sh [SECONDS] [RATE…]   (default: 10 s at 2000 5000 8000 10000 20000)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
shift || true
rates=("$@")
[ ${#rates[@]} -eq 0 ] && rates=(2000 5000 8000 10000 20000)

scripts/prereqs postgres >/dev/null
cargo build --locked --release -p waybill 2>/dev/null
waybill=target/release/waybill
"$waybill" dev up >/dev/null

status=$("$waybill" dev status)
primary=$(echo "$status" | awk '/^primary/ {print $3}')
replica=$(echo "$status" | awk '/^replica/ {print $3}')
listen=127.0.0.1:50072
addr="http://$listen"
log=$(mktemp)
serve=""
cleanup() { [ -n "$serve" ] && { kill -TERM "$serve" 2>/dev/null; wait "$serve" 2>/dev/null; }; rm -f "$log"; }
trap cleanup EXIT

db_url() { echo "${primary%/*}/$1"; }
fresh_db() { # database
  psql "$primary" -qc "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1" >/dev/null
  "$waybill" migrate --services commands --primary-url "$(db_url "$1")" >/dev/null 2>&1
}
start_server() { # database extra-args…
  local db=$1
  shift
  "$waybill" serve --services commands,echo --listen "$listen" \
    --primary-url "$(db_url "$db")" --replica-url "${replica%/*}/$db" \
    --admin-listen 127.0.0.1:0 "$@" >/dev/null 2>"$log" &
  serve=$!
  for _ in $(seq 100); do grep -q "serving" "$log" && break; sleep 0.1; done
}
stop_server() {
  kill -TERM "$serve" 2>/dev/null; wait "$serve" 2>/dev/null; serve=""
}
load() { # scenario rate
  "$waybill" loadgen --addr "$addr" --scenario "$1" --rate "$2" --duration "${seconds}s" \
    --connections 4 --timeout 5s --customers 10000 2>/dev/null | sed "s/^/  /" || true
}
open_commands() { # database
  psql "$(db_url "$1")" -Atc \
    "SELECT count(*) FROM commands.commands WHERE status IN ('ACCEPTED', 'RUNNING', 'RETRYING')"
}

echo "machine: $(nproc) cores, $(uname -r); $(date -u +%FT%TZ)"
db=bench_commands_echo
fresh_db "$db"
start_server "$db" --command-workers false
for rate in "${rates[@]}"; do
  echo "--- echo at $rate/s (bare server path, no database)"
  load echo "$rate"
done
stop_server

last_db=""
for rate in "${rates[@]}"; do
  db="bench_commands_$rate"
  fresh_db "$db"
  start_server "$db" --command-workers false
  echo "--- submit-commands at $rate/s (workers off)"
  load submit-commands "$rate"
  stop_server
  [ -n "$last_db" ] && psql "$primary" -qc "DROP DATABASE IF EXISTS $last_db" >/dev/null
  last_db=$db
done

# Executing: drain what the last ingestion run accepted.
backlog=$(open_commands "$last_db")
echo "--- executing a backlog of $backlog commands (dry-run handler, one worker process)"
start=$(date +%s.%N)
start_server "$last_db" --command-dry-run --command-poll 100ms
while [ "$(open_commands "$last_db")" -gt 0 ]; do
  now=$(date +%s.%N)
  if awk -v s="$start" -v n="$now" 'BEGIN { exit !(n - s > 300) }'; then
    echo "  gave up after 300 s: $(open_commands "$last_db") still open"
    break
  fi
  sleep 0.2
done
end=$(date +%s.%N)
stop_server
awk -v n="$backlog" -v s="$start" -v e="$end" \
  'BEGIN { printf "  executed %d in %.1f s: %.0f commands/s (includes the process start, ~0.1 s)\n", n, e - s, n / (e - s) }'
psql "$(db_url "$last_db")" -Atc \
  "SELECT '  audit rows: ' || count(*) FROM commands.audit" 
psql "$primary" -qc "DROP DATABASE IF EXISTS $last_db" -c "DROP DATABASE IF EXISTS bench_commands_echo" >/dev/null
