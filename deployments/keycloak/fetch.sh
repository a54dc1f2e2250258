#!/usr/bin/env bash
# Fetch the pinned Keycloak distribution with Maven and unpack it into a cache outside the
# checkout.  Idempotent: a complete unpacked tree (marker file) is reused.
#
#   deployments/keycloak/fetch.sh                          # prints the Keycloak home directory
#   KEYCLOAK_VERSION=26.8.2 deployments/keycloak/fetch.sh  # another version, its own cache dir
#
# Env: KEYCLOAK_VERSION (pinned default below), VISITFLOW_CACHE (default /opt/visitflow-cache),
# KEYCLOAK_PACKAGING (tar.gz for 26.7.3; zip otherwise: Maven Central has 26.8.x only as zip).
# The SHA-256s below pin the exact artifacts; Maven's own .sha1 check happens on download too.
# Production mode (`kc.sh build`, once per cache) is deployments/keycloak/build-production.sh.
set -euo pipefail

VERSION="${KEYCLOAK_VERSION:-26.7.3}"
SHA256_26_7_3="77657f30b7e90d70f727712ce1c967f430fd6a5e9f458d32d8c6df0635345f47"

CACHE="${VISITFLOW_CACHE:-/opt/visitflow-cache}/keycloak"
HOME_DIR="$CACHE/$VERSION"
MARKER="$HOME_DIR/.visitflow-unpacked"

if [[ -f "$MARKER" && -x "$HOME_DIR/bin/kc.sh" ]]; then
    echo "$HOME_DIR"
    exit 0
fi

if [[ "$VERSION" == "26.7.3" ]]; then PACKAGING="${KEYCLOAK_PACKAGING:-tar.gz}"; else PACKAGING="${KEYCLOAK_PACKAGING:-zip}"; fi
ARTIFACT="org.keycloak:keycloak-quarkus-dist:$VERSION:$PACKAGING"
REPO="${MAVEN_REPO_LOCAL:-$HOME/.m2/repository}"
TARBALL="$REPO/org/keycloak/keycloak-quarkus-dist/$VERSION/keycloak-quarkus-dist-$VERSION.$PACKAGING"
if [[ ! -f "$TARBALL" ]]; then
    mvn -q -B dependency:get -Dartifact="$ARTIFACT" -Dtransitive=false \
        -Dmaven.repo.local="$REPO" >&2
fi

PINNED_VAR="SHA256_${VERSION//./_}"
if [[ -n "${!PINNED_VAR:-}" ]]; then
    echo "${!PINNED_VAR}  $TARBALL" | sha256sum -c --quiet - >&2 \
        || { echo "keycloak $VERSION: checksum mismatch for $TARBALL" >&2; exit 1; }
else
    echo "keycloak $VERSION: no pinned checksum; relying on Maven's .sha1 check" >&2
fi

mkdir -p "$CACHE"
TMP="$(mktemp -d "$CACHE/.unpack.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
if [[ "$PACKAGING" == "zip" ]]; then
    python3 -m zipfile -e "$TARBALL" "$TMP"
    chmod +x "$TMP/keycloak-$VERSION"/bin/*.sh   # zip entries lose their mode bits here
else
    tar -xzf "$TARBALL" -C "$TMP"
fi
rm -rf "$HOME_DIR"
mv "$TMP/keycloak-$VERSION" "$HOME_DIR"
touch "$MARKER"
echo "$HOME_DIR"
