#!/usr/bin/env bash
# Run Keycloak in dev mode on loopback with realms imported, in a session directory of its own.
#
#   deployments/keycloak/start.sh SESSION_DIR HTTP_PORT MGMT_PORT [REALM.json ...]
#
# SESSION_DIR becomes a Keycloak "home" whose lib/, conf/, providers/ and themes/ are links into
# the cached distribution (deployments/keycloak/fetch.sh) and whose data/ is fresh, so each
# session starts from an empty database with exactly the given realms imported
# (Keycloak's --import-realm reads <home>/data/import and skips realms that already exist).
# Runs in the foreground (exec): the caller owns the process.  Env: KEYCLOAK_HOME (default:
# what fetch.sh prints), KC_BOOTSTRAP_ADMIN_USERNAME/PASSWORD (default admin/admin, dev only),
# JAVA_OPTS_KC_HEAP (default -Xms64m -Xmx384m: four test workers share the machine).
set -euo pipefail

SESSION="${1:?session dir}"; PORT="${2:?http port}"; MGMT="${3:?management port}"; shift 3
HERE="$(cd "$(dirname "$0")" && pwd)"
KC="${KEYCLOAK_HOME:-$("$HERE/fetch.sh")}"

mkdir -p "$SESSION/bin" "$SESSION/data/import"
cp -f "$KC"/bin/kc.sh "$SESSION/bin/"
cp -rf "$KC"/bin/client "$SESSION/bin/" 2>/dev/null || true
for d in lib conf providers themes; do
    ln -sfn "$KC/$d" "$SESSION/$d"
done
for realm in "$@"; do
    cp -f "$realm" "$SESSION/data/import/"
done

export KC_BOOTSTRAP_ADMIN_USERNAME="${KC_BOOTSTRAP_ADMIN_USERNAME:-admin}"
export KC_BOOTSTRAP_ADMIN_PASSWORD="${KC_BOOTSTRAP_ADMIN_PASSWORD:-admin}"
export JAVA_OPTS_KC_HEAP="${JAVA_OPTS_KC_HEAP:--Xms64m -Xmx384m}"

exec "$SESSION/bin/kc.sh" start-dev --import-realm \
    --http-host=127.0.0.1 --http-port="$PORT" \
    --http-management-port="$MGMT" \
    --hostname-strict=false \
    --health-enabled=true \
    --log-level=info
