#!/usr/bin/env bash
# Instruction counts (callgrind: deterministic, unlike wall time on a shared machine) of the
# guard's fast path against bare jemalloc, every workload through the global allocator:
#  - service: a request-like loop (format, split, build a key and a response, bounded cache);
#  - churn:   allocator-heavy (small Vec/String/Box churn plus HashMap inserts);
#  - calls:   nothing but allocator calls (alloc/realloc/dealloc of 8..1024 bytes);
# each on 1 and 2 threads, for bare jemalloc, the reference wrapper (one relaxed load and one
# compare of a word in the program's own static, nothing else: the physical limit of a check),
# the guard with no variable set and the guard with FREEZETRAP_ALLOC_THRESHOLD set. Ratios are
# against bare jemalloc. Target (issue #12): <= 1.005 on the service and churn workloads. The
# calls workload is nothing but allocator calls, where even the reference pays ~1.3% (a load and
# a compare against jemalloc's ~20-instruction fast path): there the guard is measured against
# the reference.
# Usage: bash benches/callgrind.sh [ops]
set -euo pipefail
cd "$(dirname "$0")/.."
ops=${1:-100000}
cargo build --release --example alloc_workload --features bench-bare-jemalloc >/dev/null 2>&1
cp target/release/examples/alloc_workload target/release/examples/alloc_workload_bare
cargo build --release --example alloc_workload --features bench-minimal-wrapper >/dev/null 2>&1
cp target/release/examples/alloc_workload target/release/examples/alloc_workload_minimal
cargo build --release --example alloc_workload >/dev/null 2>&1
bin=target/release/examples/alloc_workload
bare=target/release/examples/alloc_workload_bare
minimal=target/release/examples/alloc_workload_minimal
count() { # binary, function, args...
  local b=$1 f=$2; shift 2
  env -u FREEZETRAP_ALLOC_THRESHOLD valgrind --tool=callgrind --callgrind-out-file=/dev/null \
    --toggle-collect="$f" "$b" "$@" 2>&1 | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
count_thr() {
  local b=$1 f=$2; shift 2
  FREEZETRAP_ALLOC_THRESHOLD=64MiB FREEZETRAP_QUIET=1 valgrind --tool=callgrind \
    --callgrind-out-file=/dev/null --toggle-collect="$f" "$b" "$@" 2>&1 \
    | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
printf '%-8s %-3s %12s %9s %9s %9s\n' workload thr bare reference no-var threshold
worst=0
for w in service churn calls; do
  case $w in
    service) f='alloc_workload::service_workload' ;;
    churn) f='alloc_workload::churn_workload' ;;
    calls) f='alloc_workload::workload::run_workload*' ;;
  esac
  for t in 1 2; do
    b=$(count "$bare" "$f" "$w" "$ops" "$t")
    m=$(count "$minimal" "$f" "$w" "$ops" "$t")
    o=$(count "$bin" "$f" "$w" "$ops" "$t")
    h=$(count_thr "$bin" "$f" "$w" "$ops" "$t")
    awk -v w="$w" -v t="$t" -v b="$b" -v m="$m" -v o="$o" -v h="$h" 'BEGIN {
      printf "%-8s %-3s %12d %8.4fx %8.4fx %8.4fx\n", w, t, b, m/b, o/b, h/b }'
    if [ "$w" = calls ]; then
      over=$(awk -v a="${over:-0}" -v o="$o" -v h="$h" -v m="$m" 'BEGIN {
        x = (o > h ? o : h) / m; print (x > a ? x : a) }')
    else
      worst=$(awk -v a="$worst" -v o="$o" -v h="$h" -v b="$b" 'BEGIN {
        m = (o > h ? o : h) / b; print (m > a ? m : a) }')
    fi
  done
done
printf 'worst ratio, service and churn: %.4fx (target: <= 1.005x)\n' "$worst"
printf 'calls, guard against the reference: at most %.4fx\n' "$over"
