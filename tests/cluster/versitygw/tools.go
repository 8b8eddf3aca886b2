//go:build tools

// Package tools pins versitygw, an Apache-2.0 S3 server whose posix backend serves a folder,
// which scripts/s3-server.sh builds: the end-to-end tests fetch models from it over real S3
// (SigV4, ranges, conditional GETs, presigned URLs) through tests/src/s3.rs.
package tools

import (
	_ "github.com/versity/versitygw/cmd/versitygw"
)
