#!/usr/bin/env bash
# Tear the HA topology down:  deployments/ha/down.sh [STATE_DIR]
# Without a directory: every topology under /tmp/vfha-*, and any vfha… namespace or link left
# by a run that died before it recorded them.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/python ] && . .venv/bin/activate
if [ -n "${1:-}" ]; then exec python -m visitflow.production.ha_topology down --state "$1"
else exec python -m visitflow.production.ha_topology down-all; fi
