#!/usr/bin/env bash
# make test: starts building the test cluster's Go binaries (scripts/control-plane.sh, then
# scripts/node.sh, scripts/csi-sanity.sh, scripts/s3-server.sh, scripts/azure-server.sh (an npm
# and a pip install) and scripts/kueue.sh) in the background and returns
# at once. On a fresh machine they take about 23 minutes of CPU (versitygw, the S3 server, about
# 3 of them; Kueue about 5.5), and cargo leaves cores idle while it downloads torch and crates or links; at nice
# 19 the Go builds fill those gaps and yield to cargo otherwise. The tests call the same
# scripts, which wait on the scripts' locks and find the binaries built. Nothing to do when all
# are already built (each script checks its .complete markers).
set -euo pipefail
cd "$(dirname "$0")/.."
log="${KZC_CACHE:-$HOME/.cache/kube-zerocopy}/cluster-binaries.log"
mkdir -p "$(dirname "$log")"
# Same session as make (no setsid): nice orders processes only within one scheduling group.
nohup nice -n 19 bash -c 'scripts/control-plane.sh >/dev/null && scripts/node.sh >/dev/null && scripts/csi-sanity.sh >/dev/null && scripts/s3-server.sh >/dev/null && scripts/azure-server.sh >/dev/null && scripts/kueue.sh >/dev/null' \
  >"$log" 2>&1 </dev/null &
echo "cluster-binaries.sh: building the cluster's Go binaries in the background (log: $log)"
