"""``visitflow idp``: run the dev IdP or, with a production config (``deployments/token-service.yaml``),
the token service; or rotate its signing key."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

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
                   help="add a new signing key to --keys-dir and exit; a running IdP picks it up")
    p.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    from .keys import KeyStore
    from .revocations import RevocationLog

    if args.state_dir and not args.keys_dir:
        args.keys_dir = str(Path(args.state_dir) / "keys")

    if args.rotate_keys:
        if not args.keys_dir:
            raise SystemExit("--rotate-keys needs --keys-dir")
        key = KeyStore(args.keys_dir).rotate()
        print(f"new signing key {key.kid} in {args.keys_dir}")
        return 0

    import uvicorn

    from ..core.asgi_limits import HeaderLimit
    from .config import IdPConfig
    from .server import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = IdPConfig.load(args.config)
    if config.production and not args.state_dir:
        raise SystemExit("production mode needs --state-dir: signing keys and revocations must survive restarts")
    issuer = args.issuer or config.issuer or f"http://{args.host}:{args.port}"
    revocations = RevocationLog(Path(args.state_dir) / "revocations.jsonl" if args.state_dir else None)
    app = create_app(config, KeyStore(args.keys_dir), issuer, revocations)
    mode = "token service (production: federated, no users)" if config.production else "dev IdP"
    print(f"visitflow idp: {mode}, issuer {issuer}", flush=True)
    # header cap: a middleware, not uvicorn's h11 option (httptools ignores it): visitflow/core/asgi_limits.py
    uvicorn.run(HeaderLimit(app, config.limits.max_header_bytes), host=args.host, port=args.port,
                log_level=args.log_level, access_log=False)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="visitflow idp", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))
