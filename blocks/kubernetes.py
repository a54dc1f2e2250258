"""The facility's ``ScopedCredentials`` document, for flow runs on the ``visitflow-k8s`` pool.

Values come from the environment an operator (or a CI job) sets for the target facility,
so nothing site-specific lives in git::

    VISITFLOW_ISSUER=https://keycloak.example/realms/visitflow \\
    VISITFLOW_TILED_URI=https://tiled.example \\
    PREFECT_API_URL=... python blocks/kubernetes.py            # --print: show, do not save

Differences from ``blocks/local.py``, each for a reason:

- ``client_secret_env=VISITFLOW_CLIENT_SECRET`` and never ``client_secret``: the job
  template (deployments/kubernetes/base-job-template.json) fills that variable from the
  Kubernetes Secret ``visitflow-oidc``, so the secret never enters Prefect's database;
- ``grant_scope=visit`` by default: Keycloak has a fixed list of client scopes and cannot
  mint one per run (docs/production.md, "grant scope");
- ``raw_template`` follows blueapi's layout (``VISITFLOW_RAW_TEMPLATE`` to change it).

Tested by tests/flow/test_blocks.py (saved to and loaded from a real Prefect server).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from visitflow.blocks import ScopedCredentials, save

BLUEAPI_RAW_TEMPLATE = "{instrument}/{proposal}/{visit}/{run}"


def definition(env: dict | None = None) -> ScopedCredentials:
    """The document from ``env`` (default: this process' environment)."""
    env = dict(os.environ if env is None else env)
    missing = [k for k in ("VISITFLOW_ISSUER", "VISITFLOW_TILED_URI") if not env.get(k)]
    if missing:
        raise SystemExit(f"blocks/kubernetes.py: set {', '.join(missing)} for the target facility")
    return ScopedCredentials(
        issuer=env["VISITFLOW_ISSUER"],
        raw_uri=env["VISITFLOW_TILED_URI"],
        processed_uri=env.get("VISITFLOW_PROCESSED_URI") or None,
        raw_template=env.get("VISITFLOW_RAW_TEMPLATE", BLUEAPI_RAW_TEMPLATE),
        processed_template=env.get("VISITFLOW_PROCESSED_TEMPLATE", "processed/{visit}/{run}/{analysis}"),
        client_secret_env="VISITFLOW_CLIENT_SECRET",
        grant_scope=env.get("VISITFLOW_GRANT_SCOPE", "visit"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="visitflow", help="document name (VISITFLOW_CREDENTIALS_BLOCK)")
    parser.add_argument("--print", action="store_true", help="print the document instead of saving it")
    args = parser.parse_args(argv)
    block = definition()
    if args.print:
        print(json.dumps(block.model_dump(mode="json"), indent=2))
        return 0
    print(f"saved ScopedCredentials {args.name!r}: {save(block, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
