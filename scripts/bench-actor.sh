#!/usr/bin/env bash
# make bench-actor: see tests/src/bin/bench_actor.rs. A benchmark, not a test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --release -p kube-zerocopy-e2e --features bench --bin bench_actor
"$KZC_RELEASE/bench_actor"
