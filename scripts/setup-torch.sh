#!/usr/bin/env bash
# Creates (once) the Python virtual environment that tch builds and links against.
# It lives outside the repository, keyed by the torch version, and is reused when present.
# Prints the environment's folder on stdout.
set -euo pipefail
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
CACHE="${KZC_CACHE:-$HOME/.cache/kube-zerocopy}"
VENV="$CACHE/torch-$TORCH_VERSION"
mkdir -p "$CACHE"
# One installer at a time: a second caller (another make target, a test sourcing env.sh) waits
# here instead of removing the environment the first is still installing.
exec 8>"$VENV.lock"
flock 8
if [ ! -f "$VENV/.complete" ]; then
  echo "installing torch $TORCH_VERSION into $VENV (once; about 5 GB)" >&2
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir "torch==$TORCH_VERSION" numpy safetensors >&2
  touch "$VENV/.complete"
fi
# What the tests use besides torch, pinned; added to an environment made before they were (the
# stamp names what is installed).
EXTRAS=("transformers==5.25.0")
if [ "$(cat "$VENV/.extras" 2>/dev/null)" != "${EXTRAS[*]}" ]; then
  echo "installing ${EXTRAS[*]} into $VENV" >&2
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir "${EXTRAS[@]}" >&2
  echo "${EXTRAS[*]}" > "$VENV/.extras"
fi
echo "$VENV"
