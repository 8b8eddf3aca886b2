#!/usr/bin/env bash
# Installs (once) the Debian packages that the real node and the image builds use: runc (the
# container runtime under containerd), nftables (kube-proxy's nftables mode), mmdebstrap (base
# root filesystems from Debian's archive), buildah (builds the Dockerfiles without a daemon) and
# umoci. Needs root, as the real node does.
set -euo pipefail
# Callers may run at once (make test's background build, a test building images): apt takes
# turns badly, so they take turns here.
lock="${KZC_CACHE:-$HOME/.cache/kube-zerocopy}/host-packages.lock"
mkdir -p "$(dirname "$lock")"
exec 9>"$lock"
flock 9
packages=(runc nftables mmdebstrap buildah umoci)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "host-packages.sh: installing ${missing[*]} from Debian's archive" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq "${missing[@]}" >&2
