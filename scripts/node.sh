#!/usr/bin/env bash
# Builds (once) what a real node of the end-to-end tests runs besides the control plane: the
# kubelet and kube-proxy (the control plane's release), containerd 2 with its runc shim and ctr,
# and the CNI plugins, each from its official Go module pinned in tests/cluster/<name>/go.mod.
# runc, the image tools and nft come from Debian's packages (scripts/host-packages.sh).
# Prints the bin folder on stdout; logs go to stderr.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib/go-build.sh"
"$(dirname "${BASH_SOURCE[0]}")/host-packages.sh"

K8S_VERSION="$(required kubernetes k8s.io/kubernetes)"
CONTAINERD_VERSION="$(required containerd github.com/containerd/containerd/v2)"
CNI_VERSION="$(required cni github.com/containernetworking/plugins)"

bin_folder node \
  "k8s-$K8S_VERSION-containerd-$CONTAINERD_VERSION-cni-$CNI_VERSION-$(modules_hash kubernetes containerd cni)"

total=$SECONDS

if ! complete kubelet kube-proxy; then
  build kubernetes "$(k8s_version_ldflags "$K8S_VERSION")" \
    kubelet k8s.io/kubernetes/cmd/kubelet \
    kube-proxy k8s.io/kubernetes/cmd/kube-proxy
fi

if ! complete containerd containerd-shim-runc-v2 ctr; then
  pkg=github.com/containerd/containerd/v2
  build containerd "-X $pkg/version.Version=$CONTAINERD_VERSION -X $pkg/version.Package=$pkg" \
    containerd $pkg/cmd/containerd \
    containerd-shim-runc-v2 $pkg/cmd/containerd-shim-runc-v2 \
    ctr $pkg/cmd/ctr
fi

if ! complete bridge host-local loopback portmap; then
  pkg=github.com/containernetworking/plugins
  build cni "-X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$CNI_VERSION" \
    bridge $pkg/plugins/main/bridge \
    host-local $pkg/plugins/ipam/host-local \
    loopback $pkg/plugins/main/loopback \
    portmap $pkg/plugins/meta/portmap
fi

echo "node.sh: binaries ready in $BIN ($((SECONDS - total)) s)" >&2
echo "$BIN"
