#!/usr/bin/env bash
# Run visitflow's deployments on the Kubernetes work pool instead of the local process pool.
#
#   deployments/kubernetes/use-k8s-pool.sh IMAGE            # create/update the pool, write the derived file
#   deployments/kubernetes/use-k8s-pool.sh IMAGE --deploy   # ... and deploy every deployment into the pool
#
# Needs PREFECT_API_URL (+ PREFECT_API_AUTH_STRING) for the target Prefect server in the
# environment, and runs from anywhere inside the repository. prefect.yaml is not edited:
# `prefect deploy --all` ignores --pool/--job-variable, so the per-environment choice is a
# derived file (.visitflow/prefect-k8s.yaml) with work_pool.name=visitflow-k8s and
# job_variables.image=IMAGE on every deployment (visitflow.production.prefect_yaml).
# In the image, the deployments' pull step resolves {{ $VISITFLOW_ROOT }} to /opt/visitflow.
# VISITFLOW_K8S_JOB_VARIABLES='{"cpu_request": "250m"}' sizes every deployment's flow-run Pods.
set -euo pipefail
IMAGE=${1:?usage: use-k8s-pool.sh IMAGE [--deploy]}
MODE=${2:-}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
POOL=visitflow-k8s
OUT=${VISITFLOW_K8S_OUT:-.visitflow}   # where the derived prefect file goes
cd "$ROOT"

prefect --no-prompt work-pool create "$POOL" --type kubernetes \
    --base-job-template deployments/kubernetes/base-job-template.json --overwrite

mkdir -p "$OUT"
python -m visitflow.production.prefect_yaml prefect.yaml "$IMAGE" "$POOL" > "$OUT/prefect-k8s.yaml"
echo "wrote $OUT/prefect-k8s.yaml (deployments -> pool $POOL, image $IMAGE)"

if [ "$MODE" = "--deploy" ]; then
    prefect --no-prompt deploy --all --prefect-file "$OUT/prefect-k8s.yaml"
fi
