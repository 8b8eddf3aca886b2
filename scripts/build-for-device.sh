#!/usr/bin/env bash
# Builds kube-zerocopy-weight-server and kube-zerocopy-worker against another torch release (the one a
# GPU machine has, which cannot fetch anything) into .device/bin, for scripts/gpu-check.sh:
#
#   scripts/build-for-device.sh 2.11.0     # then carry .device/bin to the GPU machine
#
# The torch wheel (CUDA build, from PyPI) is downloaded once and its include/ and lib/ kept in
# ~/.cache/kube-zerocopy/device-<torch>; the workspace is built from HEAD in a copy whose tch
# and torch-sys are the release made for that torch (tch pins one libtorch version each).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${1:?usage: $0 TORCH_VERSION (2.10.0, 2.11.0 or 2.13.0)}
case "$TORCH" in
  2.10.0) TCH=0.23.0 ;;
  2.11.0) TCH=0.24.0 ;;
  2.13.0) TCH=0.26.0 ;;
  *) echo "no tch release known for torch $TORCH" >&2; exit 2 ;;
esac
CACHE=~/.cache/kube-zerocopy/device-$TORCH
LIBTORCH=$CACHE/torch
if [ ! -f "$LIBTORCH/lib/libtorch_cuda.so" ]; then
  mkdir -p "$CACHE/wheel"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 -d "$CACHE/wheel" "torch==$TORCH"
  unzip -q -o "$CACHE"/wheel/torch-"$TORCH"-*.whl 'torch/include/*' 'torch/lib/*' -d "$CACHE"
  rm -rf "$CACHE/wheel"
fi
SRC=$CACHE/src
rm -rf "$SRC" && mkdir -p "$SRC"
git archive HEAD | tar -x -C "$SRC"
sed -i "s/^tch = .*/tch = \"=$TCH\"/; s/^torch-sys = .*/torch-sys = \"=$TCH\"/" "$SRC/Cargo.toml"
# libtorch_cuda's CUDA libraries are not on this machine: leave their symbols to the loader there.
(
  cd "$SRC"
  unset LIBTORCH_USE_PYTORCH
  LIBTORCH=$LIBTORCH KZC_TORCH_DIR=$LIBTORCH LIBTORCH_CXX11_ABI=1 CARGO_TARGET_DIR=$CACHE/target \
    RUSTFLAGS="-C link-arg=-Wl,--allow-shlib-undefined" \
    cargo build --release -p kube-zerocopy-worker -p kube-zerocopy-weight-server --bins
)
mkdir -p .device/bin
for b in kube-zerocopy-weight-server kube-zerocopy-worker; do
  strip -o ".device/bin/$b" "$CACHE/target/release/$b"
done
ls -la .device/bin
