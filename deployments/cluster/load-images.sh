#!/usr/bin/env bash
# Import image archives (docker-save/OCI tar: `podman save`, deployments/images/build.sh, oci_archive.py)
# into the running cluster's containerd, namespace k8s.io, where the kubelet finds them (no registry:
# the manifests' imagePullPolicy IfNotPresent then never pulls).
#   deployments/cluster/load-images.sh ARCHIVE...
set -euo pipefail
STATE="${VISITFLOW_CLUSTER_STATE:-/var/lib/visitflow-cluster}"
SOCK="$STATE/containerd/containerd.sock"
[ -S "$SOCK" ] || { echo "no cluster containerd at $SOCK (deployments/cluster/up.sh)" >&2; exit 1; }
for a in "$@"; do
  ctr -a "$SOCK" -n k8s.io images import "$a" >&2
done
