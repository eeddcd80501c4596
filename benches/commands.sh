#!/usr/bin/env bash
# The command pipeline: durably accepted commands per second (SubmitCommand, group commit),
# SubmitCommand latency at fixed rates, and executed commands per second with a trivial
# handler (`--command-dry-run`: workers claim, "run" and record each command, audit rows and
# all, without calling a service), next to a bare echo through the same server in the same run.
#
# Release build; one `waybill serve --services commands,echo` process against the
# `waybill dev up` cluster (durable: fsync and synchronous_commit on, a streaming replica);
# load from `waybill loadgen` on the same machine (open loop, latency from each call's
# scheduled start). Ingestion runs with workers off, so it measures accepting alone; then
# benches/commands-drain.sh measures executing alone, with each queue.
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
  "$waybill" migrate --services commands --primary-url "$(db_url "$1")" >/dev/null
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

echo "machine: $(nproc) cores, $(uname -r); $(date -u +%FT%TZ)"
db=bench_commands_echo
fresh_db "$db"
start_server "$db" --command-workers false
for rate in "${rates[@]}"; do
  echo "--- echo at $rate/s (bare server path, no database)"
  load echo "$rate"
done
stop_server

for rate in "${rates[@]}"; do
  db="bench_commands_$rate"
  fresh_db "$db"
  start_server "$db" --command-workers false
  echo "--- submit-commands at $rate/s (workers off)"
  load submit-commands "$rate"
  stop_server
  psql "$primary" -qc "DROP DATABASE IF EXISTS $db" >/dev/null
done
psql "$primary" -qc "DROP DATABASE IF EXISTS bench_commands_echo" >/dev/null

# Executing, alone: a backlog drained by a dry-run worker (one script for that figure).
echo "--- executing (benches/commands-drain.sh 10000)"
benches/commands-drain.sh 10000 | sed "s/^/  /"
echo "--- executing, JetStream queue (QUEUE=nats benches/commands-drain.sh 10000)"
QUEUE=nats benches/commands-drain.sh 10000 | sed "s/^/  /"
