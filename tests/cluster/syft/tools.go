//go:build tools

// Pins syft, which `make release-dry-run` runs to write each image's SBOM (scripts/syft.sh).
package tools

import _ "github.com/anchore/syft/cmd/syft"
