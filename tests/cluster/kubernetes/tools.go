//go:build tools

// Package tools pins the Kubernetes commands that scripts/control-plane.sh builds: the control
// plane, and the kubelet and kube-proxy of the real node (scripts/node.sh).
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
