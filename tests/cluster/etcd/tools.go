//go:build tools

// Package tools pins the etcd command that scripts/control-plane.sh builds.
package tools

import _ "go.etcd.io/etcd/server/v3"
