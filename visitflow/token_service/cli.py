"""``visitflow idp``: run the dev IdP or, with a production config (``deployments/token-service.yaml``),
the token service; or rotate its signing key."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..core.tls import add_tls_arguments, scheme, tls_files

__all__ = ['DEFAULT_CONFIG', 'add_arguments', 'run', 'main']

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "deployments" / "idp.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=os.environ.get("VISITFLOW_IDP_CONFIG", str(DEFAULT_CONFIG)),
                   help="users/clients/lifetimes YAML (default: deployments/idp.yaml)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8180, help="port (default 8180)")
    p.add_argument("--issuer", default=None, help="issuer URL (default http://HOST:PORT)")
    p.add_argument("--keys-dir", default=None,
                   help="directory of signing keys (PEM); tokens survive restarts. Default: in memory")
    p.add_argument("--state-dir", default=None,
                   help="persistent state: signing keys (unless --keys-dir) and revocations; required in production")
    p.add_argument("--rotate-keys", action="store_true",
                   help="add a new signing key to --keys-dir (or, state.kind postgres, to the shared database: "
                        "published now, signing after state.key_publish_ahead) and exit; running replicas pick it up")
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", choices=("text", "json"), default=os.environ.get("VISITFLOW_LOG_FORMAT", "text"),
                   help="json: one object per line with request ids (docs/operations.md)")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    add_tls_arguments(p)   # HTTPS in the cluster: the site's kubernetes.io/tls Secret (docs/deploy.md step 3)


def run(args: argparse.Namespace) -> int:
    from .keys import KeyStore
    from .revocations import RevocationLog

    if args.state_dir and not args.keys_dir:
        args.keys_dir = str(Path(args.state_dir) / "keys")

    if args.rotate_keys and args.keys_dir:   # file mode: no config (nor its secrets) needed
        key = KeyStore(args.keys_dir).rotate()
        print(f"new signing key {key.kid} in {args.keys_dir}")
        return 0

    from .config import IdPConfig

    config = IdPConfig.load(args.config)
    if config.state.kind == "postgres":
        return _run_shared(args, config)
    if args.rotate_keys:
        raise SystemExit("--rotate-keys needs --keys-dir (or a config with state.kind postgres)")

    if config.production and not args.state_dir:
        raise SystemExit("production mode needs --state-dir: signing keys and revocations must survive restarts")
    tls = tls_files(args.ssl_certfile, args.ssl_keyfile)   # a bad pair stops here, before any state is touched
    revocations = RevocationLog(Path(args.state_dir) / "revocations.jsonl" if args.state_dir else None)
    return _serve(args, config, KeyStore(args.keys_dir), revocations, _issuer(args, config, tls), tls)


def _run_shared(args: argparse.Namespace, config) -> int:
    """``state.kind: postgres``: one of several replicas on the shared database (docs/operations.md)."""
    from .pg_keys import SharedKeyStore
    from .pg_state import PostgresState

    if args.state_dir or args.keys_dir:
        raise SystemExit("state.kind postgres keeps keys and revocations in the database: drop --state-dir/--keys-dir")
    st = config.state
    db = PostgresState(st.database_url, poll_seconds=st.poll_seconds)
    keys = SharedKeyStore(db, poll_seconds=st.poll_seconds, publish_ahead=st.key_publish_ahead,
                          overlap=st.key_overlap)
    if args.rotate_keys:
        key = keys.rotate()
        purged = db.purge()
        print(f"new signing key {key.kid}: in every replica's JWKS now, signing in {st.key_publish_ahead:g} s; "
              f"keys older than the {st.key_overlap:g} s overlap removed; {purged} expired revocations and "
              f"refresh tokens deleted", flush=True)
        db.close()
        return 0
    tls = tls_files(args.ssl_certfile, args.ssl_keyfile)
    return _serve(args, config, keys, db, _issuer(args, config, tls), tls)


def _issuer(args: argparse.Namespace, config, tls: dict[str, str]) -> str:
    """--issuer, else the config's, else this server's own URL (https when it serves TLS)."""
    return args.issuer or config.issuer or f"{scheme(tls)}://{args.host}:{args.port}"


def _serve(args: argparse.Namespace, config, keys, revocations, issuer: str, tls: dict[str, str]) -> int:
    import uvicorn

    from ..core.asgi_limits import HeaderLimit
    from ..core.jsonlog import configure_logging
    from .server import create_app

    configure_logging(args.log_format, args.log_level)
    app = create_app(config, keys, issuer, revocations)
    mode = "token service (production: federated, no users)" if config.production else "dev IdP"
    state = "shared state in PostgreSQL" if config.state.kind == "postgres" else "state on local disk"
    print(f"visitflow idp: {mode}, issuer {issuer}, {state}, {scheme(tls)} on port {args.port}", flush=True)
    # header cap: a middleware, not uvicorn's h11 option (httptools ignores it): visitflow/core/asgi_limits.py
    uvicorn.run(HeaderLimit(app, config.limits.max_header_bytes), host=args.host, port=args.port,
                log_level=args.log_level, access_log=args.access_log,
                log_config=None, **tls)  # its lines reach our root handler
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="visitflow idp", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))
