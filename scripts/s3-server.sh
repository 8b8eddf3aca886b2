#!/usr/bin/env bash
# Builds (once) versitygw, an S3 server whose posix backend serves a folder, from the module
# pinned in tests/cluster/versitygw/go.mod; tests/env/src/s3.rs starts it on 127.0.0.1 for the
# tests that fetch models over S3. Prints the bin folder on stdout; logs go to stderr.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib/go-build.sh"

VERSION="$(required versitygw github.com/versity/versitygw)"
bin_folder versitygw "$VERSION-$(modules_hash versitygw)"

started=$SECONDS
if ! complete versitygw; then
  # Its Makefile stamps the version the same way (`versitygw --version` says "git" otherwise).
  build versitygw "-X main.Version=$VERSION" versitygw github.com/versity/versitygw/cmd/versitygw
fi
echo "s3-server.sh: versitygw $VERSION ready in $BIN ($((SECONDS - started)) s)" >&2
echo "$BIN"
