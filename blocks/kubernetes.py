"""The facility's ``ScopedCredentials`` document, for flow runs on the ``visitflow-k8s`` pool.

Values come from the environment an operator (or a CI job) sets for the target facility,
so nothing site-specific lives in git::

    VISITFLOW_ISSUER=https://token-service.example \\
    VISITFLOW_TILED_URI=https://tiled.example VISITFLOW_INSTRUMENT=i22 \\
    PREFECT_API_URL=... python blocks/kubernetes.py            # --print: show, do not save

Differences from ``blocks/local.py``, each for a reason:

- ``client_secret_env=VISITFLOW_CLIENT_SECRET`` and never ``client_secret``: the job
  template (deployments/kubernetes/base-job-template.json) fills that variable from the
  Kubernetes Secret ``visitflow-oidc``, so the secret never enters Prefect's database;
- ``grant_scope=run`` by default: the facility topology is the token-service one
  (docs/production.md §9), whose issuer mints per-run scopes.  ``VISITFLOW_GRANT_SCOPE=visit``
  only when ``VISITFLOW_ISSUER`` is a Keycloak realm itself (a fixed list of client scopes
  cannot name one run: docs/production.md, "grant scope"); the trigger's setting must match;
- ``raw_template`` follows blueapi's layout: ``VISITFLOW_RAW_TEMPLATE={instrument}/{proposal}/{visit}/{run}``
  serves every beamline with one document (a flow run carries its instrument: the trigger tags
  it ``instrument:<beamline>`` from the start document, ``RunAccess.raw_path`` fills it in);
  ``VISITFLOW_INSTRUMENT=i22`` fixes one beamline (``i22/{proposal}/{visit}/{run}``); else
  visitflow's ``raw/{visit}/{run}``.  :func:`definition` refuses a template that a flow run
  cannot fill from its visit, run and instrument (an unknown placeholder would otherwise be a
  ``KeyError`` in every flow run).

Tested by tests/flow/test_blocks.py (saved to and loaded from a real Prefect server).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from visitflow.blocks import ScopedCredentials, save

BLUEAPI_RAW_TEMPLATE = "{instrument}/{proposal}/{visit}/{run}"
#: What RunAccess.raw_path formats a raw template with (an instrument session as the visit).
SAMPLE_RUN = {"visit": "cm12345-1", "run": "0f1e2d3c", "instrument": "i22"}


def raw_template(env: dict) -> str:
    """The raw template for ``env``, refused unless a flow run can fill it (see the module doc)."""
    if env.get("VISITFLOW_RAW_TEMPLATE"):
        template = env["VISITFLOW_RAW_TEMPLATE"]
    elif env.get("VISITFLOW_INSTRUMENT"):
        template = BLUEAPI_RAW_TEMPLATE.replace("{instrument}", env["VISITFLOW_INSTRUMENT"])
    else:
        template = ScopedCredentials.model_fields["raw_template"].default  # raw/{visit}/{run}
    try:  # as RunAccess.raw_path does it, through the block's own layout
        ScopedCredentials(issuer="https://x", raw_uri="https://x", raw_template=template).layout().raw.format(
            **SAMPLE_RUN)
    except (KeyError, ValueError) as exc:  # ValueError: visitflow.errors.ScopeError (a malformed template)
        raise SystemExit(f"blocks/kubernetes.py: raw template {template!r} cannot be filled from a run's "
                         f"visit, run and instrument ({exc}); use only {{instrument}}, {{proposal}}, "
                         "{visit} and {run}") from None
    return template


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
        raw_template=raw_template(env),
        processed_template=env.get("VISITFLOW_PROCESSED_TEMPLATE", "processed/{visit}/{run}/{analysis}"),
        client_secret_env="VISITFLOW_CLIENT_SECRET",
        grant_scope=env.get("VISITFLOW_GRANT_SCOPE", "run"),
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
