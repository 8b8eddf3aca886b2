#!/usr/bin/env bash
# Smoke check of the images from scripts/images.sh, without a daemon: each OCI archive is unpacked
# with umoci and run with runc as the image's user (65532, 65535 for pause) with a read-only root,
# as the operator's pods run. The runtime image publishes a small TorchScript model with its
# sidecar and runs it with its worker (libtorch loads and computes); the operator answers --help;
# pause exits 0 on SIGTERM; the CPU image refuses `--device cuda` by name, and runtime-cuda (when
# listed) loads libtorch's CUDA backend.
#   scripts/images.sh | scripts/images-check.sh      or      scripts/images-check.sh LIST
# where LIST holds images.sh's output (`NAME PATH` per line). Needs root (runc).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "images-check.sh: $*" >&2; }
die() { log "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (runc)"
"$ROOT/scripts/host-packages.sh" || die "installing the host packages (scripts/host-packages.sh) failed"
for tool in umoci runc python3; do command -v "$tool" >/dev/null || die "$tool is not installed"; done

declare -A ARCHIVE
while read -r name path; do
  [ -n "$name" ] || continue
  [ -f "$path" ] || die "$name: no archive at $path"
  case "$name" in
    */operator:*) ARCHIVE[operator]="$name $path" ;;
    */runtime:*) ARCHIVE[runtime]="$name $path" ;;
    */runtime-cuda:*) ARCHIVE[runtime-cuda]="$name $path" ;;
    */pause:*) ARCHIVE[pause]="$name $path" ;;
    *) die "unknown image $name" ;;
  esac
done < "${1:-/dev/stdin}"
for i in operator runtime pause; do [ -n "${ARCHIVE[$i]:-}" ] || die "no $i image in the list"; done

WORK="$(mktemp -d)"
CONTAINERS=()
cleanup() {
  local c
  for c in "${CONTAINERS[@]}"; do runc delete --force "$c" >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# unpack KEY: the image as a runc bundle in $WORK/KEY (umoci writes config.json from the image's
# config: entrypoint, env, user).
unpack() {
  local key="$1" name path
  read -r name path <<<"${ARCHIVE[$key]}"
  mkdir -p "$WORK/$key.layout"
  tar -xf "$path" -C "$WORK/$key.layout" || die "$key: $path is not a tar archive"
  umoci unpack --image "$WORK/$key.layout:$name" "$WORK/$key" >/dev/null 2>"$WORK/$key.err" \
    || die "$key: umoci unpack of $name from $path: $(cat "$WORK/$key.err")"
  cp "$WORK/$key/config.json" "$WORK/$key.config.json"
}

# spec KEY ARGS_JSON [MOUNTS_JSON [ENV_JSON]]: the bundle's config (umoci's, from the image) with
# a read-only root, no terminal, these arguments, extra bind mounts ([[host, container, ro|rw],
# ...]) and extra variables.
spec() {
  python3 - "$WORK/$1.config.json" "$WORK/$1/config.json" "$2" "${3:-[]}" "${4:-[]}" <<'EOF'
import json, sys
orig, path, args, mounts, env = *sys.argv[1:3], *map(json.loads, sys.argv[3:])
c = json.load(open(orig))
c["root"]["readonly"] = True
c["process"]["terminal"] = False
c["process"]["args"] = args
c["process"]["env"] = c["process"].get("env", []) + env
c["process"]["noNewPrivileges"] = True
for src, dst, mode in mounts:
    c["mounts"].append({"destination": dst, "type": "bind", "source": src,
                        "options": ["rbind", "nosuid", "nodev", mode]})
json.dump(c, open(path, "w"), indent=1)
EOF
}

# run KEY: runs the bundle in the foreground, output in $WORK/KEY.out; fails with it.
run() {
  local id="kzc-check-$1-$$"
  CONTAINERS+=("$id")
  runc run --bundle "$WORK/$1" "$id" </dev/null >"$WORK/$1.out" 2>&1
}

user_of() { python3 -c 'import json, sys; u = json.load(open(sys.argv[1]))["process"]["user"]; print(u["uid"], u["gid"], sep=":")' "$WORK/$1.config.json"; }

# ---- operator ---------------------------------------------------------------------------------
unpack operator
[ "$(user_of operator)" = 65532:65532 ] || die "operator: runs as $(user_of operator), not 65532:65532"
spec operator '["/usr/local/bin/kube-zerocopy", "--help"]'
run operator || die "operator: kube-zerocopy --help: $(cat "$WORK/operator.out")"
grep -q -i usage "$WORK/operator.out" || die "operator: no usage in: $(cat "$WORK/operator.out")"
log "operator: kube-zerocopy --help ok as 65532 with a read-only root"

# ---- runtime: --help, then sidecar publishes and worker runs a model --------------------------
unpack runtime
[ "$(user_of runtime)" = 65532:65532 ] || die "runtime: runs as $(user_of runtime), not 65532:65532"
for bin in kube-zerocopy-weight-server kube-zerocopy-worker kube-zerocopy-agent; do
  spec runtime "[\"/usr/local/bin/$bin\", \"--help\"]"
  run runtime || die "runtime: $bin --help: $(cat "$WORK/runtime.out")"
  log "runtime: $bin --help ok"
done
# The model and input come from the project's generator (host torch); the store and bindings
# are host folders shared by the two containers as a pod's emptyDirs are.
# shellcheck source=scripts/env.sh
source "$ROOT/scripts/env.sh"
mkdir -p "$WORK/models" "$WORK/input" "$WORK/kzc/store" "$WORK/kzc/bindings" "$WORK/out"
python "$ROOT/scripts/make_models.py" script "$WORK/models/model.pt" --sizes 16,32,8 >&2
python "$ROOT/scripts/make_models.py" inputs "$WORK/input" --shards 1 --batch 4 --features 16 >&2
inputs=("$WORK"/input/*.safetensors)
input="${inputs[0]##*/}"
chown -R 65532:65532 "$WORK/kzc" "$WORK/out"
chmod -R a+rX "$WORK/models" "$WORK/input"
models='["KZC_MODELS=[{\"name\":\"m\",\"format\":\"TorchScript\",\"uri\":\"file:///models/model.pt\"}]"]'
spec runtime '["/usr/local/bin/kube-zerocopy-weight-server", "publish"]' \
  "[[\"$WORK/models\", \"/models\", \"ro\"], [\"$WORK/kzc/store\", \"/kzc/store\", \"rw\"], [\"$WORK/kzc/bindings\", \"/kzc/bindings\", \"rw\"]]" \
  "$models"
run runtime || die "runtime: kube-zerocopy-weight-server publish: $(cat "$WORK/runtime.out")"
log "runtime: the sidecar published the model as 65532"
spec runtime "[\"/usr/local/bin/kube-zerocopy-worker\", \"inspect\", \"--input-file\", \"/input/$input\", \"--output-file\", \"/out/output.safetensors\"]" \
  "[[\"$WORK/input\", \"/input\", \"ro\"], [\"$WORK/kzc/store\", \"/kzc/store\", \"ro\"], [\"$WORK/kzc/bindings\", \"/kzc/bindings\", \"ro\"], [\"$WORK/out\", \"/out\", \"rw\"]]" \
  "$models"
run runtime || die "runtime: kube-zerocopy-worker inspect: $(cat "$WORK/runtime.out")"
[ -s "$WORK/out/output.safetensors" ] || die "runtime: the worker wrote no output: $(cat "$WORK/runtime.out")"
# The host's worker on the same publication must compute the same bytes.
KZC_MODELS="[{\"name\":\"m\",\"format\":\"TorchScript\",\"uri\":\"file://$WORK/models/model.pt\"}]" \
  "$KZC_RELEASE/kube-zerocopy-worker" --store "$WORK/kzc/store" --bindings "$WORK/kzc/bindings" \
  inspect --input-file "$WORK/input/$input" --output-file "$WORK/out/host.safetensors" >/dev/null \
  || die "the host's worker could not run the same model for comparison"
cmp -s "$WORK/out/output.safetensors" "$WORK/out/host.safetensors" \
  || die "runtime: the image's output differs from the host worker's"
log "runtime: kube-zerocopy-worker mapped the published model and ran it with libtorch (output = host's)"

# `--device cuda` loads libtorch's CUDA backend first: the CPU image must refuse it by name, the
# CUDA image must load it (all its libraries resolve) and then find no GPU on a machine without
# one. With a GPU here the CUDA image is left to scripts/gpu-check.sh.
cuda_refusal() {
  spec "$1" '["/usr/local/bin/kube-zerocopy-worker", "--device", "cuda", "inspect", "--input-file", "/nonexistent"]'
  if run "$1"; then die "$1: --device cuda succeeded without a GPU: $(cat "$WORK/$1.out")"; fi
  grep -q "$2" "$WORK/$1.out" || die "$1: --device cuda: expected \"$2\" in: $(cat "$WORK/$1.out")"
  log "$1: --device cuda: $2"
}
cuda_refusal runtime "cannot load libtorch's CUDA backend"
if [ -n "${ARCHIVE[runtime-cuda]:-}" ]; then
  if ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
    log "runtime-cuda: a GPU is here; not checked (scripts/gpu-check.sh runs the cuda path)"
  else
    unpack runtime-cuda
    [ "$(user_of runtime-cuda)" = 65532:65532 ] || die "runtime-cuda: runs as $(user_of runtime-cuda), not 65532:65532"
    cuda_refusal runtime-cuda "libtorch sees no CUDA device"
  fi
fi

# ---- pause --------------------------------------------------------------------------------------
unpack pause
[ "$(user_of pause)" = 65535:65535 ] || die "pause: runs as $(user_of pause), not 65535:65535"
spec pause '["/pause"]'
id="kzc-check-pause-$$"
CONTAINERS+=("$id")
runc run --bundle "$WORK/pause" "$id" </dev/null >"$WORK/pause.out" 2>&1 &
pid=$!
for _ in $(seq 100); do
  runc state "$id" 2>/dev/null | grep -q '"status": "running"' && break
  sleep 0.1
done
runc state "$id" 2>/dev/null | grep -q '"status": "running"' || die "pause: did not start: $(cat "$WORK/pause.out")"
sleep 0.5
runc state "$id" 2>/dev/null | grep -q '"status": "running"' || die "pause: exited by itself"
runc kill "$id" TERM
rc=0
wait "$pid" || rc=$?
[ "$rc" = 0 ] || die "pause: exit status $rc after SIGTERM: $(cat "$WORK/pause.out")"
log "pause: ran as 65535 and exited 0 on SIGTERM"
log "all images ok"
