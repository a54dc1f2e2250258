"""``visitflow tiled-config`` and ``visitflow tiled {serve,ensure-visits}``.

argparse-friendly pairs (``add_*_arguments(parser)`` + ``run_*(args)``) that
:mod:`visitflow.cli` looks up by command name.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..core.layout import DEFAULT_PROCESSED_TEMPLATE, DEFAULT_RAW_TEMPLATE
from ..core.tls import add_tls_arguments, tls_files

__all__ = [
    'add_tiled_config_arguments', 'run_tiled_config', 'add_tiled_arguments', 'serve_tiled',
    'ensure_visits_cmd', 'run_tiled', 'load_access_control',
]


def _common(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--issuer", required=required, help="OIDC issuer URL (discovery at <issuer>/.well-known/...)")
    parser.add_argument("--state-dir", required=required, help="catalog, storage and logs live here")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--raw-template", default=DEFAULT_RAW_TEMPLATE,
                        help="node path of a raw run ('' if this server holds no raw store)")
    parser.add_argument("--processed-template", default=DEFAULT_PROCESSED_TEMPLATE,
                        help="node path of processed output ('' if this server holds no processed store)")
    parser.add_argument("--audience", default="tiled")
    parser.add_argument("--file-root", action="append", default=[], metavar="STORE=TEMPLATE",
                        help="let writers register detector files of a visit found under TEMPLATE, "
                             "e.g. raw=/dls/i22/data/{year}/{visit} (repeatable, one per store)")
    parser.add_argument("--introspect-client", default=None, metavar="CLIENT_ID",
                        help="check each token at the IdP's introspection endpoint as this client "
                             "(secret in $VISITFLOW_TILED_CLIENT_SECRET): revoked tokens stop working "
                             "within --token-cache seconds")
    parser.add_argument("--token-cache", type=float, default=None, metavar="SECONDS",
                        help="how long a validated token is remembered (default 30)")
    parser.add_argument("--allow-anonymous", action="store_true",
                        help="let unauthenticated requests in (the policy gives them nothing); needed by "
                             "clients that only pass a bearer header through, e.g. blueapi 1.21.1")
    parser.add_argument("--user-issuer", default=None, metavar="URL",
                        help="the facility IdP: accept users' own tokens from it, decided by --authority-url")
    parser.add_argument("--authority-url", default=None, metavar="URL",
                        help="OPA server deciding facility users' access (policy deployments/opa/authz.rego)")
    parser.add_argument("--authority-token-env", default=None, metavar="NAME",
                        help="environment variable holding the bearer token for an OPA run with "
                             "--authentication=token (deployments/opa/system_authz.rego)")
    parser.add_argument("--authority-cache", type=float, default=5.0, metavar="SECONDS",
                        help="how long an authority decision is reused (default 5)")
    parser.add_argument("--streaming-cache", default="memory", metavar="memory|redis://HOST:PORT/DB|none",
                        help="where Tiled keeps the appends it pushes to websocket subscribers (live "
                             "analyses follow runs by push): memory for one process, Redis when several "
                             "Tiled processes share a catalog, none to turn streaming off (live polls)")
    parser.add_argument("--tabular-storage", default=None, metavar="URI",
                        help="SQL URI for TiledWriter's tables (default sqlite file in the state dir; "
                             "postgresql://... in production)")
    parser.add_argument("--catalog-database", default=None, metavar="URI",
                        help="SQLAlchemy URI of the catalog (default sqlite file in the state dir; "
                             "postgresql+asyncpg://... in production: SQLite locks under concurrent scans)")
    parser.add_argument("--authn-database", default=None, metavar="URI",
                        help="SQLAlchemy URI of Tiled's principals table (default sqlite file in the "
                             "state dir; the catalog's PostgreSQL server in production)")
    add_tls_arguments(parser)   # written into the config's uvicorn section (ssl_certfile/ssl_keyfile)


def _render(args):
    from .config import render_config

    return render_config(
        issuer=args.issuer, state_dir=args.state_dir, host=args.host, port=args.port,
        raw_template=args.raw_template or None, processed_template=args.processed_template or None,
        audience=args.audience, tabular_storage=args.tabular_storage,
        catalog_uri=args.catalog_database, authn_database_uri=args.authn_database,
        file_roots=_file_roots(args.file_root),
        introspect_client_id=args.introspect_client, cache_seconds=args.token_cache,
        allow_anonymous=args.allow_anonymous,
        user_issuer=args.user_issuer,
        authority=({"kind": "opa", "url": args.authority_url, "cache_seconds": args.authority_cache,
                    **({"token_env": args.authority_token_env} if args.authority_token_env else {})}
                   if args.authority_url else None),
        streaming_cache=None if args.streaming_cache in ("", "none") else args.streaming_cache,
        tls=tls_files(args.ssl_certfile, args.ssl_keyfile),
    )


def _file_roots(items: list[str]) -> dict[str, str] | None:
    out = {}
    for item in items or []:
        store, sep, template = item.partition("=")
        if not sep or not store or not template:
            raise SystemExit(f"--file-root wants STORE=TEMPLATE, e.g. raw=/data/{{visit}}; got {item!r}")
        out[store] = template
    return out or None


# -- visitflow tiled-config ---------------------------------------------------------------

def add_tiled_config_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--output", "-o", help="write the YAML here instead of stdout")


def run_tiled_config(args) -> int:
    from .config import to_yaml, write_config

    config = _render(args)
    if args.output:
        print(write_config(config, args.output))
    else:
        sys.stdout.write(to_yaml(config))
    return 0


tiled_config = run_tiled_config


# -- visitflow tiled serve | ensure-visits ------------------------------------------------

def add_tiled_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tiled_command", metavar="{serve,ensure-visits}", required=True)
    serve = sub.add_parser("serve", help="run Tiled with our authenticator and access policy")
    _common(serve, required=False)
    serve.add_argument("--config", metavar="FILE",
                       help="serve this Tiled config file (e.g. from `visitflow tiled-config`, or a site's "
                            "own) instead of rendering one from the options; visitflow's middleware and "
                            "AuthGate are still put around it (a plain `tiled serve config` drops them)")
    serve.add_argument("--log-level", default="warning")
    serve.add_argument("--access-control", default=None, metavar="YAML",
                       help="replace the access policy with this Tiled access_control section "
                            "(${VAR}s expanded), e.g. deployments/opa/tiled-access-control.yml")
    serve.add_argument("--log-format", choices=("text", "json"), default=None,
                       help="json: one object a line (default $VISITFLOW_LOG_FORMAT, else text)")
    serve.add_argument("--config-out", help="also write the rendered config here (default <state>/tiled.yml)")
    ensure = sub.add_parser("ensure-visits", help="admin step: create store roots and visit containers")
    ensure.add_argument("--uri", required=True, help="Tiled base URI, e.g. http://127.0.0.1:8000")
    ensure.add_argument("--issuer", required=True)
    ensure.add_argument("--client-id", default="visitflow-admin")
    ensure.add_argument("--client-secret-env", default="VISITFLOW_ADMIN_SECRET",
                        help="environment variable holding the client secret")
    ensure.add_argument("--raw-template", default=DEFAULT_RAW_TEMPLATE)
    ensure.add_argument("--processed-template", default=DEFAULT_PROCESSED_TEMPLATE)
    ensure.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="value for another template placeholder (e.g. instrument=i22)")
    ensure.add_argument("visits", nargs="+")


def load_access_control(path: str) -> dict:
    """A Tiled ``access_control`` section from a YAML file, environment variables expanded
    (a shipped file names ``${VISITFLOW_OPA_URL}`` rather than a host)."""
    import yaml

    text = os.path.expandvars(Path(path).read_text())
    if "${" in text:
        raise SystemExit(f"{path}: an environment variable it names is not set")
    return yaml.safe_load(text)


def serve_tiled(args) -> int:
    from .config import prepare_state_dir, write_config
    from .server import serve, serve_file

    if args.config:
        serve_file(args.config, log_level=args.log_level, log_format=args.log_format)
        return 0
    if not args.issuer or not args.state_dir:
        raise SystemExit("visitflow tiled serve: give --issuer and --state-dir, or --config FILE")
    state = prepare_state_dir(args.state_dir)
    config = _render(args)
    if args.access_control:
        config["access_control"] = load_access_control(args.access_control)
    write_config(config, args.config_out or state / "tiled.yml")
    serve(config, log_level=args.log_level, log_format=args.log_format)
    return 0


def ensure_visits_cmd(args) -> int:
    from ..core.layout import Layout
    from ..core.tiled_admin import admin_auth, ensure_visits

    secret = os.environ.get(args.client_secret_env)
    if not secret:
        print(f"set {args.client_secret_env} to the {args.client_id} client secret", file=sys.stderr)
        return 2
    extra = dict(item.split("=", 1) for item in args.set)
    layout = Layout.from_templates(args.raw_template or None, args.processed_template or None)
    created = ensure_visits(args.uri, admin_auth(args.issuer, args.client_id, secret), args.visits,
                            layout=layout, extra=extra)
    for path in created:
        print(f"created {path}")
    return 0


def run_tiled(args) -> int:
    if args.tiled_command == "serve":
        return serve_tiled(args)
    return ensure_visits_cmd(args)


add_arguments, run = add_tiled_arguments, run_tiled


if __name__ == "__main__":  # python -m visitflow.tiled.cli serve ...
    p = argparse.ArgumentParser(prog="visitflow tiled")
    add_tiled_arguments(p)
    sys.exit(run_tiled(p.parse_args()))
