#!/usr/bin/env bash
# make bench-replica: see tests/src/bin/bench_replica.rs. A benchmark on the real node (root:
# a kubelet, containerd, the images from scripts/images.sh, the chart), not a test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/cluster-binaries.sh
cargo build --release --workspace --bins --features kube-zerocopy-e2e/bench
"$KZC_RELEASE/bench_replica"
