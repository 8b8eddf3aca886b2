# Sourced by control-plane.sh and node.sh: builds commands from the Go modules pinned in
# tests/cluster/<dir>/go.mod (+ go.sum) into a bin folder outside the repository, keyed by
# their versions; each binary is rebuilt only when its .complete marker is missing.
# The caller calls bin_folder first: it sets BIN (the bin folder) and DIR (its parent, for
# scratch space).

MODULES="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/tests/cluster"
export GOTOOLCHAIN=local
export CGO_ENABLED=0
# The go.sum files are committed: never let a build rewrite them.
export GOFLAGS="-mod=readonly"

# The version that tests/cluster/<dir>/go.mod requires of module <path>.
required() {
  local v
  v="$(awk -v m="$2" '$1 == "require" && $2 == m { print $3; exit } $1 == m { print $2; exit }' \
    "$MODULES/$1/go.mod")"
  [ -n "$v" ] || { echo "cannot read the version of $2 from tests/cluster/$1/go.mod" >&2; return 1; }
  echo "$v"
}

# A short hash of the go.mod files of tests/cluster/<dir>...: part of a bin folder's key, so
# that a change of any pinned dependency (not only of the commands' own versions) rebuilds.
modules_hash() {
  local d
  for d in "$@"; do cat "$MODULES/$d/go.mod"; done | sha256sum | cut -c1-12
}

# bin_folder GROUP KEY: the bin folder $CACHE/GROUP/KEY/bin, created, and its lock taken (on
# file descriptor 9, held until the script exits): two test processes may ask at once, one
# builds and the other waits.
bin_folder() {
  DIR="${KZC_CACHE:-$HOME/.cache/kube-zerocopy}/$1/$2"
  BIN="$DIR/bin"
  mkdir -p "$BIN"
  exec 9>"$DIR/.lock"
  flock 9
}

complete() {
  local b
  for b in "$@"; do
    [ -f "$BIN/.$b.complete" ] && [ -x "$BIN/$b" ] || return 1
  done
}

# build DIR LDFLAGS NAME PACKAGE [NAME PACKAGE ...]: one `go build` in tests/cluster/DIR into a
# scratch folder, then each binary moved into place and marked complete.
build() {
  local dir="$1" ldflags="$2"; shift 2
  local -a pkgs=() names=()
  while [ $# -gt 0 ]; do names+=("$1"); pkgs+=("$2"); shift 2; done
  local out="$DIR/tmp-$dir"
  rm -rf "$out" && mkdir -p "$out"
  echo "building ${names[*]} in tests/cluster/$dir (this takes minutes)" >&2
  # One package: name its binary (go would call go.etcd.io/etcd/server/v3 "server").
  # Several: one go build into a folder, each binary named after its package.
  local dest="$out/"
  [ ${#pkgs[@]} -eq 1 ] && dest="$out/${names[0]}"
  local start=$SECONDS
  (cd "$MODULES/$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$dest" "${pkgs[@]}") >&2
  local n
  for n in "${names[@]}"; do
    mv -f "$out/$n" "$BIN/$n"
    touch "$BIN/.$n.complete"
  done
  rm -rf "$out"
  echo "built ${names[*]} in $((SECONDS - start)) s" >&2
}

# The -X flags that stamp a Kubernetes command with its version (kubectl and helm check it).
k8s_version_ldflags() {
  local version="$1" minor pkg flags=""
  minor="${version#v1.}"; minor="${minor%%.*}"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$flags"
}
