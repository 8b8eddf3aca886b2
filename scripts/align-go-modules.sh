#!/usr/bin/env bash
# Maintainers' tool, run after changing a version in tests/cluster/{kubernetes,kwok,helm}/go.mod:
# every module two of them share is required at the highest version any of them selects, and
# the Kubernetes libraries that the kubernetes module replaces (its staging modules) are
# required and replaced the same way in kwok and helm.
#
# Why: Go's build cache reuses a compiled package only when its module path and required
# version (a replaced module counts by the version it replaces) and its whole dependency closure
# are identical. Aligned, a cold `make test` compiles client-go, api, apimachinery, grpc and
# their dependencies once instead of three times. The versions differ from each project's own
# by patch releases of the Kubernetes libraries and minor releases of golang.org/x, grpc and
# otel; the end-to-end tests run the binaries built this way.
#
# Usage: scripts/align-go-modules.sh
set -euo pipefail
cd "$(dirname "$0")/../tests/cluster"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod
DIRS=(kubernetes kwok helm)

list() { (cd "$1" && go list -m -f '{{.Path}} {{.Version}}{{with .Replace}} {{.Version}}{{end}}' all); }

lists=$(mktemp -d)
trap 'rm -rf "$lists"' EXIT
for d in "${DIRS[@]}"; do list "$d" >"$lists/$d"; done

python3 - "$lists" "${DIRS[@]}" <<'EOF'
import re, sys
from pathlib import Path

folder, dirs = Path(sys.argv[1]), sys.argv[2:]

def key(v):
    # Semantic version order, enough for Go module versions (pseudo-versions included).
    m = re.match(r"v(\d+)\.(\d+)\.(\d+)(-[^+]*)?", v)
    major, minor, patch, pre = m.groups()
    return (int(major), int(minor), int(patch), pre is None, pre or "")

selected = {}
for d in dirs:
    for line in (folder / d).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1]:
            selected.setdefault(parts[0], {})[d] = parts
replaced_by_kubernetes = {p: v["kubernetes"][2] for p, v in selected.items()
                          if "kubernetes" in v and len(v["kubernetes"]) == 3}
for d in dirs:
    mod = Path(d) / "go.mod"
    requires, replaces = [], []
    for path, by in sorted(selected.items()):
        if d not in by or len(by) < 2:
            continue
        if path in replaced_by_kubernetes:
            if d != "kubernetes":
                v = replaced_by_kubernetes[path]
                requires.append(f"\t{path} {v}")
                replaces.append(f"replace {path} => {path} {v}")
            continue
        top = max((b[1] for b in by.values()), key=key)
        if top != by[d][1]:
            requires.append(f"\t{path} {top}")
    text = mod.read_text()
    if requires:
        text += "\n// Aligned with the other test-cluster modules (scripts/align-go-modules.sh).\nrequire (\n" + "\n".join(requires) + "\n)\n"
    if replaces:
        text += "\n" + "\n".join(replaces) + "\n"
    mod.write_text(text)
    print(f"{d}: {len(requires)} requirements raised or pinned, {len(replaces)} replaced", file=sys.stderr)
EOF

# -e: tidy also resolves the imports of dependencies' tests, which the build does not need.
for d in "${DIRS[@]}"; do (cd "$d" && go mod tidy -e >/dev/null 2>&1); done
# Check: every shared module is now the same in all three.
for d in "${DIRS[@]}"; do list "$d" >"$lists/$d"; done
python3 - "$lists" <<'EOF'
import sys
from pathlib import Path
lines = lambda d: {l.split()[0]: l for l in (Path(sys.argv[1]) / d).read_text().splitlines()}
kubernetes = lines("kubernetes")
for d in ("kwok", "helm"):
    differ = sorted(p for p, l in lines(d).items() if p in kubernetes and kubernetes[p] != l)
    print(f"{d}: {len(differ)} shared modules differ from kubernetes's {differ[:5]}", file=sys.stderr)
EOF
