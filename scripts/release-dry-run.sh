#!/usr/bin/env bash
# make release-dry-run: everything a release does but the push. Builds the release images as OCI
# archives (scripts/images.sh), packages the chart, writes an SPDX SBOM of each image with syft
# (built from the module pinned in tests/cluster/syft/go.mod), and checks that the packaged
# chart's default images are exactly the images built, under the version's tags. Everything
# lands in out/release/ with its SHA256SUMS. Needs root, as images.sh does.
#   scripts/release-dry-run.sh          the operator and runtime images
#   scripts/release-dry-run.sh --cuda   and runtime-cuda
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { echo "release-dry-run: $*" >&2; }
die() { log "error: $*"; exit 1; }

CUDA=()
case "${1:-}" in
  "") ;;
  --cuda) CUDA=(--cuda) ;;
  *) echo "usage: $0 [--cuda]" >&2; exit 2 ;;
esac

# One version for the crates, the chart and its app: the images' tags.
VERSION="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)"
CHART_VERSION="$(sed -n 's/^version:[[:space:]]*//p' charts/kube-zerocopy/Chart.yaml)"
APP_VERSION="$(sed -n 's/^appVersion:[[:space:]]*"\{0,1\}\([^"]*\)"\{0,1\}/\1/p' charts/kube-zerocopy/Chart.yaml)"
[ -n "$VERSION" ] || die "no [workspace.package] version in Cargo.toml"
[ "$CHART_VERSION" = "$VERSION" ] && [ "$APP_VERSION" = "$VERSION" ] \
  || die "the chart's version ($CHART_VERSION) and appVersion ($APP_VERSION) must be the crates' ($VERSION)"

OUT="$ROOT/out/release"
rm -rf "$OUT" && mkdir -p "$OUT"

# The images: NAME ARCHIVE per line; the pause image is the tests' own, not released.
mapfile -t built < <(scripts/images.sh "${CUDA[@]}" | grep -v '/pause:')
[ ${#built[@]} -gt 0 ] || die "scripts/images.sh built nothing"
declare -A archive_of
for line in "${built[@]}"; do
  name="${line%% *}"; archive="${line#* }"
  [[ "$name" == *":$VERSION" ]] || die "$name is not tagged $VERSION"
  archive_of["$name"]="$archive"
  cp "$archive" "$OUT/$(basename "${name%%:*}")-$VERSION.oci.tar"
done

# The chart, packaged as a release publishes it (helm from the tests' own build).
HELM="$(scripts/control-plane.sh)/helm"
"$HELM" package charts/kube-zerocopy --destination "$OUT" >&2 || die "helm package failed"
CHART="$OUT/kube-zerocopy-$VERSION.tgz"
[ -f "$CHART" ] || die "helm package wrote no $CHART"

# SBOMs, by syft, without a container engine: one of each image (what its files say: the
# Go modules the registrar is built from, the libraries), and one of the Rust crates every
# binary is built from (Cargo.lock: stripped Rust binaries do not list their crates). The
# distroless-like base keeps no dpkg status, so its Debian packages are named in images.sh
# (BASE_PACKAGES), not in the SBOMs.
SYFT="$(scripts/syft.sh)/syft"
count_packages() {
  python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["packages"]))' "$1"
}
sboms=0
for name in "${!archive_of[@]}"; do
  sbom="$OUT/$(basename "${name%%:*}")-$VERSION.spdx.json"
  "$SYFT" scan --quiet "oci-archive:${archive_of[$name]}" -o "spdx-json=$sbom" \
    || die "syft could not read $name"
  packages="$(count_packages "$sbom")"
  # The image itself is one: at least one component besides it.
  [ "$packages" -gt 1 ] || die "the SBOM of $name lists nothing in it"
  log "$name: SBOM of $packages packages"
  sboms=$((sboms + 1))
done
crates="$OUT/kube-zerocopy-crates-$VERSION.spdx.json"
"$SYFT" scan --quiet file:Cargo.lock -o "spdx-json=$crates" || die "syft could not read Cargo.lock"
packages="$(count_packages "$crates")"
[ "$packages" -gt 100 ] || die "the crates' SBOM lists only $packages packages"
log "the binaries' Rust crates: SBOM of $packages packages"
sboms=$((sboms + 1))

# The check: the chart's default images (every workload, the node agent's included, and the
# pipelines' runtime images the operator is told) are the images built, by name and tag.
referenced="$("$HELM" template kzc "$CHART" --set nodeStore.enabled=true \
  | python3 scripts/lib/chart_images.py)"
[ -n "$referenced" ] || die "the chart references no image"
missing=0
while read -r image; do
  if [ -n "${archive_of[$image]:-}" ]; then
    log "chart image $image: built"
  elif [[ "$image" == */runtime-cuda:* && ${#CUDA[@]} -eq 0 ]]; then
    log "chart image $image: not built (run with --cuda to build it)"
  else
    log "chart image $image: NOT BUILT"; missing=$((missing + 1))
  fi
done <<<"$referenced"
for name in "${!archive_of[@]}"; do
  grep -qxF "$name" <<<"$referenced" || die "$name is built but the chart does not use it"
done
[ "$missing" -eq 0 ] || die "$missing image(s) the chart uses were not built"

# What a release publishes as files (the images go to a registry, by digest): the chart and the
# SBOMs.
(cd "$OUT" && sha256sum -- *.tgz *.spdx.json >SHA256SUMS)
log "in $OUT:"; ls -l "$OUT" >&2
echo "release: ${#archive_of[@]} images, 1 chart, $sboms SBOMs, checked"
