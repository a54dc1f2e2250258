#!/usr/bin/env bash
# Install the pinned OPA into /opt/visitflow-cache/opa/<version>/opa (idempotent) and print its path.
#
# Built from its Go module (github.com/open-policy-agent/opa) with the Go toolchain, so CI on
# a fresh machine needs only `go`; the build takes a few minutes once, then the cache is reused.
# VISITFLOW_OPA_CACHE overrides the cache root.
set -euo pipefail
VERSION="${VISITFLOW_OPA_VERSION:-v1.22.3}"
ROOT="${VISITFLOW_OPA_CACHE:-/opt/visitflow-cache/opa}"
BIN="$ROOT/$VERSION/opa"
if [ -x "$BIN" ] && "$BIN" version 2>/dev/null | grep -q "^Version: ${VERSION#v}$"; then
    echo "$BIN"; exit 0
fi
command -v go >/dev/null || { echo "building OPA $VERSION needs the Go toolchain (go)" >&2; exit 1; }
mkdir -p "$ROOT/$VERSION"
echo "building OPA $VERSION (go install, a few minutes) ..." >&2
GOBIN="$ROOT/$VERSION" GOFLAGS="${GOFLAGS:-} -trimpath" go install "github.com/open-policy-agent/opa@$VERSION" >&2
"$BIN" version | grep -q "^Version: ${VERSION#v}$" || { echo "built $BIN is not OPA $VERSION" >&2; exit 1; }
echo "$BIN"
