#!/usr/bin/env bash
# Build (once per cache) a Keycloak home for production mode: `kc.sh build` with the options a
# facility's Keycloak needs at build time, then `kc.sh start --optimized` uses it as is.
#
#   deployments/keycloak/build-production.sh          # prints the production Keycloak home
#
# Why a separate home: `kc.sh build` rewrites lib/quarkus (Quarkus re-augmentation).  Doing it in
# the dev-mode home that fetch.sh caches would make every `start-dev` re-augment again, and
# concurrent starts on a home being re-augmented race.  So the production home is a copy,
# built once under a lock (flock), and marked with the build options it was built with.
#
# Env: KEYCLOAK_VERSION (as fetch.sh), KC_BUILD_FEATURES (default token-exchange-standard, the
# token exchange V2 the realm uses), VISITFLOW_CACHE.  Build-time options: PostgreSQL, health.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
SRC="$("$HERE/fetch.sh")"
VERSION="$(basename "$SRC")"
FEATURES="${KC_BUILD_FEATURES:-}"
OPTIONS="--db=postgres --health-enabled=true ${FEATURES:+--features=$FEATURES}"
TAG="$(printf '%s' "$OPTIONS" | sha256sum | cut -c1-12)"
DEST="$(dirname "$SRC")/$VERSION-production-$TAG"
MARKER="$DEST/.visitflow-built"

if [[ -f "$MARKER" ]]; then echo "$DEST"; exit 0; fi
exec 9>"$(dirname "$SRC")/.build-production.lock"
flock 9
if [[ -f "$MARKER" ]]; then echo "$DEST"; exit 0; fi

TMP="$(mktemp -d "$(dirname "$SRC")/.build.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
cp -a "$SRC/." "$TMP/"
rm -rf "$TMP/data"
# shellcheck disable=SC2086  # OPTIONS is a list of flags
JAVA_OPTS_KC_HEAP="${JAVA_OPTS_KC_HEAP:--Xms64m -Xmx512m}" "$TMP/bin/kc.sh" build $OPTIONS >&2
printf '%s\n' "$OPTIONS" > "$TMP/.visitflow-build-options"
rm -rf "$DEST"
mv "$TMP" "$DEST"
touch "$MARKER"
echo "$DEST"
