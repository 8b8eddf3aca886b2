#!/usr/bin/env bash
# The GPU check, run on a machine with an NVIDIA GPU (not part of `make test`, which runs where
# no GPU is): the worker's cuda path with real libtorch on a real device.
#
# For a 402.6 MiB model of each format, published by the sidecar into /dev/shm, new worker
# processes load it onto cuda:0 three ways, 5 rounds each: zero-copy mapping with the host
# pages pinned for the copy, zero-copy without pinning, and tch's copying loaders
# (VarStore::load / CModule::load onto the device). Outputs must be identical between the
# zero-copy and copying loads; load-step medians and the ratio are printed.
#
#   BIN=<folder with kube-zerocopy-weight-server and kube-zerocopy-worker> OUT=<results> scripts/gpu-check.sh
# The binaries must be built against the torch that python3 imports there.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.device/bin}
OUT=${OUT:-$(mktemp -d)}
ROUNDS=${ROUNDS:-5}
TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__)'
W=$(mktemp -d /dev/shm/kzc-gpu.XXXXXX)
trap 'rm -rf "$W"' EXIT
SIZES=5120,5120,5120,5120,5120,128
python3 scripts/make_models.py mlp "$W/mlp.safetensors" --sizes $SIZES
python3 scripts/make_models.py script "$W/net.pt" --sizes $SIZES
python3 scripts/make_models.py inputs "$W/in" --shards 1 --batch 8 --features 5120
export KZC_STORE="$W/store" KZC_BINDINGS="$W/bindings"
for fmt in Safetensors TorchScript; do
  file=$([ $fmt = Safetensors ] && echo "$W/mlp.safetensors" || echo "$W/net.pt")
  export KZC_MODELS="[{\"name\":\"m\",\"format\":\"$fmt\",\"uri\":\"file://$file\"}]"
  "$BIN/kube-zerocopy-weight-server" publish 2>/dev/null
  "$BIN/kube-zerocopy-worker" --device cpu inspect --input-file "$W/in/shard-00000.safetensors" \
      --output-file "$OUT/$fmt-cpu.safetensors" > "$OUT/$fmt-cpu.json"
  for round in $(seq "$ROUNDS"); do
    for variant in pinned unpinned copy; do
      loader=$([ $variant = copy ] && echo copy || echo shared)
      pin=$([ $variant = unpinned ] && echo false || echo true)
      KZC_PIN_HOST=$pin "$BIN/kube-zerocopy-worker" --device cuda inspect --loader $loader \
        --input-file "$W/in/shard-00000.safetensors" \
        --output-file "$OUT/$fmt-$variant.safetensors" > "$OUT/$fmt-$variant-$round.json"
    done
  done
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
from safetensors.torch import load_file
out, rounds = sys.argv[1], int(sys.argv[2])
for fmt in ["Safetensors", "TorchScript"]:
    rows = {}
    for v in ["pinned", "unpinned", "copy"]:
        reps = [json.load(open(f"{out}/{fmt}-{v}-{r}.json")) for r in range(1, rounds + 1)]
        rows[v] = {k: statistics.median(x[k] for x in reps) for k in ["load_ms", "first_infer_ms", "since_start_ms"]}
        rows[v]["devices"] = reps[0]["models"][0]["devices"]
    get = lambda v: load_file(f"{out}/{fmt}-{v}.safetensors")["output"]
    cpu = get("cpu")
    same = bool((get("pinned") == get("copy")).all() and (get("unpinned") == get("copy")).all())
    diff = float((get("pinned").float() - cpu.float()).abs().max())
    print(f"\n{fmt}, 402.6 MiB, cuda:0, medians of {rounds} new processes")
    for v, r in rows.items():
        print(f"  {v:<9} load step {r['load_ms']:8.1f} ms  first inference {r['first_infer_ms']:7.1f} ms  "
              f"process to first inference {r['since_start_ms']:8.1f} ms  devices {r['devices']}")
    print(f"  outputs: zero-copy == copying load on cuda: {same}; max |cuda - cpu| = {diff:.2e}")
    print(f"  load-ratio copy/pinned = {rows['copy']['load_ms'] / rows['pinned']['load_ms']:.2f}, "
          f"unpinned/pinned = {rows['unpinned']['load_ms'] / rows['pinned']['load_ms']:.2f}")
    assert same, f"{fmt}: zero-copy output differs from the copying load on cuda"
PY
