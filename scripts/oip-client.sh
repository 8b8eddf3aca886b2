#!/usr/bin/env bash
# Installs (once) NVIDIA's Triton client for the Open Inference Protocol (tritonclient[http],
# pinned), with which the tests talk to an actor replica as existing clients do
# (scripts/oip-client.py). Prints the virtual environment's folder on stdout; logs go to stderr.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib/pip-venv.sh"

CLIENT="tritonclient[http]==2.73.0"
DIR="${KZC_CACHE:-$HOME/.cache/kube-zerocopy}/oip-client/2.73.0"
mkdir -p "$(dirname "$DIR")"
# The lock (file descriptor 9, held until the script exits) makes a second caller wait for the
# first one's install; an interrupted install is not marked complete and is done again.
exec 9>"$DIR.lock"
flock 9
pip_venv "$DIR" "$DIR/.complete" "$CLIENT"
echo "$DIR"
