//go:build tools

// Package tools pins csi-sanity, the CSI community's conformance suite, which
// scripts/csi-sanity.sh builds to check the node agent's CSI services (tests/tests/agent.rs).
package tools

import (
	_ "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity"
)
