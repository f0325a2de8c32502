#!/usr/bin/env bash
# Rebuilds recorder.bpf.o from recorder.bpf.c. The object is committed (the capture binary embeds
# it, so building freezetrap needs no clang); CI runs this with Debian 12's clang 14 and fails if
# the result differs from the committed file:  bash probes/capture/bpf/build.sh --check
#
# Deterministic: built from this directory with a relative source path, DWARF stripped (the BTF
# that CO-RE needs stays), so the object does not depend on where the repository is checked out.
set -euo pipefail
cd "$(dirname "$0")"
CLANG=${CLANG:-clang}
STRIP=${STRIP:-llvm-strip}
out=recorder.bpf.o
check=0
if [ "${1:-}" = "--check" ]; then
  check=1
  out=$(mktemp)
  trap 'rm -f "$out"' EXIT
fi
"$CLANG" -O2 -g -target bpf -mcpu=v3 -fdebug-compilation-dir=. -c recorder.bpf.c -o "$out"
"$STRIP" -g "$out"
if [ "$check" = 1 ]; then
  if ! cmp -s "$out" recorder.bpf.o; then
    echo "recorder.bpf.o is not what recorder.bpf.c builds to with $("$CLANG" --version | head -1): run bash probes/capture/bpf/build.sh and commit it" >&2
    exit 1
  fi
  echo "recorder.bpf.o matches recorder.bpf.c"
fi
