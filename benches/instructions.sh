#!/usr/bin/env bash
# Instructions per call of the bare tonic echo and of the mesh stacks, counted by callgrind:
# repeatable where wall-clock figures on a shared 2-core machine are not. Each side runs under
# callgrind twice, for LOW and HIGH sequential calls; the difference divided by HIGH-LOW is the
# cost of one call, startup excluded.
#
# Usage: benches/instructions.sh [LOW HIGH]   (needs valgrind; builds the bench first)
# KEEP=DIR keeps the callgrind files (for callgrind_annotate). BIN=PATH counts that bench
# binary instead of building this checkout's (to compare with another commit's build).
# TRACING=1 traces every mesh call (full sampling) and exports the spans over OTLP/gRPC to a
# receiver process that counts and drops them; the mesh side's count then includes making,
# batching and exporting its spans (the flush at exit included; the bare side makes none).
# LAYERS=1 counts instead the client stack built up one layer at a time (`--client upto:L`),
# all boxed alike, and prints what each layer adds.
set -euo pipefail
cd "$(dirname "$0")/.."
low=${1:-200}
high=${2:-1200}
if [ -z "${BIN:-}" ]; then
  cargo bench --bench mesh --no-run 2>/dev/null
fi
bin=${BIN:-$(ls -t target/release/deps/mesh-* | grep -v '\.d$' | head -1)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Starts one server (under callgrind when an output file is given) whose stdin is fd 7; closing
# fd 7 stops it. Sets $endpoint. (Not called in $(…): a subshell would close fd 7 on exit.)
start_server() { # kind, callgrind output file or ""
  local kind=$1 out=$2
  rm -f "$work/fifo" "$work/addr"
  mkfifo "$work/fifo"
  if [ -n "$out" ]; then
    valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" --serve "$kind" \
      <"$work/fifo" >"$work/addr" 2>/dev/null &
  else
    "$bin" --serve "$kind" <"$work/fifo" >"$work/addr" 2>/dev/null &
  fi
  server_pid=$!
  exec 7>"$work/fifo"
  for _ in $(seq 600); do grep -q listening "$work/addr" 2>/dev/null && break; sleep 0.1; done
  endpoint=$(sed -n 's/^listening on /http:\/\//p' "$work/addr")
}

stop_server() {
  exec 7>&-
  wait "$server_pid"
}

total() { # callgrind output file -> total instructions
  callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}'
}

per_call() { # file for LOW, file for HIGH
  echo $(( ($(total "$2") - $(total "$1")) / (high - low) ))
}

server_run() { # kind: callgrind files for LOW and HIGH calls, server side
  local kind=$1
  for n in $low $high; do
    start_server "$kind" "$work/server-$kind-$n.out"
    "$bin" --calls "$n" --client bare --endpoint "$endpoint"
    stop_server
  done
}

client_run() { # kind: callgrind files for LOW and HIGH calls, client side, bare server
  local kind=$1
  start_server bare ""
  for n in $low $high; do
    valgrind --tool=callgrind --callgrind-out-file="$work/client-$kind-$n.out" \
      "$bin" --calls "$n" --client "$kind" --endpoint "$endpoint" 2>/dev/null
  done
  stop_server
}

if [ -n "${TRACING:-}" ]; then
  rm -f "$work/otlp-fifo" "$work/otlp-addr"
  mkfifo "$work/otlp-fifo"
  "$bin" --serve otlp <"$work/otlp-fifo" >"$work/otlp-addr" 2>"$work/otlp-log" &
  exec 8>"$work/otlp-fifo"
  for _ in $(seq 600); do grep -q listening "$work/otlp-addr" 2>/dev/null && break; sleep 0.1; done
  export OTEL_EXPORTER_OTLP_ENDPOINT=$(sed -n 's/^listening on /http:\/\//p' "$work/otlp-addr")
fi

if [ -n "${LAYERS:-}" ]; then
  previous=""
  echo "| client stack up to | instructions/call | added by this layer |"
  echo "|---|---|---|"
  for layer in boxed connection balancer retry deadline trace; do
    client_run "upto:$layer"
    count=$(per_call "$work/client-upto:$layer-$low.out" "$work/client-upto:$layer-$high.out")
    echo "| $layer | $count | ${previous:+$((count - previous))} |"
    previous=$count
  done
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$work"/*.out "$KEEP"/; fi
  exit 0
fi

server_run bare; server_run full; client_run bare; client_run mesh
if [ -n "${TRACING:-}" ]; then
  exec 8>&-
  wait
  echo "tracing every mesh call: $(cat "$work/otlp-log")" >&2
fi
sb=$(per_call "$work/server-bare-$low.out" "$work/server-bare-$high.out")
sm=$(per_call "$work/server-full-$low.out" "$work/server-full-$high.out")
cb=$(per_call "$work/client-bare-$low.out" "$work/client-bare-$high.out")
cm=$(per_call "$work/client-mesh-$low.out" "$work/client-mesh-$high.out")
ratio() { echo "scale=2; $1 / $2" | bc; }
echo "| side | bare tonic (instructions/call) | mesh stack (instructions/call) | added | mesh / bare |"
echo "|---|---|---|---|---|"
echo "| server | $sb | $sm | $((sm - sb)) | $(ratio "$sm" "$sb") |"
echo "| client | $cb | $cm | $((cm - cb)) | $(ratio "$cm" "$cb") |"
echo "| both | $((sb + cb)) | $((sm + cm)) | $((sm + cm - sb - cb)) | $(ratio $((sm + cm)) $((sb + cb))) |"
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$work"/*.out "$KEEP"/; fi
