#!/usr/bin/env bash
# make bench-load: see tests/src/bin/bench_load.rs. A benchmark, not a test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --release -p kube-zerocopy-e2e --features bench --bin bench_load
"$KZC_RELEASE/bench_load"
