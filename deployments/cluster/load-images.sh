#!/usr/bin/env bash
# Import image archives (docker-save tar: `podman save`, deployments/images/build.sh, oci_archive.py)
# into the running cluster's containerd, namespace k8s.io, where the kubelet finds them (no registry:
# the manifests' imagePullPolicy IfNotPresent then never pulls).
#   deployments/cluster/load-images.sh [--tag TAG] ARCHIVE...
# --tag TAG also names each imported image <its name>:TAG (the local overlay uses `local`, so it
# need not change when an image's content hash does).
set -euo pipefail
STATE="${VISITFLOW_CLUSTER_STATE:-/var/lib/visitflow-cluster}"
SOCK="$STATE/containerd/containerd.sock"
TAG=""
if [ "${1:-}" = "--tag" ]; then TAG="$2"; shift 2; fi
[ -S "$SOCK" ] || { echo "no cluster containerd at $SOCK (deployments/cluster/up.sh)" >&2; exit 1; }
ctr() { command ctr -a "$SOCK" -n k8s.io "$@"; }
for a in "$@"; do
  ref=$(ctr images import "$a" | sed -n 's/^unpacking \(.*\) (sha256:.*/\1/p' | head -1)
  echo "imported $ref" >&2
  if [ -n "$TAG" ] && [ -n "$ref" ]; then
    ctr images tag --force "$ref" "${ref%:*}:$TAG" > /dev/null
    echo "tagged ${ref%:*}:$TAG" >&2
  fi
done
