#!/usr/bin/env bash
# make bench-python: see tests/src/bin/bench_python.rs. A benchmark, not a test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --release -p kube-zerocopy-weight-server --bins
cargo build --release -p kube-zerocopy-e2e --features bench --bin bench_python
"$KZC_RELEASE/bench_python"
