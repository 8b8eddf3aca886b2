//go:build tools

// Package tools pins the helm command that scripts/control-plane.sh builds.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
