#!/usr/bin/env bash
# make test: every test of the workspace, then one closing line with the totals.
# --no-fail-fast runs every test binary even after one fails, so that the totals count them all;
# a binary that dies without its "test result:" line (a crash, a signal) counts as crashed.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
# --tests: every target whose manifest lets it be tested (test = false keeps binaries and
# helpers without tests out of the build; --all-targets would build them anyway).
cargo test --release --workspace --tests --no-fail-fast -- --test-threads=2 --show-output 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk -v status="$status" '
  # "     Running tests/actor.rs (/path/deps/actor-0123abcd)": the test binary actor starts.
  /^ +Running / {
    name = $0; sub(/^.*\//, "", name); sub(/-[0-9a-f]+\)$/, "", name)
    binaries[++n] = name; finished[n] = 0
  }
  /^test result:/ {
    if (n) finished[n] = 1
    for (i = 1; i < NF; i++) {
      if ($(i+1) ~ /^passed/) p += $i
      if ($(i+1) ~ /^failed/) f += $i
      if ($(i+1) ~ /^ignored/) ig += $i
    }
  }
  END {
    crashed = ""; c = 0
    for (i = 1; i <= n; i++) if (!finished[i]) { c++; crashed = crashed (c > 1 ? ", " : "") binaries[i] }
    line = sprintf("tests: %d passed, %d failed, %d ignored; %d test binaries, %d crashed", p, f, ig, n, c)
    if (c) line = line " (" crashed ")"
    if (n == 0 && status != 0) line = line "; the build failed, no test ran"
    else if (status != 0 && f == 0 && c == 0) line = line "; cargo failed (exit " status ")"
    print line
  }' "$log"
exit "$status"
