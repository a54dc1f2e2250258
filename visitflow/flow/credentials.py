"""The ``ScopedCredentials`` Prefect Block: how a flow run acts for the user who started it.

Saved once per deployment environment (``visitflow up`` saves ``visitflow-local``), it holds
*where* things are — issuer, Tiled URIs, path templates — and *which* client visitflow is.
The ``visitflow`` client secret is best kept out of Prefect's database: name an environment
variable (``client_secret_env``, default ``VISITFLOW_CLIENT_SECRET``) that the worker's
environment provides (a Kubernetes Secret in production).  ``client_secret`` exists for
single-machine setups and is stored encrypted-at-rest-as-Prefect-does, shown masked.

``for_run`` is every analysis flow's first act (docs/architecture.md §2 step 5).  The
documents each environment saves are defined, runnable and tested, in ``blocks/``
(``blocks/local.py``, ``blocks/kubernetes.py``); :func:`save` is how they register and save.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

from prefect.blocks.core import Block
from prefect.blocks.system import Secret
from pydantic import Field, SecretStr

from ..core import endpoints, names as grants
from .delegation import DataTokenSource, check_grant
from ..errors import ConfigError, GrantMissing
from ..core.layout import Layout
from ..core.tokens import Claims, TokenValidator, unverified_claims

__all__ = [ 'REPOSITORY', 'LOGO_PATH', 'LOGO_URL', 'RunAccess', 'ScopedCredentials', 'save',
]

log = logging.getLogger("visitflow.blocks")

REPOSITORY = "https://github.com/visitflow/visitflow"
LOGO_PATH = "blocks/logo.png"
LOGO_URL = f"https://raw.githubusercontent.com/visitflow/visitflow/main/{LOGO_PATH}"


@dataclass
class RunAccess:
    """What ``for_run`` hands back: authenticated Tiled nodes for exactly one run."""

    visit: str
    run_id: str
    analysis: str
    grant_claims: Claims
    tokens: DataTokenSource
    raw_root: Any
    processed_root: Any
    layout: Layout
    #: the run's beamline (the flow run's ``instrument:`` tag): fills ``{instrument}`` in the raw
    #: template, so one Block serves every beamline on one Prefect
    instrument: str | None = None

    @property
    def raw_path(self) -> str:
        values = {"visit": self.visit, "run": self.run_id}
        if self.instrument is not None:
            values["instrument"] = self.instrument
        try:
            return self.layout.raw.format(**values)
        except KeyError as exc:
            raise ConfigError(f"{exc.args[0]}: a value this flow run does not carry (the trigger tags the run "
                              "instrument:<beamline> from the start document's instrument; by hand: "
                              "`visitflow trigger --instrument`)") from None

    @property
    def processed_run_path(self) -> str:
        return self.layout.processed.prefix(visit=self.visit, run=self.run_id)

    def raw_run(self):
        return self.raw_root[self.raw_path]

    def processed_run(self):
        """The processed run container (created if missing: the data token may do that)."""
        from ..core.tiled_client import ensure_container

        visit_path = self.layout.processed.prefix(visit=self.visit)
        return ensure_container(self.processed_root[visit_path], self.run_id, {"run_id": self.run_id})

    def token_identity(self) -> dict:
        """``sub`` and ``act``/``azp`` of the data token actually used, for provenance."""
        token, _ = self.tokens()
        claims = unverified_claims(token)
        return {"token_sub": claims.get("sub"), "token_act": claims.get("act"), "token_azp": claims.get("azp"),
                "token_scope": claims.get("scope")}


class ScopedCredentials(Block):
    """Act for the user who triggered an analysis: load the run's delegation grant, check it,
    exchange it for a short-lived, refreshing Tiled token limited to that one run.

    The example imports from the public path ``visitflow.blocks``, not this module: Prefect
    shows it as the block type's code example, and servers holding the previous layout's
    records show that same line (tests/flow/test_old_layout.py).

    Example:
        Load the saved document and get Tiled access for one run (a flow does this first):
        ```python
        from visitflow.blocks import ScopedCredentials

        credentials = ScopedCredentials.load("BLOCK_NAME")
        access = credentials.for_run("a1", "<run uid>", "saxs_average")
        raw = access.raw_run()
        ```
    """

    _block_type_name = "Visitflow Scoped Credentials"
    _block_type_slug = "visitflow-scoped-credentials"
    #: blocks/logo.png in this repository, as the project's repository host serves it.
    _logo_url = LOGO_URL
    _description = (
        "Delegated, narrowed data access for visitflow analyses: validates the per-run grant "
        "stored by the trigger, exchanges it (RFC 8693) for a Tiled token limited to one raw run "
        "and its processed results, and refreshes it while the analysis runs."
    )
    _documentation_url = f"{REPOSITORY}/blob/main/blocks/README.md"

    issuer: str = Field(..., description="OIDC issuer URL of the IdP (Keycloak realm URL in production).")
    client_id: str = Field("visitflow", description="OAuth client visitflow exchanges grants as.")
    client_secret: SecretStr | None = Field(
        None, description="The visitflow client's secret. Prefer client_secret_env in production.")
    client_secret_env: str | None = Field(
        "VISITFLOW_CLIENT_SECRET",
        description="Name of an environment variable on the worker holding the client secret "
                    "(used when client_secret is empty).")
    raw_uri: str = Field(..., description="Tiled server URI holding raw runs, e.g. http://tiled:8000.")
    processed_uri: str | None = Field(None, description="Tiled server URI for processed data (default: raw_uri).")
    raw_template: str = Field("raw/{visit}/{run}", description="Node path of a raw run.")
    processed_template: str = Field("processed/{visit}/{run}/{analysis}",
                                    description="Node path of an analysis result.")
    grant_prefix: str = Field(grants.PREFIX, description="Prefix of the per-run grant Secret names.")
    refresh_margin: float = Field(30.0, description="Refresh the data token this many seconds before expiry.")
    grant_scope: Literal["run", "visit"] = Field(
        "run", description="Scope of the data token: 'run' (one raw run and its processed node; needs an "
                           "IdP that mints per-run scopes) or 'visit' (the visit's data; for IdPs with a "
                           "fixed scope list such as Keycloak). Must match the trigger's grant_scope.")

    def secret(self) -> str:
        if self.client_secret is not None and self.client_secret.get_secret_value():
            return self.client_secret.get_secret_value()
        if self.client_secret_env and os.environ.get(self.client_secret_env):
            return os.environ[self.client_secret_env]
        raise ConfigError(
            f"no client secret for {self.client_id}: set client_secret on the block or the "
            f"environment variable {self.client_secret_env} on the worker")

    def layout(self) -> Layout:
        return Layout.from_templates(self.raw_template, self.processed_template)

    def validator(self) -> TokenValidator:
        return TokenValidator(self.issuer, "visitflow")

    def load_grant(self, analysis: str, visit: str, run_id: str) -> str:
        name = grants.grant_secret_name(analysis, visit, run_id, self.grant_prefix)
        try:
            return Secret.load(name, _sync=True).get()
        except ValueError as exc:  # Prefect: "Unable to find block document named ..."
            raise GrantMissing(
                f"no delegation grant stored for {analysis} on {visit}/{run_id} (Secret {name!r}); "
                "analyses are started by the trigger, or by `visitflow trigger` with your own token") from exc

    def check_endpoints(self):
        """Refuse (:class:`~visitflow.errors.EndpointNotAllowed`) an issuer or Tiled URI that is
        not on the worker's allow-list (its ``VISITFLOW_ALLOWED_ENDPOINTS``, which the
        ``visitflow`` worker does not let job variables change): a Block document is data
        anyone with Prefect access can write.  Returns the list (None: none configured)."""
        allow = endpoints.allowed()
        if allow is None:
            log.warning("%s is not set on this worker: %s's endpoints are not checked", endpoints.ENV,
                        self._block_document_name or "this block")
        endpoints.check_block({"issuer": self.issuer, "raw_uri": self.raw_uri,
                               "processed_uri": self.processed_uri}, allow)
        return allow

    def for_run(self, visit: str, run_id: str, analysis: str, instrument: str | None = None) -> RunAccess:
        from ..core.oauth import token_endpoint
        from ..core.tiled_client import BearerAuth, connect

        allow = self.check_endpoints()
        grant = self.load_grant(analysis, visit, run_id)
        claims = check_grant(self.validator(), grant, analysis, visit, run_id)
        token_url = token_endpoint(self.issuer)
        endpoints.check(token_url, "token endpoint (from the issuer's discovery document)", allow)
        tokens = DataTokenSource(token_url, grant, self.client_id, self.secret(),
                                 visit, run_id, margin=self.refresh_margin, per=self.grant_scope, analysis=analysis)
        tokens()  # exchange now: refusals surface here, before any data access
        auth = BearerAuth(tokens, refresh_margin=self.refresh_margin)
        raw_root = connect(self.raw_uri, auth)
        processed_root = raw_root if not self.processed_uri or self.processed_uri == self.raw_uri \
            else connect(self.processed_uri, auth)
        log.info("acting for %s (via %s) on %s/%s", claims.sub, ",".join(claims.actor_chain()), visit, run_id)
        if self.grant_scope == "visit":
            log.warning("data token is visit-wide (grant_scope=visit: the IdP cannot narrow to one run); "
                        "this flow reads only %s/%s", visit, run_id)
        return RunAccess(visit, run_id, analysis, claims, tokens, raw_root, processed_root, self.layout(),
                         instrument=instrument)


def save(block: Block, name: str) -> str:
    """Register ``block``'s type (idempotent) and save it as ``name`` (overwriting); returns
    the document id.  What every ``blocks/<environment>.py`` ends with."""
    type(block).register_type_and_schema()
    return str(block.save(name, overwrite=True))
