# Sourced by the Makefile targets: puts the project's torch environment first on PATH so that
# tch (LIBTORCH_USE_PYTORCH) and the worker's C++ shim build against it, and libtorch on the loader path.
# Idempotent: sourcing it again (a test that runs a script that sources it) changes nothing, so
# cargo sees the same environment and does not rerun build scripts.
VENV="$("$(dirname "${BASH_SOURCE[0]}")/setup-torch.sh")"
case ":$PATH:" in *":$VENV/bin:"*) ;; *) export PATH="$VENV/bin:$PATH" ;; esac
export LIBTORCH_USE_PYTORCH=1
export KZC_VENV="$VENV"
# Where cargo puts release binaries: CI keeps its target folder outside the clone (.ci/run).
KZC_RELEASE="${CARGO_TARGET_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target}/release"
export KZC_RELEASE
if [ -z "${KZC_TORCH_DIR:-}" ]; then
  KZC_TORCH_DIR="$("$VENV/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
  export KZC_TORCH_DIR
fi
case ":${LD_LIBRARY_PATH:-}:" in
  *":$KZC_TORCH_DIR/lib:"*) ;;
  *) export LD_LIBRARY_PATH="$KZC_TORCH_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
esac
