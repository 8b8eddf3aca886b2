#!/usr/bin/env bash
# Installs (once) Azurite, Microsoft's Azure Storage emulator, from npm at the version pinned
# below, and beside it Microsoft's Python client (azure-storage-blob, pinned) with which the
# tests put and get blobs (scripts/azure-blob.py), so that the only Rust client in a test is
# the one under test. The tests that use Azure Blob start `azurite-blob` on 127.0.0.1.
# Prints the install folder on stdout (node_modules/.bin/azurite-blob, client/bin/python);
# logs go to stderr.
# 3.35.0 is the newest release that runs on Node 20 (3.36.0 asks for >= 21, 3.37.0 for >= 22).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib/pip-venv.sh"

VERSION=3.35.0
CLIENT=azure-storage-blob==12.31.1

command -v node >/dev/null && command -v npm >/dev/null \
  || { echo "azure-server.sh: node and npm are needed to install azurite" >&2; exit 1; }

# The install lives outside the repository, keyed by the version; the lock (file descriptor 9,
# held until the script exits) makes a second caller wait for the first one's install.
DIR="${KZC_CACHE:-$HOME/.cache/kube-zerocopy}/azurite/$VERSION"
BIN="$DIR/node_modules/.bin"
mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock 9

started=$SECONDS
if ! { [ -f "$DIR/.azurite.complete" ] && [ -x "$BIN/azurite-blob" ]; }; then
  # Install into a scratch folder, then move it into place: an interrupted install leaves
  # nothing that looks complete.
  tmp="$DIR/tmp-install"
  rm -rf "$tmp" "$DIR/node_modules" "$DIR/package.json" "$DIR/package-lock.json"
  mkdir -p "$tmp"
  echo "installing azurite@$VERSION from npm (this takes a minute)" >&2
  npm install --prefix "$tmp" --no-audit --no-fund --omit=dev --loglevel=error \
    "azurite@$VERSION" >&2
  mv "$tmp/node_modules" "$tmp/package.json" "$tmp/package-lock.json" "$DIR/"
  rm -rf "$tmp"
  [ -x "$BIN/azurite-blob" ] || { echo "azure-server.sh: no $BIN/azurite-blob" >&2; exit 1; }
  touch "$DIR/.azurite.complete"
fi
pip_venv "$DIR/client" "$DIR/.client.complete" "$CLIENT"
echo "azure-server.sh: azurite v$VERSION ready in $BIN ($((SECONDS - started)) s)" >&2
echo "$DIR"
