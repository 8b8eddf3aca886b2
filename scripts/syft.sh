#!/usr/bin/env bash
# Builds (once) syft, Anchore's SBOM generator, from the module pinned in
# tests/cluster/syft/go.mod; `make release-dry-run` runs it on each image's OCI archive.
# Prints the bin folder on stdout; logs go to stderr.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib/go-build.sh"

VERSION="$(required syft github.com/anchore/syft)"
bin_folder syft "$VERSION-$(modules_hash syft)"

started=$SECONDS
if ! complete syft; then
  build syft "-X main.version=$VERSION" syft github.com/anchore/syft/cmd/syft
fi
echo "syft.sh: syft $VERSION ready in $BIN ($((SECONDS - started)) s)" >&2
echo "$BIN"
