"""Every exception visitflow raises, under one root — so a caller can catch ``VisitflowError``
and branch on a machine-readable ``code`` instead of matching message text.

The tree (``code`` of each class in brackets)::

    VisitflowError [visitflow]
    ├── DefinitionError [definition]            something configured or declared cannot work
    │   ├── AnalysisDefinitionError [analysis_definition]   an @analysis that cannot work (TypeError)
    │   ├── ScopeError [scope]                  a string that is not a visitflow scope (ValueError)
    │   ├── ConfigError [config]                inconsistent or missing configuration (ValueError)
    │   ├── FileRootError [file_root]           an unusable detector-file root template (ValueError)
    │   ├── UsageError [usage]                  a call's arguments cannot work (ValueError)
    │   ├── OptionError [option]                an analysis option value or declaration (ValueError)
    │   ├── PrefectIncompatible [prefect_incompatible]  the installed Prefect lacks a private name
    │   │                                       the warm worker relies on (ImportError)
    │   └── TiledIncompatible [tiled_incompatible]  the installed Tiled lacks an internal name the
    │                                           server plug-ins rely on (ImportError)
    ├── InvalidToken [invalid_token]            a token that must be refused (401); ``reason`` is safe
    │   │                                       to send back; ``code`` says which check failed:
    │   │                                       ``expired``, ``bad_signature``, ``wrong_audience``, …
    │   ├── InsufficientScope [insufficient_scope]  valid, but lacks the scope needed (403)
    │   └── MoreThanOneCredential [more_than_one_credential]  several credentials in one request (400)
    ├── DelegationError [delegation]            a flow run cannot act for the user
    │   ├── GrantMissing [grant_missing]        no grant stored: the trigger never delegated
    │   ├── GrantInvalid [grant_invalid]        the stored grant is not a valid visitflow token
    │   ├── DelegationExpired [delegation_expired]  the grant (and every refresh) has expired
    │   ├── NotAuthorised [not_authorised]      valid, but does not cover this analysis/visit/run
    │   └── EndpointNotAllowed [endpoint_not_allowed]  an issuer, Tiled URI or token endpoint off
    │                                           the worker's own allow-list: no secret is sent there
    ├── RemoteError [remote]                    a server visitflow calls answered badly
    │   ├── Refused [refused]                   it decided: retrying the same request cannot help
    │   │   ├── OAuthRefused [oauth_refused]    the IdP's 4xx; ``error`` is the RFC 6749 code
    │   │   └── PrefectRefused [prefect_refused]    Prefect's 4xx or 500; ``status`` is the HTTP status
    │   └── Unavailable [unavailable]           not reachable, 5xx or 429: try again later
    │       ├── OAuthUnavailable [oauth_unavailable]
    │       ├── PrefectUnavailable [prefect_unavailable]
    │       └── AuthorityUnavailable [authority_unavailable]  the authority (OPA) gave no decision: fail closed (503)
    ├── RunError [run]                          the raw run cannot be analysed (as asked), e.g. it shrank
    │   ├── RunNotFinished [run_not_finished]   post gave up waiting for the stop document (TimeoutError)
    │   ├── RunAborted [run_aborted]            the run ended without success
    │   ├── EmptyRun [empty_run]                the run finished with no frames: nothing to analyse
    │   ├── MissingField [missing_field]        a ``reads=`` field is not in the run (KeyError)
    │   ├── LiveIdleTimeout [live_idle_timeout] live saw no new frames nor a stop document (TimeoutError)
    │   └── Superseded [superseded]             Tiled refused this live attempt's write: a later attempt
    │                                           of the same flow run owns the result (the fence, 409)
    ├── ServiceError [service]                  a process visitflow started misbehaved (RuntimeError)
    │   ├── ServiceFailed [service_failed]      a server did not come up or died
    │   └── ZygoteDied [zygote_died]            the warm worker's pre-imported parent died
    ├── OAuthError [oauth_error]                the dev IdP's own error answer (RFC 6749 body)
    ├── PrefectVersionWarning [prefect_version]  a warning: Prefect outside the tested range (UserWarning)
    └── TiledVersionWarning [tiled_version]  a warning: Tiled outside the plug-ins' tested range (UserWarning)

Each class keeps the standard base that callers used before (``TimeoutError``, ``KeyError``,
``ValueError``, …), and each stays importable from the module that raises it
(``visitflow.flow.engine.RunAborted`` is ``visitflow.errors.RunAborted``).

This module imports nothing from visitflow: it is a leaf, like the protocols in
:mod:`visitflow.flow.engine`, so any module may use it without creating an import cycle.
"""

from __future__ import annotations

__all__ = [
    "VisitflowError",
    "DefinitionError", "AnalysisDefinitionError", "ScopeError", "ConfigError", "FileRootError", "UsageError",
    "OptionError", "PrefectIncompatible", "TiledIncompatible",
    "InvalidToken", "InsufficientScope", "MoreThanOneCredential",
    "DelegationError", "GrantMissing", "GrantInvalid", "DelegationExpired", "NotAuthorised",
    "EndpointNotAllowed",
    "RemoteError", "Refused", "OAuthRefused", "PrefectRefused",
    "Unavailable", "OAuthUnavailable", "PrefectUnavailable", "AuthorityUnavailable",
    "RunError", "RunNotFinished", "RunAborted", "EmptyRun", "MissingField", "LiveIdleTimeout", "Superseded",
    "ServiceError", "ServiceFailed", "ZygoteDied",
    "OAuthError", "PrefectVersionWarning", "TiledVersionWarning",
]


class VisitflowError(Exception):
    """The root of every exception visitflow raises.  ``code`` is stable and machine-readable;
    the message is for people and may change."""

    code: str = "visitflow"


# -- definitions and configuration ---------------------------------------------------------

class DefinitionError(VisitflowError):
    """Something declared or configured cannot work; the message says how to fix it."""

    code = "definition"


class AnalysisDefinitionError(DefinitionError, TypeError):
    """An ``@analysis`` definition that cannot work; the message says how to fix it."""

    code = "analysis_definition"


class ScopeError(DefinitionError, ValueError):
    """A string that claims to be a visitflow scope but does not follow the grammar."""

    code = "scope"


class ConfigError(DefinitionError, ValueError):
    """Configuration is inconsistent or missing (the IdP YAML, a block's client secret); the
    message says where."""

    code = "config"


class FileRootError(DefinitionError, ValueError):
    """A configured detector-file root template is unusable."""

    code = "file_root"


class UsageError(DefinitionError, ValueError):
    """A call's arguments cannot work (an unknown variant, an empty analysis list, …)."""

    code = "usage"


class OptionError(DefinitionError, ValueError):
    """An analysis option value (from a plan) or declaration that cannot be used; the message
    names the option and why (:mod:`visitflow.core.options`)."""

    code = "option"


class PrefectIncompatible(DefinitionError, ImportError):
    """The installed Prefect lacks a private name the warm worker relies on
    (:mod:`visitflow.worker.prefect_compat`); the message names each one, the installed
    version and the tested range."""

    code = "prefect_incompatible"


class TiledIncompatible(DefinitionError, ImportError):
    """The installed Tiled lacks an internal name (or a parameter, or a behaviour we read in its
    source) that visitflow's Tiled server plug-ins rely on (:mod:`visitflow.tiled.tiled_compat`);
    the message names each one, the installed version and the tested range."""

    code = "tiled_incompatible"


# -- tokens --------------------------------------------------------------------------------

class InvalidToken(VisitflowError):
    """A token that must be refused.  ``reason`` is safe to send back to the caller;
    ``status`` is the HTTP status a server answers with; ``code`` names the failed check
    (``expired``, ``not_yet_valid``, ``wrong_audience``, ``wrong_issuer``, ``missing_claim``,
    ``bad_signature``, ``malformed``, ``bad_algorithm``, ``wrong_type``, ``unknown_key``,
    ``keys_unavailable``, ``no_token``, ``revoked``, or the generic ``invalid_token``)."""

    code = "invalid_token"

    def __init__(self, reason: str, *, status: int = 401, code: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        if code is not None:
            self.code = code


class InsufficientScope(InvalidToken):
    """The token is valid but does not carry the scope needed (HTTP 403)."""

    code = "insufficient_scope"

    def __init__(self, reason: str):
        super().__init__(reason, status=403)


class MoreThanOneCredential(InvalidToken):
    """A request or stream subscription carried more than one credential (HTTP 400): refused,
    never guessed between (see :mod:`visitflow.tiled.credentials`).  ``places`` says where."""

    code = "more_than_one_credential"

    def __init__(self, reason: str, *, places: tuple[str, ...] = ()):
        super().__init__(reason, status=400)
        self.places = tuple(places)


# -- delegation (a flow run acting for the user) -------------------------------------------

class DelegationError(VisitflowError):
    """Base of the errors a flow run reports when it cannot act for the user."""

    code = "delegation"


class GrantMissing(DelegationError):
    """No grant was stored for this (analysis, visit, run): the trigger never delegated."""

    code = "grant_missing"


class GrantInvalid(DelegationError):
    """The stored grant is not a valid token for visitflow (bad signature, audience, issuer...)."""

    code = "grant_invalid"


class DelegationExpired(DelegationError):
    """The grant (and any refresh of the data token) has expired: re-trigger with a fresh login."""

    code = "delegation_expired"


class NotAuthorised(DelegationError):
    """The grant is valid but does not cover this analysis / visit / run."""

    code = "not_authorised"


class EndpointNotAllowed(DelegationError):
    """A credentials Block (or the issuer's discovery document) names an issuer, Tiled URI or
    token endpoint that is not on the worker's own allow-list (``VISITFLOW_ALLOWED_ENDPOINTS``):
    whoever can create a flow run must not choose where the worker sends its client secret."""

    code = "endpoint_not_allowed"


# -- servers visitflow calls ---------------------------------------------------------------

class RemoteError(VisitflowError):
    """A server visitflow calls (the IdP, Prefect) answered badly or not at all."""

    code = "remote"


class Refused(RemoteError):
    """The server decided against the request: retrying it unchanged cannot succeed."""

    code = "refused"


class Unavailable(RemoteError):
    """The server could not be reached, or answered 5xx/429: try again later."""

    code = "unavailable"


class OAuthRefused(Refused):
    """The IdP refused (4xx with an RFC 6749 error body): do not retry.  ``error`` is the
    RFC 6749 error code (``invalid_scope``, ``invalid_grant``, …)."""

    code = "oauth_refused"

    def __init__(self, error: str, description: str, status: int):
        super().__init__(f"{error}: {description}" if description else error)
        self.error, self.description, self.status = error, description, status


class OAuthUnavailable(Unavailable):
    """The IdP could not be reached or answered 5xx/429: retry later."""

    code = "oauth_unavailable"


class PrefectRefused(Refused):
    """Prefect answered an error that retrying in place will not fix: a 4xx (the request itself
    is wrong, e.g. no such deployment) or a 500.  Only 429/502/503/504 are retried inside
    ``PrefectAPI`` (as Prefect's own client does); the trigger's outbox retries the rest on its
    own schedule."""

    code = "prefect_refused"

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class PrefectUnavailable(Unavailable):
    """Prefect could not be reached, or kept answering 429/502/503/504: try again later."""

    code = "prefect_unavailable"


class AuthorityUnavailable(Unavailable):
    """The authority (an OPA server) could not be asked or gave no usable decision.  Callers
    fail closed: nothing is allowed, and the answer is a 503 saying why, never a 500."""

    code = "authority_unavailable"


# -- the raw run ---------------------------------------------------------------------------

class RunError(VisitflowError):
    """The raw run cannot be analysed as asked."""

    code = "run"


class RunNotFinished(RunError, TimeoutError):
    """Post processing gave up waiting for the raw run's stop document."""

    code = "run_not_finished"


class RunAborted(RunError, RuntimeError):
    """The raw run ended without success; post refuses to analyse it."""

    code = "run_aborted"


class EmptyRun(RunError, RuntimeError):
    """The raw run finished successfully with no frames: there is nothing to analyse.  Post
    and live end the same way (failed, this message), so an empty scan is never mistaken
    for a result."""

    code = "empty_run"


class MissingField(RunError, KeyError):
    """A field named in ``reads=`` is not in the raw run."""

    code = "missing_field"

    def __str__(self):  # KeyError would quote the message
        return self.args[0] if self.args else "missing field"


class LiveIdleTimeout(RunError, TimeoutError):
    """Live processing saw neither new frames nor a stop document for too long."""

    code = "live_idle_timeout"


class Superseded(RunError):
    """Tiled fenced this live attempt off: the flow run was rescheduled (its heartbeats stopped,
    e.g. its host was cut off) and a later attempt claimed the live result.  This attempt must
    stop without writing and without reporting a state: the flow run is the later attempt's
    (visitflow/tiled/live_fence.py)."""

    code = "superseded"


# -- processes visitflow starts ------------------------------------------------------------

class ServiceError(VisitflowError, RuntimeError):
    """A process visitflow started did not behave."""

    code = "service"


class ServiceFailed(ServiceError):
    """A server did not become healthy in time, or exited; the message has its log tail."""

    code = "service_failed"


class ZygoteDied(ServiceError):
    """The warm worker's pre-imported parent process died; flow runs fall back to cold starts."""

    code = "zygote_died"


# -- the dev IdP's answers -----------------------------------------------------------------

class OAuthError(VisitflowError):
    """An error the dev IdP answers with: an RFC 6749 body ``{error, error_description}``."""

    code = "oauth_error"

    def __init__(self, error: str, description: str, status: int = 400, headers: dict | None = None):
        super().__init__(f"{error}: {description}")
        self.error, self.description, self.status, self.headers = error, description, status, headers


# -- warnings ------------------------------------------------------------------------------

class PrefectVersionWarning(VisitflowError, UserWarning):
    """Prefect is outside the range the warm worker was tested on, though every private name
    it relies on is still there (:mod:`visitflow.worker.prefect_compat`).  Turn it into an
    error with ``-W error::visitflow.errors.PrefectVersionWarning``."""

    code = "prefect_version"


class TiledVersionWarning(VisitflowError, UserWarning):
    """Tiled is outside the range the server plug-ins were tested on, though every internal
    name they rely on is still there (:mod:`visitflow.tiled.tiled_compat`).  Turn it into an
    error with ``VISITFLOW_STRICT_TILED=1`` or ``-W error::visitflow.errors.TiledVersionWarning``."""

    code = "tiled_version"
