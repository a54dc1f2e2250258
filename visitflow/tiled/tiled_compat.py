"""Every Tiled-internal name visitflow's Tiled server plug-ins rely on, in one place, checked
when it is imported.

The plug-ins (this folder: authenticator, principals, access policy, node tags, server) run
inside Tiled's server.  Most of what they touch is an interface Tiled documents for exactly
that; some of it is not, and can change in any Tiled release, including a 0.2.x patch (0.2's
features land in patch releases).  Those names are imported here and nowhere else (a test in
tests/tiled/test_tiled_compat.py reads every module under visitflow/), and each is resolved at
import:

* a name that is **missing** — or no longer takes the parameters we pass, or no longer does
  what we read in its source — raises :class:`~visitflow.errors.TiledIncompatible` naming
  every such name, why we need it, the installed Tiled and the tested range.  Tiled then
  fails to load our authenticator / access policy at start with that message, instead of
  answering 500s (or, worse, silently skipping an override) once requests arrive.  There is
  no degraded mode: install a tested Tiled.
* a Tiled **outside the tested range** whose names all resolve gets a
  :class:`~visitflow.errors.TiledVersionWarning` naming the names at risk (a warning, not an
  error, for the reason :mod:`visitflow.worker.prefect_compat` gives: pyproject allows
  ``tiled<0.3``, and refusing would break every new install the day Tiled publishes a release
  that changed nothing we use).  ``VISITFLOW_STRICT_TILED=1`` in the server's environment
  makes it :class:`~visitflow.errors.TiledIncompatible`.

**The rule: what counts as internal.**  *Public* (import it anywhere): Tiled's client API
(``tiled.client`` and its submodules: ``from_uri``, ``Context``, the node classes), the data
model shared by client and server (``tiled.structures``), queries (``tiled.queries``),
adapters used as documented (``tiled.adapters``), and the server plug-in interfaces an
authenticator or access policy implements — ``tiled.server.protocols``,
``tiled.access_control.protocols`` (``AccessPolicy``, ``normalize_access_tags``),
``tiled.access_control.scopes`` and the scope constants of
``tiled.access_control.access_policies`` (``NO_ACCESS``, ``ALL_ACCESS``, ``ALL_SCOPES``,
``PUBLIC_SCOPES``, ``NO_SCOPES``).  *Internal* (import it here): everything else —
``tiled.server.*`` (its FastAPI dependencies, schemas, settings, app builder),
``tiled.catalog.*`` (the SQL schema and the catalog adapter), ``tiled.config``,
``tiled.authenticators`` (we subclass one and override a private member) — and any member
of a public class that Tiled does not document for plug-ins.  The test holds the same list.

**Why each is needed** (the hand-rolled parts; the docstrings of the modules named say more):

* :mod:`.principals` replaces Tiled's principal dependencies (``get_current_principal`` and
  its websocket twin) through FastAPI's ``dependency_overrides``: Tiled 0.2.20 looks the
  principal up *and commits* on every request with a proxied-OIDC token, and answers a
  websocket ``?access_token=`` with a 500.  The override must declare the same
  sub-dependencies Tiled's does (``oauth2_scheme``, ``get_decoded_access_token``,
  ``get_api_key``, ``move_api_key``, ``get_settings``, ``get_database_session_factory``) and
  falls back to Tiled's own function — positionally — for API keys and Tiled sessions; a
  cache miss calls ``get_or_create_principal``; the principal it returns is Tiled's
  ``Principal`` schema; it reads ``app.state.provider``, which Tiled's ``build_app`` sets.
* :mod:`.authenticator` subclasses ``ProxiedOIDCAuthenticator``, because Tiled routes bearer
  tokens it did not mint to ``settings.authenticator`` only when that is a proxied-OIDC
  authenticator; it overrides ``decode_token``, ``authenticate``, ``issuer``,
  ``end_session_endpoint`` and the private cached ``_config_from_oidc_url`` (discovery with
  retries: the IdP may start after Tiled) — an override of a member the parent dropped would
  silently do nothing, so each is checked on the parent.
* :mod:`.node_tags` inserts rows into the catalog's ``access_tags`` table
  (``AccessTag.__table__``) through the catalog's own session (``Context.session``): Tiled
  refuses to attach a tag that has no row, and runs are not known up front.
* :mod:`.access_policy` registers a server-side query (``CatalogNodeAdapter.register_query``)
  that filters on ``Node.parent`` / ``Node.key`` through ``new_variation(conditions=...)``,
  because Tiled applies only the search root's conditions to a deep search; it reads a
  catalog node's ``node``, ``path_segments()`` and ``access_tags``.
* :mod:`.reconnect` wraps ``SQLStorage._connection_pool`` (a bare ``QueuePool`` of ADBC
  connections) and adds a checkout ping to the catalog engine's pool (``Context.engine``):
  neither pings its connections, so the first requests after a PostgreSQL restart were 500s.
* :mod:`.server` builds the app itself (``Config``, ``build_app_from_config``) to wrap it in
  the request-context middleware and the auth gate, finds our authenticator in
  ``Authentication.authenticators``, and hands the policy the catalog
  (``app.state.root_tree``) through ``app.state.access_policy``.

Attributes Tiled sets at run time (``app.state.provider``, ``self.conditions``...) are checked
by reading the source of the Tiled function that sets them (``source_has``): a weaker check
than a lookup, but it catches a rename.  The real-server tests in tests/tiled/ check the
behaviour.  ``TESTED`` moves with ``constraints.txt``; raise it only after ``.ci/run-unconstrained``
(which runs tests/tiled/test_tiled_compat.py) passed on the new release.
"""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Any

from ..core import compat as _compat
from ..errors import TiledIncompatible, TiledVersionWarning

__all__ = [
    'TESTED', 'InternalName', 'INTERNAL_NAMES',
    'installed_tiled', 'is_tested', 'resolve', 'check', 'at_risk',
    # principals
    'oauth2_scheme', 'get_api_key', 'get_api_key_websocket', 'get_decoded_access_token',
    'get_decoded_access_token_websocket', 'move_api_key', 'get_current_principal',
    'get_current_principal_websocket', 'get_or_create_principal', 'get_database_session_factory',
    'get_settings', 'Principal', 'PrincipalType', 'Identity',
    # authenticator, server
    'ProxiedOIDCAuthenticator', 'Config', 'build_app_from_config', 'parse_config_file',
    # sql_storage
    'SQLAdapter',
    # reconnect
    'SQLStorage',
    # node tags, access policy
    'AccessTag', 'Node', 'CatalogNodeAdapter',
    # live_fence
    'NoEntry',
    # opa_input
    'ExternalPolicyDecisionPoint',
]

#: Tiled releases the server plug-ins were tested on (pip specifier syntax): the one
#: ``constraints.txt`` installs, which is also the newest 0.2 release today.
TESTED = ">=0.2.20,<0.2.21"


@dataclass(frozen=True)
class InternalName:
    """``module`` + ``name`` (dotted for a member of a class), why we need it, the keyword
    ``parameters`` we pass (``positional``: we pass them by position, so their order must
    hold too), and ``source_has``: text the object's source must contain (for what Tiled sets
    at run time, e.g. ``app.state.provider =``)."""

    module: str
    name: str
    why: str
    parameters: tuple[str, ...] = ()
    positional: bool = False
    source_has: str = ""

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}" + (f" [{self.source_has}]" if self.source_has else "")


_AUTH = "tiled.server.authentication"
_APP = "tiled.server.app"
_ADAPTER = "tiled.catalog.adapter"
_ORM = "tiled.catalog.orm"
_PROXIED = "ProxiedOIDCAuthenticator"

INTERNAL_NAMES: tuple[InternalName, ...] = (
    # -- principals.py: the principal dependencies we override ---------------------------------
    InternalName(_AUTH, "get_current_principal",
                 "is the HTTP principal dependency we override (the dependency_overrides key) and "
                 "call for API keys and Tiled sessions",
                 ("request", "security_scopes", "access_token", "decoded_access_token", "api_key", "settings",
                  "db_factory", "_"), positional=True),
    InternalName(_AUTH, "get_current_principal_websocket",
                 "is the websocket principal dependency we override and call for API keys",
                 ("websocket", "api_key", "access_token", "decoded_access_token", "settings", "db_factory"),
                 positional=True),
    InternalName(_AUTH, "oauth2_scheme", "gives the override the bearer token, as Tiled's dependency has it"),
    InternalName(_AUTH, "get_decoded_access_token",
                 "gives the override the token our authenticator decoded (HTTP)"),
    InternalName(_AUTH, "get_decoded_access_token_websocket",
                 "gives the override the token our authenticator decoded (websocket ?access_token=)"),
    InternalName(_AUTH, "get_api_key", "tells API-key requests (left to Tiled) apart (HTTP)"),
    InternalName(_AUTH, "get_api_key_websocket", "tells API-key requests (left to Tiled) apart (websocket)"),
    InternalName(_AUTH, "move_api_key", "is the API-key-to-cookie step Tiled's dependency runs; ours keeps it"),
    InternalName(_AUTH, "get_or_create_principal",
                 "looks a principal up (creating it at first sight) when the principal cache misses",
                 ("db", "identity_provider", "id"), positional=True),
    InternalName("tiled.server.connection_pool", "get_database_session_factory",
                 "gives the override the principals database session"),
    InternalName("tiled.server.settings", "get_settings", "gives the override Tiled's settings"),
    InternalName("tiled.server.schemas", "Principal", "is what the override returns",
                 ("uuid", "type", "identities", "access_token")),
    InternalName("tiled.server.schemas", "PrincipalType", "says what a principal is"),
    InternalName("tiled.server.schemas", "PrincipalType.user", "is the type of our principals"),
    InternalName("tiled.server.schemas", "Identity", "is the principal's (provider, id)", ("id", "provider")),
    InternalName(_APP, "build_app", "names the provider the override puts in identities",
                 source_has="app.state.provider ="),
    # -- authenticator.py: the base class and what we override in it ---------------------------
    InternalName("tiled.authenticators", _PROXIED,
                 "is the only authenticator type Tiled routes tokens it did not mint to (our base class)",
                 ("audience", "client_id", "well_known_uri", "device_flow_client_id", "confirmation_message")),
    InternalName(_APP, "build_app", "makes a single proxied-OIDC provider Tiled's settings.authenticator",
                 source_has="settings.authenticator = authenticator"),
    InternalName(_AUTH, "decode_token", "hands bearer tokens Tiled did not mint to that authenticator",
                 source_has="proxied_authenticator.decode_token(token)"),
    InternalName("tiled.authenticators", f"{_PROXIED}.decode_token",
                 "is overridden: our token validation, refusals as 401s with a reason"),
    InternalName("tiled.authenticators", f"{_PROXIED}.authenticate",
                 "is overridden: no authorization-code login into Tiled"),
    InternalName("tiled.authenticators", f"{_PROXIED}.issuer", "is overridden: the configured issuer"),
    InternalName("tiled.authenticators", f"{_PROXIED}.end_session_endpoint",
                 "is overridden: a logout link for an IdP without end-session endpoint"),
    InternalName("tiled.authenticators", f"{_PROXIED}._config_from_oidc_url",
                 "is overridden (private): discovery retried until the IdP is up"),
    # -- server.py: building the app ourselves -------------------------------------------------
    InternalName("tiled.config", "Config", "is Tiled's parsed configuration"),
    InternalName("tiled.config", "Config.model_validate", "parses the config dict we render"),
    InternalName("tiled.config", "Authentication.authenticators", "is where the server finds our authenticator"),
    InternalName("tiled.config", "parse", "reads a config file as `tiled serve config` does (env vars expanded)"),
    # -- sql_storage.py: concurrent table creation on PostgreSQL -------------------------------
    InternalName("tiled.adapters.sql", "SQLAdapter", "is the tabular adapter whose init_storage we wrap"),
    InternalName("tiled.adapters.sql", "SQLAdapter.init_storage",
                 "is wrapped: two new tables of one schema at once race in CREATE TABLE IF NOT EXISTS",
                 ("storage", "data_source", "path_parts"), positional=True),
    InternalName("tiled.adapters.sql", "SQLAdapter.init_storage", "commits once, at its end (safe to retry)",
                 source_has="conn.commit()"),
    InternalName("tiled.adapters.sql", "SQLAdapter.from_catalog",
                 "is wrapped: PostgreSQL event tables get order_by_args seq_num (rows in scan order)",
                 source_has="order_by_args=data_source.parameters.get"),
    InternalName("tiled.adapters.sql", "SQLAdapter._read_full_table_or_partition",
                 "orders rows by order_by_args (ties: rowid on SQLite/DuckDB only)",
                 source_has="self.order_by_args + order_by_partition"),
    # -- reconnect.py: pooled connections pinged on checkout (PostgreSQL restarts) ------------
    InternalName("tiled.storage", "SQLStorage", "is the tabular storage whose connection pool we ping"),
    InternalName("tiled.storage", "SQLStorage._connection_pool.func",
                 "is a cached bare QueuePool of ADBC connections, no pre-ping: wrapped to add a checkout ping",
                 source_has="sqlalchemy.pool.QueuePool("),
    InternalName(_ADAPTER, "Context.__init__", "is where the catalog keeps the engine we add a checkout ping to",
                 source_has="self.engine = get_database_engine"),
    InternalName(_APP, "build_app_from_config", "builds the app our middlewares wrap"),
    InternalName(_APP, "build_app", "is where the server finds the access policy",
                 source_has="app.state.access_policy ="),
    InternalName(_APP, "build_app", "is the root catalog the node-tag rows are written through",
                 source_has="app.state.root_tree ="),
    # -- node_tags.py: rows of the access_tags table -------------------------------------------
    InternalName(_ORM, "AccessTag", "is the ORM class of Tiled's access_tags table"),
    InternalName(_ORM, "AccessTag.__table__", "is the table our tag rows go into"),
    InternalName(_ORM, "AccessTag.name", "is the column a tag row is keyed on (ON CONFLICT)"),
    InternalName(_ORM, "AccessTag.is_public", "is the column we set to False"),
    InternalName(_ADAPTER, "Context.session", "is the catalog's own database session"),
    InternalName(_ADAPTER, "CatalogNodeAdapter.__init__", "gives the catalog node its context",
                 source_has="self.context = context"),
    # -- access_policy.py: the catalog query and the node ---------------------------------------
    InternalName(_ADAPTER, "CatalogNodeAdapter", "is the catalog node class our server-side query registers on"),
    InternalName(_ADAPTER, "CatalogNodeAdapter.register_query", "registers the DirectChildren query"),
    InternalName(_ADAPTER, "CatalogNodeAdapter.new_variation", "narrows a listing by our conditions",
                 ("conditions",)),
    InternalName(_ADAPTER, "CatalogNodeAdapter.__init__", "is the listing's existing conditions we add to",
                 source_has="self.conditions = conditions"),
    InternalName(_ADAPTER, "CatalogNodeAdapter.__init__", "is the ORM row of a node (id, parent, key)",
                 source_has="self.node = node"),
    InternalName(_ADAPTER, "CatalogNodeAdapter.path_segments", "is a node's path, which the layout places"),
    InternalName(_ADAPTER, "CatalogNodeAdapter.access_tags", "are the tags our policy reads back"),
    InternalName(_ADAPTER, "CatalogNodeAdapter.lookup_adapter", "finds a raw run container by path (raw_runs: "
                 "is the run closed?)"),
    InternalName(_ADAPTER, "CatalogNodeAdapter.metadata", "is where a run's stop document shows it is closed"),
    InternalName("tiled.server.core", "NoEntry", "is what lookup_adapter raises for a missing node (live_fence: "
                 "a live node not created yet is unclaimed)"),
    InternalName(_ORM, "Node", "is the ORM class of Tiled's nodes table"),
    InternalName(_ORM, "Node.parent", "is the column DirectChildren filters on"),
    InternalName(_ORM, "Node.key", "is the column DirectChildren filters on"),
    # -- opa_input.py: Tiled's own OPA policy, its one abstract method --------------------------
    InternalName("tiled.access_control.access_policies", "ExternalPolicyDecisionPoint",
                 "is Tiled's OPA access policy (deployments/opa/tiled-access-control.yml)"),
    InternalName("tiled.access_control.access_policies", "ExternalPolicyDecisionPoint.build_input",
                 "is the abstract method opa_input.py fills in",
                 ("self", "principal", "authn_access_tags", "authn_scopes", "access_tags"), positional=True),
)


def installed_tiled() -> str:
    return _compat.installed("tiled")


def is_tested(version: str, tested: str = TESTED) -> bool:
    return _compat.is_tested(version, tested)


def _lookup(entry: InternalName) -> Any:
    return _compat.lookup(entry.module, entry.name)


def resolve(entry: InternalName) -> Any:
    """The object ``entry`` names; ``LookupError`` (with what is wrong) if it is missing, no
    longer takes the parameters we pass, or no longer contains ``source_has``."""
    try:
        obj = _lookup(entry)
    except (ImportError, AttributeError) as exc:
        raise LookupError(f"{entry.qualname} is missing ({exc})") from None
    if entry.parameters:
        try:
            accepted = list(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            accepted = []
        if entry.positional and accepted[:len(entry.parameters)] != list(entry.parameters):
            raise LookupError(f"{entry.qualname} now takes ({', '.join(accepted)}); "
                              f"we pass ({', '.join(entry.parameters)}) in that order")
        lost = [p for p in entry.parameters if p not in accepted]
        if lost:
            raise LookupError(f"{entry.qualname} no longer takes {', '.join(lost)}")
    if entry.source_has:
        try:
            source = inspect.getsource(obj)
        except (OSError, TypeError):
            source = None  # an install without sources: nothing to read, the lookup stands
        if source is not None and entry.source_has not in source:
            raise LookupError(f"{entry.module}.{entry.name} no longer contains {entry.source_has!r}")
    return obj


def check(entries=INTERNAL_NAMES, version: str | None = None) -> dict[str, Any]:
    """Resolve every entry; raise one :class:`TiledIncompatible` naming all that fail."""
    resolved, problems = _compat.resolve_all(entries, resolve)
    if problems:
        raise TiledIncompatible(
            f"visitflow's Tiled plug-ins cannot run on tiled {version or installed_tiled()} (tested: {TESTED}); "
            "internal Tiled names they rely on changed:\n" + "\n".join(problems) +
            "\nInstall a tested Tiled (pip install -c constraints.txt ..., or 'tiled[server]==0.2.20').")
    return resolved


def at_risk() -> str:
    return ", ".join(dict.fromkeys(f"{e.module}.{e.name}" for e in INTERNAL_NAMES))


def _check_version() -> None:
    version = installed_tiled()
    if is_tested(version):
        return
    text = (f"tiled {version} is outside the range visitflow's Tiled plug-ins were tested on ({TESTED}); "
            f"every internal name they rely on is present, but their behaviour may have changed: {at_risk()}. "
            "Run tests/tiled/ on this install (.ci/run-unconstrained runs tests/tiled/test_tiled_compat.py) "
            "before relying on it.")
    if os.environ.get("VISITFLOW_STRICT_TILED", "").lower() in ("1", "true", "yes"):
        raise TiledIncompatible(text + " (VISITFLOW_STRICT_TILED is set)")
    warnings.warn(TiledVersionWarning(text), stacklevel=3)


_NAMES = check()
_check_version()

# principals.py
oauth2_scheme = _NAMES[f"{_AUTH}.oauth2_scheme"]
get_api_key = _NAMES[f"{_AUTH}.get_api_key"]
get_api_key_websocket = _NAMES[f"{_AUTH}.get_api_key_websocket"]
get_decoded_access_token = _NAMES[f"{_AUTH}.get_decoded_access_token"]
get_decoded_access_token_websocket = _NAMES[f"{_AUTH}.get_decoded_access_token_websocket"]
move_api_key = _NAMES[f"{_AUTH}.move_api_key"]
get_current_principal = _NAMES[f"{_AUTH}.get_current_principal"]
get_current_principal_websocket = _NAMES[f"{_AUTH}.get_current_principal_websocket"]
get_or_create_principal = _NAMES[f"{_AUTH}.get_or_create_principal"]
get_database_session_factory = _NAMES["tiled.server.connection_pool.get_database_session_factory"]
get_settings = _NAMES["tiled.server.settings.get_settings"]
Principal = _NAMES["tiled.server.schemas.Principal"]
PrincipalType = _NAMES["tiled.server.schemas.PrincipalType"]
Identity = _NAMES["tiled.server.schemas.Identity"]
# authenticator.py, server.py
ProxiedOIDCAuthenticator = _NAMES[f"tiled.authenticators.{_PROXIED}"]
Config = _NAMES["tiled.config.Config"]
build_app_from_config = _NAMES[f"{_APP}.build_app_from_config"]
parse_config_file = _NAMES["tiled.config.parse"]
# sql_storage.py
SQLAdapter = _NAMES["tiled.adapters.sql.SQLAdapter"]
# reconnect.py
SQLStorage = _NAMES["tiled.storage.SQLStorage"]
# node_tags.py, access_policy.py
AccessTag = _NAMES[f"{_ORM}.AccessTag"]
Node = _NAMES[f"{_ORM}.Node"]
CatalogNodeAdapter = _NAMES[f"{_ADAPTER}.CatalogNodeAdapter"]
# live_fence.py
NoEntry = _NAMES["tiled.server.core.NoEntry"]
# opa_input.py
ExternalPolicyDecisionPoint = _NAMES["tiled.access_control.access_policies.ExternalPolicyDecisionPoint"]
