#!/usr/bin/env bash
# Instruction counts (callgrind: deterministic, unlike wall time on a shared machine) of
#  1. a small-allocation-heavy request loop through the global allocator: bare jemalloc vs the
#     guard with no env var vs the guard with FREEZETRAP_ALLOC_THRESHOLD set;
#  2. the worst case, a loop of nothing but allocator calls.
# Usage: bash benches/callgrind.sh [requests] [allocator-calls]
set -euo pipefail
cd "$(dirname "$0")/.."
reqs=${1:-200000}
calls=${2:-1000000}
cargo build --release --example alloc_workload --features bench-bare-jemalloc >/dev/null 2>&1
cp target/release/examples/alloc_workload target/release/examples/alloc_workload_bare
cargo build --release --example alloc_workload >/dev/null 2>&1
bin=target/release/examples/alloc_workload
count() { # binary, function, args...
  local b=$1 f=$2; shift 2
  valgrind --tool=callgrind --callgrind-out-file=/dev/null --toggle-collect="$f" "$b" "$@" 2>&1 \
    | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
svc='alloc_workload::service_workload'
s_bare=$(count target/release/examples/alloc_workload_bare "$svc" service "$reqs")
s_off=$(count "$bin" "$svc" service "$reqs")
s_thr=$(FREEZETRAP_ALLOC_THRESHOLD=64MiB FREEZETRAP_QUIET=1 count "$bin" "$svc" service "$reqs")
fn='alloc_workload::workload::run_workload*'
c_bare=$(count "$bin" "$fn" bare "$calls")
c_off=$(count "$bin" "$fn" guard-off "$calls")
c_thr=$(count "$bin" "$fn" guard-threshold "$calls")
awk -v sb="$s_bare" -v so="$s_off" -v st="$s_thr" -v cb="$c_bare" -v co="$c_off" -v ct="$c_thr" \
    -v r="$reqs" -v c="$calls" 'BEGIN {
  printf "service loop (%d requests), instructions:\n", r
  printf "  bare jemalloc      %d\n  guard, no env var  %d  (%.4fx)\n  guard, threshold   %d  (%.4fx)\n", sb, so, so/sb, st, st/sb
  printf "allocator calls only (%d calls), instructions:\n", c
  printf "  bare jemalloc      %d\n  guard, no env var  %d  (%.4fx, %+.2f per call)\n  guard, threshold   %d  (%.4fx, %+.2f per call)\n", cb, co, co/cb, (co-cb)/c, ct, ct/cb, (ct-cb)/c
}'
