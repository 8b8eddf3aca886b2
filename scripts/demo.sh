#!/usr/bin/env bash
# The demo: builds a small TorchScript model (with BatchNorm) and a safetensors Mlp that runs
# after it, 16 input shards, then runs the pipeline on this machine with `kube-zerocopy local
# run`: one weight server, 4 worker processes at a time sharing the weights in /dev/shm.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
DEMO="${DEMO_DIR:-$PWD/out/demo}"
rm -rf "$DEMO" && mkdir -p "$DEMO"
python scripts/make_models.py script "$DEMO/encoder.pt" --sizes 512,2048,2048,256
python scripts/make_models.py mlp "$DEMO/head.safetensors" --sizes 256,1024,10
python scripts/make_models.py inputs "$DEMO/input" --shards 16 --batch 32 --features 512
sed "s#@DEMO@#$DEMO#g" examples/local-demo.yaml > "$DEMO/pipeline.yaml"
echo "running $DEMO/pipeline.yaml"
"$KZC_RELEASE/kube-zerocopy" local run -f "$DEMO/pipeline.yaml"
