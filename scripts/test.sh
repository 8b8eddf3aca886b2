#!/usr/bin/env bash
# make test: every test of the workspace, then one closing line with the totals.
# --no-fail-fast runs every test binary even after one fails, so that the totals count them all;
# a binary that dies without its "test result:" line (a crash, a signal) counts as crashed.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
log=$(mktemp)
set +e
# --tests: every target whose manifest lets it be tested (test = false keeps binaries and
# helpers without tests out of the build; --all-targets would build them anyway).
# The bench feature builds the benchmarks, whose smoke modes tests/tests/benchmarks.rs runs.
cargo test --release --workspace --tests --features kube-zerocopy-e2e/bench --no-fail-fast -- --test-threads=2 --show-output 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# Each binary's own list of its tests, to compare with what it reported: a binary that ends
# early after some of its tests (the operator's runs a second stage) would otherwise pass unseen.
counts=$(mktemp)
trap 'rm -f "$log" "$counts"' EXIT
awk '
  /^ +Running / {
    path = $0; sub(/^.*\(/, "", path); sub(/\)$/, "", path); paths[++n] = path; ran[n] = 0
  }
  /^test result:/ {
    for (i = 1; i < NF; i++) if ($(i+1) ~ /^(passed|failed|ignored)/) ran[n] += $i
  }
  END { for (i = 1; i <= n; i++) print paths[i], ran[i] }' "$log" >"$counts"
short=""
while read -r path ran; do
  listed=$("$path" --list 2>/dev/null | grep -c ': test$' || true)
  if [ "$ran" -lt "$listed" ]; then
    name=$(basename "$path"); name=${name%-*}
    short="${short:+$short, }$name ran $ran of $listed"
  fi
done <"$counts"
awk -v status="$status" -v short="$short" '
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
    if (short != "") line = line "; tests that did not run: " short
    if (n == 0 && status != 0) line = line "; the build failed, no test ran"
    else if (status != 0 && f == 0 && c == 0) line = line "; cargo failed (exit " status ")"
    print line
  }' "$log"
if [ -n "$short" ] && [ "$status" -eq 0 ]; then status=1; fi
exit "$status"
