#!/usr/bin/env bash
# Initialise (once) and start a throwaway PostgreSQL cluster for tests and demos.
#
#   deployments/postgres/start-local.sh DIR [PORT]     -> prints a postgresql:// URL on stdout
#   deployments/postgres/stop-local.sh DIR
#
# Why a script: PostgreSQL refuses to run as root, and CI runs as root.  When started as root
# the cluster is owned by, and run as, an unprivileged OS user (PG_OS_USER, default
# `postgres`, which the Debian package creates) through `runuser`.  As any other user it
# runs as that user.
#
# The cluster listens on 127.0.0.1:PORT and on a Unix socket inside DIR (mode 0700).  TCP
# logins need a password: a random one is generated at initdb time, kept in DIR/password
# (mode 0600) and printed in the URL.  Dev and test only: this is not a production database
# (no backups, no tuning).  Use it with:
#
#   export VISITFLOW_TEST_POSTGRES_URL=$(deployments/postgres/start-local.sh /tmp/vf-pg 55432)
#
# TLS (optional): PG_TLS_CERT and PG_TLS_KEY (PEM files) turn on ssl=on with that pair, copied
# into DIR (PostgreSQL wants its key owned by the server's user, mode 0600), and make TCP logins
# TLS only (pg_hba `hostssl`, as deployments/images/postgres-entrypoint's
# VISITFLOW_POSTGRES_TLS_ONLY): a client that forgets TLS is refused, not served plain.  Clients
# then verify it with PGSSLMODE=verify-full PGSSLROOTCERT=<the CA>.  Without them: plain TCP
# (`host`), also for a cluster that was started with TLS before.  The choice is made at start:
# on a cluster already running it changes nothing.
set -euo pipefail

DIR=${1:?usage: start-local.sh DIR [PORT]}
PORT=${2:-55432}
PG_OS_USER=${PG_OS_USER:-postgres}

# The newest installed server (Debian: /usr/lib/postgresql/<major>/bin), unless PG_BIN is set.
if [ -z "${PG_BIN:-}" ]; then
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
fi
if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/initdb" ]; then
    echo "start-local.sh: no PostgreSQL server found (apt-get install -y postgresql, or set PG_BIN)" >&2
    exit 2
fi

if [ "$(id -u)" -eq 0 ]; then
    id "$PG_OS_USER" >/dev/null 2>&1 || { echo "start-local.sh: OS user $PG_OS_USER does not exist" >&2; exit 2; }
    as_pg() { runuser -u "$PG_OS_USER" -- "$@"; }
    mkdir -p "$DIR"
    chown "$PG_OS_USER": "$DIR"
else
    as_pg() { "$@"; }
    mkdir -p "$DIR"
fi
chmod 0700 "$DIR"
DIR=$(cd "$DIR" && pwd)
DATA="$DIR/data"

if [ ! -s "$DATA/PG_VERSION" ]; then
    as_pg sh -c "umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > '$DIR/password'"
    as_pg "$PG_BIN/initdb" -D "$DATA" --username=postgres --pwfile="$DIR/password" \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 \
        >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log" >&2; exit 1; }
fi

if ! as_pg "$PG_BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    TLS_OPTS=""
    if [ -n "${PG_TLS_CERT:-}" ] || [ -n "${PG_TLS_KEY:-}" ]; then
        [ -r "${PG_TLS_CERT:-}" ] && [ -r "${PG_TLS_KEY:-}" ] \
            || { echo "start-local.sh: PG_TLS_CERT and PG_TLS_KEY must both name readable PEM files" >&2; exit 2; }
        as_pg sh -c "umask 077; cat > '$DIR/server.crt'" < "$PG_TLS_CERT"
        as_pg sh -c "umask 077; cat > '$DIR/server.key'" < "$PG_TLS_KEY"
        TLS_OPTS="-c ssl=on -c ssl_cert_file=$DIR/server.crt -c ssl_key_file=$DIR/server.key -c ssl_min_protocol_version=TLSv1.2"
        as_pg sed -i -E 's#^host(ssl)? +all +all +(127\.0\.0\.1/32|::1/128) #hostssl all all \2 #' "$DATA/pg_hba.conf"
    else
        as_pg sed -i -E 's#^hostssl +all +all +(127\.0\.0\.1/32|::1/128) #host all all \1 #' "$DATA/pg_hba.conf"
    fi
    as_pg "$PG_BIN/pg_ctl" -D "$DATA" -l "$DIR/postgres.log" -w -t 60 \
        -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 $TLS_OPTS" start >&2 \
        || { tail -n 30 "$DIR/postgres.log" >&2; exit 1; }
fi

PASSWORD=$(as_pg cat "$DIR/password")
echo "postgresql://postgres:${PASSWORD}@127.0.0.1:${PORT}/postgres"
