#!/usr/bin/env bash
# Build a single-node Kubernetes from the Go module proxy, cached outside the checkout.
#
# Why from the module proxy: no image or binary registry is reachable here, but proxy.golang.org is,
# and k8s.io/kubernetes is a Go module.  Its zip lacks ./staging, so in a copy of it the staging
# `replace`s are dropped and each staging module is required at the published v0.X.Y instead.
# Output: ${VISITFLOW_CACHE:-/opt/visitflow-cache}/kubernetes/v$KUBERNETES_VERSION/{bin/*,pause.tar}
# Prints that directory (`build.sh --where` prints it without building; status 0 iff complete).
# Idempotent: a complete cache is reused (keyed by the versions below).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"   # before any cd

KUBERNETES_VERSION="${KUBERNETES_VERSION:-1.37.2}"
COREDNS_VERSION="${COREDNS_VERSION:-1.12.4}"
STAGING_VERSION="0.${KUBERNETES_VERSION#1.}"
CACHE="${VISITFLOW_CACHE:-/opt/visitflow-cache}/kubernetes/v${KUBERNETES_VERSION}-coredns${COREDNS_VERSION}"
BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)

complete() {
  for b in "${BINS[@]}" coredns; do [ -x "$CACHE/bin/$b" ] || return 1; done
  [ -s "$CACHE/pause.tar" ] && [ -s "$CACHE/coredns.tar" ]
}
if [ "${1:-}" = "--where" ]; then echo "$CACHE"; complete; exit; fi   # the cache dir; status 0 iff complete
if complete; then echo "$CACHE"; exit 0; fi

mkdir -p "$CACHE/bin"
WORK="$(mktemp -d "${CACHE}/build.XXXXXX")"
trap 'chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"' EXIT
export CGO_ENABLED=0 GOFLAGS="-mod=mod -p=2" GOWORK=off   # the module ships a go.work naming ./staging
log() { echo "[cluster/build $(date -u +%T)] $*" >&2; }

log "download k8s.io/kubernetes@v$KUBERNETES_VERSION"
DIR="$(go mod download -json "k8s.io/kubernetes@v$KUBERNETES_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
cp -r "$DIR" "$WORK/src" && chmod -R u+w "$WORK/src"
cd "$WORK/src"
# Every `replace k8s.io/x => ./staging/...` becomes `require k8s.io/x v0.X.Y`.
go mod edit -json | python3 -c '
import json, sys
for r in json.load(sys.stdin).get("Replace") or []:
    if r["New"]["Path"].startswith("./staging"):
        print(r["Old"]["Path"])' > "$WORK/staging.txt"
args=()
while read -r m; do args+=(-dropreplace="$m" -require="$m@v$STAGING_VERSION"); done < "$WORK/staging.txt"
go mod edit "${args[@]}"
log "go build ${BINS[*]} ($(wc -l < "$WORK/staging.txt") staging modules at v$STAGING_VERSION)"
# ONE `go build` for all missing binaries rather than one per binary: the package graph is loaded
# once, and its compile/link actions share one scheduler (-p=2), so the six links and the last
# packages of one binary overlap with the next one's instead of leaving a core idle.
# (-trimpath, -s -w: no local paths, no symbol tables: smaller binaries, shorter links.)
missing=()
for b in "${BINS[@]}"; do [ -x "$CACHE/bin/$b" ] || missing+=("./cmd/$b"); done
if [ "${#missing[@]}" -gt 0 ]; then
  mkdir -p "$WORK/out"
  nice -n 10 go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=v$KUBERNETES_VERSION -X k8s.io/client-go/pkg/version.gitVersion=v$KUBERNETES_VERSION" \
    -o "$WORK/out/" "${missing[@]}"
  for p in "${missing[@]}"; do
    b=${p#./cmd/}
    [ -x "$WORK/out/$b" ] || { log "go build made no $b"; exit 1; }
    mv "$WORK/out/$b" "$CACHE/bin/$b"
    log "built $b"
  done
fi

# pause: kubernetes' own build/pause/linux/pause.c, static, made into a local image archive.
log "pause image"
mkdir -p "$WORK/pause-root"
gcc -static -O2 -DVERSION="v$KUBERNETES_VERSION" -o "$WORK/pause-root/pause" build/pause/linux/pause.c
strip "$WORK/pause-root/pause"
python3 "$HERE/oci_archive.py" \
  "$WORK/pause-root" "registry.k8s.io/pause:3.10" /pause "$WORK/pause.tar"

if [ ! -x "$CACHE/bin/coredns" ]; then
  log "go install github.com/coredns/coredns@v$COREDNS_VERSION"
  GOBIN="$WORK/gobin" nice -n 10 go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@v$COREDNS_VERSION"
  mv "$WORK/gobin/coredns" "$CACHE/bin/coredns"
  mkdir -p "$WORK/coredns-root"; cp "$CACHE/bin/coredns" "$WORK/coredns-root/coredns"
fi
mkdir -p "$WORK/coredns-root"; cp "$CACHE/bin/coredns" "$WORK/coredns-root/coredns"
python3 "$HERE/oci_archive.py" \
  "$WORK/coredns-root" "localhost/visitflow/coredns:$COREDNS_VERSION" /coredns "$CACHE/coredns.tar"
mv "$WORK/pause.tar" "$CACHE/pause.tar"
log "done"
echo "$CACHE"
