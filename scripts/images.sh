#!/usr/bin/env bash
# Builds the operator, runtime and pause images from the committed Dockerfiles with buildah, with
# no container daemon and no registry: the binaries are built on the host and staged as the build
# context, and the base is a distroless-like Debian root filesystem made by mmdebstrap. Prints
# `NAME PATH` on stdout for each image: an OCI archive (`oci-archive:PATH:NAME` for containerd,
# skopeo, podman). Everything is cached by content under ${KZC_CACHE:-~/.cache/kube-zerocopy}/images.
# Needs root (mmdebstrap and buildah as root, as the real node does).
#   scripts/images.sh            operator, runtime (CPU) and pause
#   scripts/images.sh --cuda     and runtime-cuda (libtorch's CUDA backend; about 4 GB more)
set -euo pipefail

WITH_CUDA=0
case "${1:-}" in
  "") ;;
  --cuda) WITH_CUDA=1 ;;
  *) echo "usage: $0 [--cuda]" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KZC_CACHE:-$HOME/.cache/kube-zerocopy}/images"
SUITE=bookworm
# The base is what distroless's cc image holds (glibc, libgcc, libstdc++, CA certificates, no
# shell, no package manager), so the images behave the same on the Dockerfiles' default BASE.
# No libgomp1: libtorch loads the wheel's own libgomp, which the runtime image carries.
BASE_PACKAGES=(base-files libc6 libgcc-s1 libstdc++6 netbase ca-certificates)
# Tag of our pause image; bump it with tests/node/pause/pause.c so that a pinned tag names one program.
PAUSE_VERSION="${PAUSE_VERSION:-1.0}"
# Sonames the binaries may take from the base; anything else must come from the torch wheel.
BASE_SONAMES='^(linux-vdso\.so\.1|ld-linux-x86-64\.so\.2|/lib64/ld-linux-x86-64\.so\.2|libc\.so\.6|libm\.so\.6|libdl\.so\.2|libpthread\.so\.0|librt\.so\.1|libutil\.so\.1|libgcc_s\.so\.1|libstdc\+\+\.so\.6)$'

log() { echo "images.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

start=$SECONDS
[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap and buildah run as root here)"
"$ROOT/scripts/host-packages.sh" || die "installing the host packages (scripts/host-packages.sh) failed"
for tool in buildah mmdebstrap gcc go strip sha256sum python3; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done

# shellcheck source=scripts/env.sh
source "$ROOT/scripts/env.sh"
# Always: quick when up to date, and the images never package stale binaries.
(cd "$ROOT" && cargo build --release --workspace --bins) >&2 || die "cargo build --release failed"
log "binaries up to date after $((SECONDS - start)) s"
REL="$KZC_RELEASE"

APP_VERSION="$(sed -n 's/^appVersion:[[:space:]]*"\{0,1\}\([^"[:space:]]*\)"\{0,1\}.*$/\1/p' "$ROOT/charts/kube-zerocopy/Chart.yaml")"
[ -n "$APP_VERSION" ] || die "no appVersion in charts/kube-zerocopy/Chart.yaml"

mkdir -p "$CACHE"
# One build at a time per cache: buildah's storage and the archives are shared.
exec 9>"$CACHE/.lock"
flock 9
WORK="$(mktemp -d "$CACHE/.work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# ---- the base root filesystem ------------------------------------------------------------------

# The extract variant runs no maintainer scripts: users, /tmp and the CA bundle are made here;
# manuals and docs go (the copyright files stay, as in distroless). It runs as `sh -c HOOK exec ROOT`.
# shellcheck disable=SC2016
BASE_HOOK='set -e
r="$1"
printf "%s\n" "root:x:0:0:root:/root:/sbin/nologin" "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin" "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin" >"$r/etc/passwd"
printf "%s\n" "root:x:0:" "nobody:x:65534:" "nonroot:x:65532:" >"$r/etc/group"
mkdir -p "$r/tmp" "$r/root" "$r/home/nonroot" "$r/etc/ssl/certs"
chmod 1777 "$r/tmp"
chmod 0700 "$r/root" "$r/home/nonroot"
chown 65532:65532 "$r/home/nonroot"
cat "$r"/usr/share/ca-certificates/mozilla/*.crt >"$r/etc/ssl/certs/ca-certificates.crt"
rm -rf "$r/usr/share/man" "$r/usr/share/info"
find "$r/usr/share/doc" -type f ! -name copyright -delete'
BASE_KEY="$(printf '%s\n' "$SUITE" "${BASE_PACKAGES[@]}" "$BASE_HOOK" | sha256sum | cut -c1-16)"
BASE_TAR="$CACHE/base-$SUITE-$BASE_KEY.tar"

# The host's own Debian entries for the suite (one-line and deb822 files), so the base comes from
# wherever apt works here (a mirror, a proxy); third-party repositories are left out.
debian_sources() {
  local files=()
  [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
  shopt -s nullglob
  files+=(/etc/apt/sources.list.d/*.list)
  [ ${#files[@]} -gt 0 ] && awk -v suite="$SUITE" '
    /^[ \t]*deb[ \t]/ {
      line = $0; sub(/#.*/, "", line); opts = ""
      if (match(line, /\[[^]]*\]/)) {
        opts = substr(line, RSTART, RLENGTH) " "
        line = substr(line, 1, RSTART - 1) substr(line, RSTART + RLENGTH)
      }
      n = split(line, f, " ")
      if (f[3] == suite || f[3] == suite "-updates" || f[3] == suite "-security") {
        comps = ""; for (i = 4; i <= n; i++) comps = comps " " f[i]
        print "deb " opts f[2] " " f[3] comps
      }
    }' "${files[@]}"
  files=(/etc/apt/sources.list.d/*.sources)
  shopt -u nullglob
  [ ${#files[@]} -gt 0 ] && awk -v suite="$SUITE" '
    function flush(   n, m, i, j, u, s) {
      if (types ~ /(^| )deb( |$)/ && tolower(enabled) != "no") {
        n = split(uris, u, " "); m = split(suites, s, " ")
        for (i = 1; i <= n; i++) for (j = 1; j <= m; j++)
          if (s[j] == suite || s[j] == suite "-updates" || s[j] == suite "-security")
            print "deb " (signed ~ /^\// ? "[signed-by=" signed "] " : "") u[i] " " s[j] " " comps
      }
      types = uris = suites = comps = signed = enabled = ""
    }
    FNR == 1 { flush() }
    /^[ \t]*#/ { next }
    /^[ \t]*$/ { flush(); next }
    /^[ \t]/ { next }
    {
      key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^[ \t]+/, ""); val = $0
      if (key == "types") types = val; else if (key == "uris") uris = val
      else if (key == "suites") suites = val; else if (key == "components") comps = val
      else if (key == "signed-by") signed = val; else if (key == "enabled") enabled = val
    }
    END { flush() }' "${files[@]}"
  return 0
}

if [ ! -f "$BASE_TAR" ]; then
  mapfile -t mirrors < <(debian_sources)
  if [ ${#mirrors[@]} -eq 0 ]; then
    log "no $SUITE entry in the host's apt sources; mmdebstrap uses its default mirror"
  else
    log "base from the host's apt sources: ${mirrors[*]}"
  fi
  log "building the base root filesystem ($SUITE: ${BASE_PACKAGES[*]}) into $BASE_TAR"
  mmdebstrap --quiet --variant=extract --include="$(IFS=,; echo "${BASE_PACKAGES[*]}")" \
    --extract-hook="$BASE_HOOK" "$SUITE" "$WORK/base.tar" "${mirrors[@]}" >&2 \
    || die "mmdebstrap of the $SUITE base failed (is Debian's archive reachable with apt here?)"
  mv "$WORK/base.tar" "$BASE_TAR"
  # The base is not byte-reproducible (live archive): one per key is enough.
  find "$CACHE" -maxdepth 1 -name 'base-*.tar' ! -name "${BASE_TAR##*/}" -delete
fi

# ---- buildah ----------------------------------------------------------------------------------

# A private store (overlay where the kernel and file system allow it, else vfs), one per driver
# so that a store is never opened with another driver. KZC_BUILDAH_DRIVER=vfs forces one.
driver=
for d in ${KZC_BUILDAH_DRIVER:-overlay vfs}; do
  B=(buildah --root "$CACHE/buildah-$d/root" --runroot "$CACHE/buildah-$d/run" --storage-driver "$d")
  if "${B[@]}" images >/dev/null 2>"$WORK/driver.err"; then driver=$d; break; fi
  log "buildah storage driver $d does not work here: $(tr '\n' ' ' <"$WORK/driver.err")"
done
[ -n "$driver" ] || die "no buildah storage driver works here (tried ${KZC_BUILDAH_DRIVER:-overlay vfs})"
log "buildah storage: $CACHE/buildah-$driver ($driver)"

BASE_IMAGE="localhost/kube-zerocopy/base:$SUITE-$BASE_KEY"
if ! "${B[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  log "importing $BASE_TAR as $BASE_IMAGE"
  ctr="$("${B[@]}" from scratch)" || die "buildah from scratch failed"
  "${B[@]}" add "$ctr" "$BASE_TAR" / >&2 || die "adding the base tar failed"
  # What distroless's :nonroot sets, so that a Dockerfile behaves the same on both bases.
  "${B[@]}" config --user 65532:65532 --workingdir /home/nonroot \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt "$ctr" >&2
  "${B[@]}" commit --quiet --rm "$ctr" "$BASE_IMAGE" >&2 || die "committing the base image failed"
  # Older bases are no longer referenced by any build.
  for old in $("${B[@]}" images --format '{{.Name}}:{{.Tag}}'); do
    if [[ "$old" == localhost/kube-zerocopy/base:* && "$old" != "$BASE_IMAGE" ]]; then
      "${B[@]}" rmi "$old" >&2 || log "could not remove $old from buildah's store"
    fi
  done
fi

# ---- the images -------------------------------------------------------------------------------

# build NAME DOCKERFILE CONTEXT TAG BASE_IMAGE|scratch: builds unless an archive for the same
# content (Dockerfile, every staged file and its mode, the base, the tag) exists; prints its path.
build() {
  local name="$1" dockerfile="$2" ctx="$3" tag="$4" base="$5" key archive
  key="$({
    echo "$tag $base"
    sha256sum <"$dockerfile"
    cd "$ctx"
    find . -printf '%y %m %p\n' | LC_ALL=C sort
    find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-16)"
  archive="$CACHE/$name-$key.oci.tar"
  if [ -f "$archive" ]; then
    log "$tag: up to date ($archive)"
  else
    log "$tag: building from ${dockerfile#"$ROOT"/}"
    local args=(--pull=never --isolation chroot --quiet -f "$dockerfile" -t "$tag")
    [ "$base" = scratch ] || args+=(--build-arg "BASE=$base")
    "${B[@]}" bud "${args[@]}" "$ctx" >&2 || die "buildah bud of ${dockerfile#"$ROOT"/} failed"
    "${B[@]}" push --quiet "$tag" "oci-archive:$WORK/$name.tar:$tag" >&2 \
      || die "exporting $tag to an OCI archive failed"
    uncompressed_size "$WORK/$name.tar" >"$WORK/$name.size" || die "reading $WORK/$name.tar failed"
    "${B[@]}" rmi "$tag" >/dev/null 2>&1 || log "could not remove $tag from buildah's store"
    mv "$WORK/$name.size" "${archive%.oci.tar}.size"
    mv "$WORK/$name.tar" "$archive"
    # Older archives of this image: its name, then a key of 16 characters (runtime-cuda's
    # archives do not match runtime's pattern).
    find "$CACHE" -maxdepth 1 -name "$name-$(printf '?%.0s' {1..16}).*" ! -name "$name-$key.*" -delete
  fi
  echo "$archive"
}

# The sum of an archive's layers, uncompressed (buildah 1.28 prints sizes rounded); kept next
# to the archive for the report.
uncompressed_size() {
  python3 - "$1" <<'EOF'
import gzip, json, sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    blob = lambda digest: t.extractfile("blobs/" + digest.replace(":", "/"))
    manifest = json.load(blob(json.load(t.extractfile("index.json"))["manifests"][0]["digest"]))
    total = 0
    for layer in manifest["layers"]:
        f = blob(layer["digest"])
        if layer["mediaType"].endswith("+gzip"):
            f = gzip.GzipFile(fileobj=f)
        while chunk := f.read(1 << 20):
            total += len(chunk)
print(total)
EOF
}

# The libraries the worker loads, resolved as at run time on the host (LD_LIBRARY_PATH from
# env.sh): those from the wheel go into the image, the others must be in the base.
check_deps() {
  local bin="$1" out
  out="$(ldd "$bin")" || die "ldd $bin failed"
  if grep -q 'not found' <<<"$out"; then die "$bin: libraries not found: $(grep 'not found' <<<"$out" | tr -s ' \t\n' ' ')"; fi
  awk '{print $1, ($2 == "=>" ? $3 : $1)}' <<<"$out"
}

stage_bin() { strip --strip-debug -o "$2" "$1" || die "strip $1 failed"; }

# stage_wheel_libs FILE LIBDIR: copies the libraries FILE loads from the torch wheel into LIBDIR,
# under the names the loader asks for (no symlinks); any other must be in the base.
venv="$(realpath "$KZC_VENV")"
stage_wheel_libs() {
  local file="$1" dir="$2" deps soname path
  deps="$(check_deps "$file")"
  while read -r soname path; do
    if [[ "$(realpath "$path")" == "$venv"/* ]]; then
      cp -L "$path" "$dir/$soname"
    elif ! [[ "$soname" =~ $BASE_SONAMES ]]; then
      die "${file##*/} needs $soname ($path): neither in the torch wheel nor in the base"
    fi
  done <<<"$deps"
}

# operator
ctx="$WORK/operator"
mkdir -p "$ctx"
deps="$(check_deps "$REL/kube-zerocopy")"
while read -r soname _; do
  [[ "$soname" =~ $BASE_SONAMES ]] || die "kube-zerocopy needs $soname, which the base does not have"
done <<<"$deps"
stage_bin "$REL/kube-zerocopy" "$ctx/kube-zerocopy"
OPERATOR_ARCHIVE="$(build operator "$ROOT/Dockerfile.operator" "$ctx" "docker.io/kube-zerocopy/operator:$APP_VERSION" "$BASE_IMAGE")"

# runtime
ctx="$WORK/runtime"
mkdir -p "$ctx/bin" "$ctx/lib"
# The weight server and the node agent need nothing beyond the base; the worker needs libtorch.
for program in kube-zerocopy-weight-server kube-zerocopy-agent; do
  deps="$(check_deps "$REL/$program")"
  while read -r soname _; do
    [[ "$soname" =~ $BASE_SONAMES ]] || die "$program needs $soname, which the base does not have"
  done <<<"$deps"
  stage_bin "$REL/$program" "$ctx/bin/$program"
done
# The node agent's registrar: Go, static, from its pinned module (agent/registrar/go.mod).
(cd "$ROOT/agent/registrar" && GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly \
  go build -trimpath -ldflags=-s -o "$ctx/bin/kube-zerocopy-registrar" .) >&2 \
  || die "go build of agent/registrar failed"
stage_wheel_libs "$REL/kube-zerocopy-worker" "$ctx/lib"
[ -f "$ctx/lib/libtorch_cpu.so" ] || die "kube-zerocopy-worker does not load libtorch_cpu.so from $KZC_VENV"
stage_bin "$REL/kube-zerocopy-worker" "$ctx/bin/kube-zerocopy-worker"
log "runtime libraries: $(cd "$ctx/lib" && echo *)"
RUNTIME_ARCHIVE="$(build runtime "$ROOT/Dockerfile.runtime" "$ctx" "docker.io/kube-zerocopy/runtime:$APP_VERSION" "$BASE_IMAGE")"

# runtime-cuda: the runtime's programs and libraries, plus what `--device cuda` loads at run time:
# libtorch_cuda.so (the worker dlopens it) and libtorch_cuda_linalg.so (libtorch dlopens it for
# linear algebra), with their libraries, and the libraries that cuDNN and NVRTC dlopen themselves.
# The driver (libcuda.so.1) is the node's, mounted by the NVIDIA container toolkit.
if [ "$WITH_CUDA" = 1 ]; then
  ctx="$WORK/runtime-cuda"
  cp -a "$WORK/runtime" "$ctx"
  torch_lib="$(realpath "$KZC_TORCH_DIR/lib")"
  nvidia="$(realpath "$KZC_TORCH_DIR/../nvidia")"
  for lib in "$torch_lib/libtorch_cuda.so" "$torch_lib/libtorch_cuda_linalg.so"; do
    [ -f "$lib" ] || die "$lib is missing: the torch wheel in $KZC_VENV is not a CUDA build"
    cp -L "$lib" "$ctx/lib/"
    stage_wheel_libs "$lib" "$ctx/lib"
  done
  cp -L "$nvidia"/cudnn/lib/libcudnn_*.so.* "$nvidia"/cu13/lib/libnvrtc-builtins.so.* "$ctx/lib/"
  log "runtime-cuda libraries: $(du -sh "$ctx/lib" | cut -f1)"
  CUDA_ARCHIVE="$(build runtime-cuda "$ROOT/Dockerfile.runtime" "$ctx" "docker.io/kube-zerocopy/runtime-cuda:$APP_VERSION" "$BASE_IMAGE")"
fi

# pause: static, so FROM scratch
ctx="$WORK/pause"
mkdir -p "$ctx"
gcc -static -Os -s -Wall -Wextra -Werror -o "$ctx/pause" "$ROOT/tests/node/pause/pause.c" \
  || die "compiling tests/node/pause/pause.c failed (static glibc: libc6-dev)"
PAUSE_ARCHIVE="$(build pause "$ROOT/tests/node/pause/Dockerfile" "$ctx" "docker.io/kube-zerocopy/pause:$PAUSE_VERSION" scratch)"

# ---- report -----------------------------------------------------------------------------------

human() { numfmt --to=iec-i --suffix=B --format='%.1f' "$1"; }
for a in "$OPERATOR_ARCHIVE" "$RUNTIME_ARCHIVE" ${CUDA_ARCHIVE:+"$CUDA_ARCHIVE"} "$PAUSE_ARCHIVE"; do
  name="$(basename "$a")"
  log "$(printf '%-12s %9s uncompressed, %9s archive  %s' "${name%-*}" \
    "$(human "$(cat "${a%.oci.tar}.size" 2>/dev/null || echo 0)")" "$(human "$(stat -c %s "$a")")" "$a")"
done
log "done in $((SECONDS - start)) s"
echo "docker.io/kube-zerocopy/operator:$APP_VERSION $OPERATOR_ARCHIVE"
echo "docker.io/kube-zerocopy/runtime:$APP_VERSION $RUNTIME_ARCHIVE"
echo "docker.io/kube-zerocopy/pause:$PAUSE_VERSION $PAUSE_ARCHIVE"
if [ -n "${CUDA_ARCHIVE:-}" ]; then echo "docker.io/kube-zerocopy/runtime-cuda:$APP_VERSION $CUDA_ARCHIVE"; fi
