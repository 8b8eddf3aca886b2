#!/usr/bin/env bash
# make bench-operator: see tests/src/bin/bench_operator.rs. A benchmark, not a test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/control-plane.sh >/dev/null
cargo build --release --workspace --bins --features kube-zerocopy-e2e/bench
"$KZC_RELEASE/bench_operator"
