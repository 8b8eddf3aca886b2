# Sourced by the Makefile targets: puts the project's torch environment first on PATH so that
# tch (LIBTORCH_USE_PYTORCH) and the worker's C++ shim build against it, and libtorch on the loader path.
VENV="$("$(dirname "${BASH_SOURCE[0]}")/setup-torch.sh")"
export PATH="$VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export KZC_VENV="$VENV"
TORCH_DIR="$("$VENV/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
export KZC_TORCH_DIR="$TORCH_DIR"
export LD_LIBRARY_PATH="$TORCH_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
