//go:build tools

// Package tools pins Kueue, the Kubernetes job queueing controller, which scripts/kueue.sh
// builds: the operator tests run it against their API server to admit suspended pipelines'
// Jobs through a real ClusterQueue and LocalQueue.
package tools

import (
	_ "sigs.k8s.io/kueue/cmd/kueue"
)
