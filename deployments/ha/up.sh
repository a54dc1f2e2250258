#!/usr/bin/env bash
# Bring Prefect's HA topology up on this machine (as root): see README.md here.
#   deployments/ha/up.sh [STATE_DIR]     -> prints the addresses as JSON
# Everything runs in its own process group / network namespace; deployments/ha/down.sh
# removes it (also after a failed run).  The owner is visitflow/production/ha_topology.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/python ] && . .venv/bin/activate
exec python -m visitflow.production.ha_topology up ${1:+--state "$1"}
