"""The local stack's ``ScopedCredentials`` document: one machine, the dev IdP, one Tiled.

``visitflow up`` runs this file (visitflow/stack/prefect.py); by hand::

    PREFECT_API_URL=http://127.0.0.1:4200/api python blocks/local.py \\
        --issuer http://127.0.0.1:8180 --raw-uri http://127.0.0.1:8000

The client secret is *not* stored: the local worker's environment carries it in
``--secret-env`` (default ``VISITFLOW_CLIENT_SECRET``).  Tested by tests/flow/test_blocks.py.
"""

from __future__ import annotations

import argparse
import os
import sys

from visitflow.blocks import ScopedCredentials, save


def definition(*, issuer: str, raw_uri: str, processed_uri: str | None = None,
               secret_env: str = "VISITFLOW_CLIENT_SECRET", grant_scope: str = "run",
               raw_template: str | None = None, processed_template: str | None = None) -> ScopedCredentials:
    """The document: the dev IdP mints per-run scopes, so ``grant_scope`` defaults to ``run``;
    raw and processed data follow the default ``raw/<visit>/<run>`` layout unless templates
    are given (blueapi's: ``i22/{proposal}/{visit}/{run}``, docs/blueapi.md)."""
    templates = {k: v for k, v in (("raw_template", raw_template), ("processed_template", processed_template)) if v}
    return ScopedCredentials(issuer=issuer, raw_uri=raw_uri, processed_uri=processed_uri,
                             client_secret_env=secret_env, grant_scope=grant_scope, **templates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--issuer", required=True, help="the dev IdP's issuer URL")
    parser.add_argument("--raw-uri", required=True, help="the Tiled server's URI")
    parser.add_argument("--processed-uri", default=None, help="a second Tiled for results (default: the same)")
    parser.add_argument("--secret-env", default="VISITFLOW_CLIENT_SECRET",
                        help="environment variable on the worker holding the visitflow client secret")
    parser.add_argument("--grant-scope", default=os.environ.get("VISITFLOW_GRANT_SCOPE", "run"),
                        choices=("run", "visit"))
    parser.add_argument("--raw-template", default=None, help="node path of a raw run (default raw/{visit}/{run})")
    parser.add_argument("--processed-template", default=None, help="node path of a result")
    parser.add_argument("--name", default="visitflow", help="document name (VISITFLOW_CREDENTIALS_BLOCK)")
    args = parser.parse_args(argv)
    block = definition(issuer=args.issuer, raw_uri=args.raw_uri, processed_uri=args.processed_uri,
                       secret_env=args.secret_env, grant_scope=args.grant_scope,
                       raw_template=args.raw_template, processed_template=args.processed_template)
    print(f"saved ScopedCredentials {args.name!r}: {save(block, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
