#!/usr/bin/env bash
# make fuzz [FUZZ_SECONDS=600]: runs every fuzz target of fuzz/ (cargo fuzz: libFuzzer with
# AddressSanitizer, on the nightly toolchain) for FUZZ_SECONDS each, two at a time, growing its
# corpus in fuzz/corpus/<target> (committed; minimised after the runs). A crash leaves its
# input in fuzz/artifacts/<target>/.
# Last line: `fuzz: T targets, S seconds, C crashes`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
seconds="${FUZZ_SECONDS:-600}"
CACHE="${KZC_CACHE:-$HOME/.cache/kube-zerocopy}"
CARGO_FUZZ_VERSION=0.13.1
tools="$CACHE/cargo-fuzz-$CARGO_FUZZ_VERSION"
if [ ! -x "$tools/bin/cargo-fuzz" ]; then
  echo "installing cargo-fuzz $CARGO_FUZZ_VERSION into $tools (once)" >&2
  cargo install --quiet --locked --root "$tools" cargo-fuzz --version "$CARGO_FUZZ_VERSION" >&2
fi
export PATH="$tools/bin:$PATH"
# The fuzz build has its own flags: keep its artefacts apart from the workspace's.
export CARGO_TARGET_DIR="$CACHE/fuzz-target"

# Seeds, once: real files of each kind, which the fuzzer then mutates.
seed() {
  local target="$1"; shift
  local dir="$PWD/fuzz/corpus/$target"
  [ -n "$(ls -A "$dir" 2>/dev/null)" ] && return
  mkdir -p "$dir"
  "$@" "$dir"
}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python="$KZC_VENV/bin/python"
models() {
  "$python" scripts/make_models.py mlp "$scratch/mlp.safetensors" --sizes 8,16,4
  "$python" scripts/make_models.py script "$scratch/net.pt" --sizes 8,16,4
}
models >/dev/null
seed safetensors_layout cp "$scratch/mlp.safetensors"
seed torchscript_layout cp "$scratch/net.pt"
seed pickle sh -c "cd '$scratch' && unzip -o -q net.pt '*/data.pkl' '*/constants.pkl' && find . -name '*.pkl' -exec cp --backup=numbered {} \"\$0\" \\;"
seed manifest sh -c "printf '\\200\\0\\0\\0\\0\\0\\0\\0{\"layout_version\":1,\"digest\":\"d\",\"format\":\"Safetensors\",\"source_bytes\":1,\"tensors_bytes\":128,\"tensors\":[{\"name\":\"w\",\"dtype\":\"F32\",\"shape\":[2,3],\"offset\":0,\"length\":24},{\"name\":\"b\",\"dtype\":\"BF16\",\"shape\":[3],\"offset\":64,\"length\":6}]}' > \"\$0/seed\""
seed pipeline_yaml cp examples/*.yaml
seed oip_request sh -c "printf '\\000%s' '{\"id\":\"1\",\"inputs\":[{\"name\":\"input\",\"shape\":[2,2],\"datatype\":\"FP32\",\"data\":[[1,2],[3,4.5]]}],\"outputs\":[{\"name\":\"output\"}]}' > \"\$0/seed\""
seed csi_volume_attributes sh -c "printf '[{\"name\":\"mlp\",\"format\":\"Safetensors\",\"uri\":\"https://models.example/m.safetensors?sig=x\",\"sha256\":\"%s\"}]' \"\$(printf 'ab%.0s' \$(seq 32))\" > \"\$0/seed\""

targets=$(cargo +nightly fuzz list --fuzz-dir fuzz)
run() {
  # A background copy of this shell must not remove the scratch folder when it ends.
  trap - EXIT
  local target="$1" log="$scratch/$1.log"
  mkdir -p "fuzz/artifacts/$target"
  # -rss_limit_mb: a target that wants more memory than this is a finding, not a slow run.
  # libFuzzer exits non-zero on a crash, a timeout or running out of memory.
  local status=0
  cargo +nightly fuzz run --fuzz-dir fuzz --release "$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$target/" >"$log" 2>&1 || status=$?
  local runs
  runs=$(awk '/stat::number_of_executed_units:/ { print $2 }' "$log")
  echo "$target: ${runs:-0} executions in $seconds s, corpus $(find "fuzz/corpus/$target" -type f | wc -l) inputs"
  if [ "$status" -ne 0 ]; then
    echo "$target: CRASH (exit $status)"
    grep -E "==ERROR|panicked at|deadly signal|out-of-memory|Test unit written" "$log" | head -5 || true
  fi
}
# Built once before the runs, so that the two runs at a time do not build at once.
cargo +nightly fuzz build --fuzz-dir fuzz --release >&2
pids=()
results="$scratch/results"
for target in $targets; do
  run "$target" >>"$results" &
  pids+=($!)
  if [ ${#pids[@]} -eq 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
wait
# Keep only the inputs that add coverage: the corpora are committed.
for target in $targets; do
  cargo +nightly fuzz cmin --fuzz-dir fuzz --release "$target" "fuzz/corpus/$target" -- \
    -rss_limit_mb=2048 -timeout=10 >"$scratch/$target.cmin.log" 2>&1 ||
    echo "$target: cmin failed (the corpus is kept whole)" >&2
done
cat "$results"
n=$(echo "$targets" | wc -w)
crashes=$(grep -c ": CRASH$" "$results" || true)
echo "fuzz: $n targets, $((n * seconds)) seconds, $crashes crashes"
[ "$crashes" -eq 0 ]
