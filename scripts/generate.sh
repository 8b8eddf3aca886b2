#!/usr/bin/env bash
# make generate: writes what `kube-zerocopy` generates and the repository commits: the CRDs
# (crds/ and the chart's files/crds/) and the rendered examples. Tests fail when these drift.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --release -p kube-zerocopy
bin="$KZC_RELEASE/kube-zerocopy"
"$bin" crd inference-pipeline > crds/inferencepipelines.kube-zerocopy.io.yaml
"$bin" crd node-store > crds/nodestores.kube-zerocopy.io.yaml
"$bin" reference > docs/reference.md
cp crds/*.yaml charts/kube-zerocopy/files/crds/
for f in examples/*.yaml; do
  case "$f" in examples/local-*) continue ;; esac
  "$bin" render -f "$f" > "examples/rendered/$(basename "$f")"
done
