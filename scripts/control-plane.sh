#!/usr/bin/env bash
# Builds (once) the Kubernetes control plane that the end-to-end tests start on 127.0.0.1:
# kube-apiserver, kube-controller-manager, kube-scheduler, etcd, kwok and helm, each from its
# official Go module pinned in tests/cluster/<name>/go.mod (+ go.sum).
# The binaries live outside the repository, in a folder keyed by their versions, and each one is
# rebuilt only when its .complete marker is missing. Prints the bin folder on stdout; logs go to
# stderr. Go's own build and module caches stay at their defaults (go env GOCACHE GOMODCACHE).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib/go-build.sh"

K8S_VERSION="$(required kubernetes k8s.io/kubernetes)"
ETCD_VERSION="$(required etcd go.etcd.io/etcd/server/v3)"
KWOK_VERSION="$(required kwok sigs.k8s.io/kwok)"
HELM_VERSION="$(required helm helm.sh/helm/v3)"

bin_folder control-plane \
  "k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION-$(modules_hash kubernetes etcd kwok helm)"

total=$SECONDS

if ! complete kube-apiserver kube-controller-manager kube-scheduler; then
  build kubernetes "$(k8s_version_ldflags "$K8S_VERSION")" \
    kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver \
    kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager \
    kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler
fi

if ! complete etcd; then
  build etcd "" etcd go.etcd.io/etcd/server/v3
fi

if ! complete kwok; then
  build kwok "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" kwok sigs.k8s.io/kwok/cmd/kwok
fi

if ! complete helm; then
  # As helm's Makefile does: its version, and the Kubernetes version of its client-go as the
  # default capabilities (major + 1 of v0.x).
  cgo="$(cd "$MODULES/helm" && go list -m -f '{{.Version}}' k8s.io/client-go)"
  cminor="${cgo#v0.}"; cminor="${cminor%%.*}"
  ldflags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.metadata="
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$cminor"
  done
  build helm "$ldflags" helm helm.sh/helm/v3/cmd/helm
fi

echo "control-plane.sh: binaries ready in $BIN ($((SECONDS - total)) s)" >&2
echo "$BIN"
