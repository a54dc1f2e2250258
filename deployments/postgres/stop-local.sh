#!/usr/bin/env bash
# Stop a cluster started by start-local.sh (fast shutdown).  `rm -rf DIR` afterwards to discard it.
set -euo pipefail
DIR=${1:?usage: stop-local.sh DIR}
PG_OS_USER=${PG_OS_USER:-postgres}
if [ -z "${PG_BIN:-}" ]; then
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
fi
[ -s "$DIR/data/PG_VERSION" ] || { echo "stop-local.sh: no cluster in $DIR" >&2; exit 1; }
if [ "$(id -u)" -eq 0 ]; then
    runuser -u "$PG_OS_USER" -- "$PG_BIN/pg_ctl" -D "$DIR/data" -m fast -w stop
else
    "$PG_BIN/pg_ctl" -D "$DIR/data" -m fast -w stop
fi
