#!/usr/bin/env bash
# Builds (once) Kueue, the job queueing controller, from the module pinned in
# tests/cluster/kueue/go.mod; tests/env/src/kueue.rs runs it against the operator tests' API server.
# Prints the bin folder on stdout (kueue, and crds/ with Kueue's CustomResourceDefinitions of
# the same version, copied from the module); logs go to stderr.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib/go-build.sh"

VERSION="$(required kueue sigs.k8s.io/kueue)"
bin_folder kueue "$VERSION-$(modules_hash kueue)"

started=$SECONDS
if ! complete kueue; then
  build kueue "-X sigs.k8s.io/kueue/pkg/version.GitVersion=$VERSION" kueue sigs.k8s.io/kueue/cmd/kueue
fi
if [ ! -f "$BIN/crds/.complete" ]; then
  # The bases only: the kustomize overlays add conversion webhooks that the tests do not run.
  source_dir="$(cd "$MODULES/kueue" && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)/config/components/crd/bases"
  rm -rf "$BIN/crds" && mkdir -p "$BIN/crds"
  cp "$source_dir"/*.yaml "$BIN/crds/"
  chmod u+w "$BIN/crds"/*.yaml
  touch "$BIN/crds/.complete"
fi
echo "kueue.sh: kueue $VERSION ready in $BIN ($((SECONDS - started)) s)" >&2
echo "$BIN"
