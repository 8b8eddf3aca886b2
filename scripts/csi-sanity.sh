#!/usr/bin/env bash
# Builds (once) csi-sanity, the CSI community's conformance suite, from the module pinned in
# tests/cluster/csi-test/go.mod; the node agent's test runs it against the agent's socket.
# Prints the bin folder on stdout; logs go to stderr.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib/go-build.sh"

VERSION="$(required csi-test github.com/kubernetes-csi/csi-test/v5)"
bin_folder csi-test "$VERSION-$(modules_hash csi-test)"

started=$SECONDS
if ! complete csi-sanity; then
  build csi-test "" csi-sanity github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity
fi
echo "csi-sanity.sh: csi-sanity $VERSION ready in $BIN ($((SECONDS - started)) s)" >&2
echo "$BIN"
