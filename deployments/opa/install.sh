#!/usr/bin/env bash
# Install the pinned OPA into ${VISITFLOW_CACHE:-/opt/visitflow-cache}/opa/<version>/opa (idempotent)
# and print its path.
#
# Built from its Go module (github.com/open-policy-agent/opa) with the Go toolchain, so CI on
# a fresh machine needs only `go`; the build takes a few minutes once, then the cache is reused.
# VISITFLOW_OPA_CACHE overrides the cache root (the opa/ directory itself); otherwise it follows
# VISITFLOW_CACHE like the other builds (cluster/build.sh, images/build.sh), so one empty cache
# directory really is empty for all of them.
set -euo pipefail
VERSION="${VISITFLOW_OPA_VERSION:-v1.22.3}"
ROOT="${VISITFLOW_OPA_CACHE:-${VISITFLOW_CACHE:-/opt/visitflow-cache}/opa}"
BIN="$ROOT/$VERSION/opa"
# `opa version | grep -q` under pipefail fails at random (grep exits early, opa gets SIGPIPE)
# and made every few calls rebuild: read the whole output first.
is_pinned() { local out; out=$("$1" version 2>/dev/null) && grep -q "^Version: ${VERSION#v}$" <<<"$out"; }
if [ -x "$BIN" ] && is_pinned "$BIN"; then
    echo "$BIN"; exit 0
fi
command -v go >/dev/null || { echo "building OPA $VERSION needs the Go toolchain (go)" >&2; exit 1; }
mkdir -p "$ROOT/$VERSION"
echo "building OPA $VERSION (go install, a few minutes) ..." >&2
# Build beside the cache and rename into place: two concurrent installs never see half a binary.
tmp=$(mktemp -d "$ROOT/$VERSION/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# -s -w: no symbol tables (shorter link, smaller binary; `opa version` reads the build info, kept).
GOBIN="$tmp" GOFLAGS="${GOFLAGS:-} -trimpath" go install -ldflags="-s -w" "github.com/open-policy-agent/opa@$VERSION" >&2
is_pinned "$tmp/opa" || { echo "built $tmp/opa is not OPA $VERSION" >&2; exit 1; }
mv -f "$tmp/opa" "$BIN"
echo "$BIN"
