#!/usr/bin/env bash
# Builds (once) the Kubernetes control plane that the end-to-end tests start on 127.0.0.1:
# kube-apiserver, kube-controller-manager, kube-scheduler, etcd, kwok and helm, each from its
# official Go module pinned in tests/cluster/<name>/go.mod (+ go.sum).
# The binaries live outside the repository, in a folder keyed by their versions, and each one is
# rebuilt only when its .complete marker is missing. Prints the bin folder on stdout; logs go to
# stderr. Go's own build and module caches stay at their defaults (go env GOCACHE GOMODCACHE).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODULES="$ROOT/tests/cluster"
export GOTOOLCHAIN=local
export CGO_ENABLED=0
# The go.sum files are committed: never let a build rewrite them.
export GOFLAGS="-mod=readonly"

# The version that tests/cluster/<dir>/go.mod requires of module <path>.
required() {
  awk -v m="$2" '$1 == "require" && $2 == m { print $3; exit } $1 == m { print $2; exit }' \
    "$MODULES/$1/go.mod"
}

K8S_VERSION="$(required kubernetes k8s.io/kubernetes)"
ETCD_VERSION="$(required etcd go.etcd.io/etcd/server/v3)"
KWOK_VERSION="$(required kwok sigs.k8s.io/kwok)"
HELM_VERSION="$(required helm helm.sh/helm/v3)"
for v in "$K8S_VERSION" "$ETCD_VERSION" "$KWOK_VERSION" "$HELM_VERSION"; do
  [ -n "$v" ] || { echo "control-plane.sh: cannot read a version from tests/cluster/*/go.mod" >&2; exit 1; }
done

CACHE="${KZC_CACHE:-$HOME/.cache/kube-zerocopy}"
KEY="k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION"
DIR="$CACHE/control-plane/$KEY"
BIN="$DIR/bin"
mkdir -p "$BIN"

complete() {
  local b
  for b in "$@"; do
    [ -f "$BIN/.$b.complete" ] && [ -x "$BIN/$b" ] || return 1
  done
}

# Runs `go build` in tests/cluster/<dir> into a scratch folder, then moves the binaries into
# place and marks each one complete.
build() {
  local dir="$1" ldflags="$2"; shift 2
  local -a pkgs=() names=()
  while [ $# -gt 0 ]; do names+=("$1"); pkgs+=("$2"); shift 2; done
  local out="$DIR/tmp-$dir"
  rm -rf "$out" && mkdir -p "$out"
  echo "control-plane.sh: building ${names[*]} in tests/cluster/$dir (this takes minutes)" >&2
  # One package: name its binary (go would call go.etcd.io/etcd/server/v3 "server").
  # Several: one go build into a folder, each binary named after its package.
  local dest="$out/"
  [ ${#pkgs[@]} -eq 1 ] && dest="$out/${names[0]}"
  local start=$SECONDS
  (cd "$MODULES/$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$dest" "${pkgs[@]}") >&2
  local n
  for n in "${names[@]}"; do
    mv -f "$out/$n" "$BIN/$n"
    touch "$BIN/.$n.complete"
  done
  rm -rf "$out"
  echo "control-plane.sh: built ${names[*]} in $((SECONDS - start)) s" >&2
}

# Two test processes may ask at once: one builds, the other waits.
exec 9>"$DIR/.lock"
flock 9

total=$SECONDS

if ! complete kube-apiserver kube-controller-manager kube-scheduler; then
  minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  ldflags=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  build kubernetes "$ldflags" \
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
