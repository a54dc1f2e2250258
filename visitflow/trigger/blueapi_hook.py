"""visitflow's hook into blueapi 1.21.1 as released: list this module in blueapi's config.

::

    env:
      sources:
        - kind: planFunctions
          module: visitflow.trigger.blueapi_hook     # first: the hook (it defines no plans)
        - kind: planFunctions
          module: my_beamline.plans                  # plans may use @uses_analyses(...)

plus ``VISITFLOW_TRIGGER_CONFIG=/path/to/visitflow-trigger.yaml`` (and the client secret in
the environment) — docs/blueapi.md has the settings.

Why this seam.  blueapi has no callback hook.  Its ``begin_task(task, pass_through_headers)``
receives the caller's request headers (``ApplicationConfig.PROPAGATED_HEADERS``: traceparent,
tracestate, authorization) and builds, per task, ``TiledWriter(<client>, batch_size=1)``,
subscribes it to the context's RunEngine and unsubscribes it when the task completes.  The
client is either one carrying those pass-through headers or, with ``tiled.authentication:
ServiceAccount``, one shared client authenticated as the beamline's service account.  blueapi
calls ``begin_task`` in its worker subprocess by *name* (``import_and_run_function``) and looks
``TiledWriter`` up in ``blueapi.service.interface`` at call time.  blueapi imports
``env.sources`` modules while it builds its context, in that same process.  So importing this
module replaces those two names:

* ``begin_task`` by a wrapper that remembers the caller's bearer token from
  ``pass_through_headers`` for the duration of the call (a context variable), then calls
  blueapi's own ``begin_task`` unchanged;
* ``TiledWriter`` by :class:`TriggeringTiledWriter`: blueapi's own TiledWriter, unchanged,
  which afterwards hands each document to the process's one :class:`AnalysisTrigger` with
  the token remembered when blueapi built it.

The caller's token therefore comes from the request in *both* Tiled modes — never from the
Tiled client, which in service-account mode holds the service account's identity (who
writes the raw data is blueapi's business; whose rights the analyses act with is the
caller's).  The trigger lives and dies with blueapi's subscription; nothing else in blueapi
is touched.  A blueapi whose ``begin_task`` no longer takes ``pass_through_headers`` or that
has no ``TiledWriter`` there is refused with one ERROR line naming the tested versions.

It never blocks or raises into blueapi: the trigger only writes rows to its local outbox on
the RunEngine thread (a background thread talks to the IdP and Prefect), every trigger error
is logged and swallowed, and a missing or broken configuration leaves blueapi exactly as it
was, with one ERROR line saying why.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import os
import threading
from dataclasses import fields
from pathlib import Path

from ..errors import ConfigError
from .callback import AnalysisTrigger, TriggerSettings

log = logging.getLogger("visitflow.trigger.blueapi")

__all__: list[str] = []  # blueapi registers every name in __all__ as a plan: none here

#: Path of the YAML settings file (keys: the TriggerSettings fields, plus client_secret_env).
CONFIG_ENV = "VISITFLOW_TRIGGER_CONFIG"
#: Environment variables that override the file (secrets belong here, not in the file).
ENV_OVERRIDES = {
    "VISITFLOW_ISSUER": "issuer",
    "VISITFLOW_PREFECT_API_URL": "prefect_api_url",
    "VISITFLOW_TRIGGER_CLIENT_ID": "client_id",
    "VISITFLOW_TRIGGER_STATE_DIR": "state_dir",
    "PREFECT_API_AUTH_STRING": "prefect_auth_string",
    "VISITFLOW_TRIGGER_METRICS_PORT": "metrics_port",
}
DEFAULT_SECRET_ENV = "VISITFLOW_TRIGGER_CLIENT_SECRET"

#: blueapi versions the hook was tested against (the names it replaces are theirs).
TESTED_BLUEAPI = ("1.21.1",)

_lock = threading.Lock()
#: The caller's bearer token while blueapi's ``begin_task`` runs (it builds the TiledWriter).
_caller_token: contextvars.ContextVar[str | None] = contextvars.ContextVar("visitflow_caller_token",
                                                                           default=None)
_settings: TriggerSettings | None = None
_trigger: AnalysisTrigger | None = None


def load_settings(environ=os.environ) -> TriggerSettings:
    """Settings from the file named by ``VISITFLOW_TRIGGER_CONFIG`` and the environment."""
    raw: dict = {}
    path = environ.get(CONFIG_ENV)
    if path:
        import yaml  # blueapi depends on PyYAML

        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read {CONFIG_ENV}={path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of settings")
    for var, key in ENV_OVERRIDES.items():
        if environ.get(var):
            raw[key] = environ[var]
    secret_env = raw.pop("client_secret_env", DEFAULT_SECRET_ENV)
    if not raw.get("client_secret") and environ.get(secret_env):
        raw["client_secret"] = environ[secret_env]
    known = {f.name for f in fields(TriggerSettings)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown visitflow trigger settings {unknown} (known: {sorted(known)})")
    for required in ("issuer", "prefect_api_url"):
        if not raw.get(required):
            raise ConfigError(f"visitflow trigger setting {required!r} is not set")
    if not raw.get("client_secret"):
        raise ConfigError(f"no client secret for {raw.get('client_id', 'blueapi')}: set {secret_env}")
    if "state_dir" in raw:
        raw["state_dir"] = Path(raw["state_dir"])
    if "post_on" in raw:
        raw["post_on"] = tuple(raw["post_on"])
    return TriggerSettings(**raw)


def shared_trigger() -> AnalysisTrigger | None:
    """The process's one trigger (one outbox, one sender thread), made on first use."""
    global _trigger
    with _lock:
        if _trigger is None and _settings is not None:
            # Each task's token arrives with its documents (TriggeringTiledWriter); this one is
            # only asked for when a document comes without one.
            _trigger = AnalysisTrigger(_settings, token=_no_token)
        return _trigger


def _no_token() -> str:
    raise LookupError("the task's request carried no bearer token in blueapi's pass-through "
                      "headers (is blueapi's OIDC on?)")


def bearer_from_headers(headers) -> str | None:
    """The bearer token in blueapi's ``pass_through_headers`` (header names in any case)."""
    if not headers:
        return None
    try:
        items = headers.items()
    except AttributeError:
        return None
    header = next((v for k, v in items if isinstance(k, str) and k.casefold() == "authorization"), "")
    scheme, _, token = str(header).partition(" ")
    return token.strip() if scheme.casefold() == "bearer" and token.strip() else None


def _writer_class():
    from bluesky.callbacks.tiled_writer import TiledWriter

    class TriggeringTiledWriter(TiledWriter):
        """blueapi's TiledWriter, then visitflow's trigger with the caller's token (taken from
        the request's pass-through headers by :func:`_wrap_begin_task`, whatever identity the
        Tiled client writes with)."""

        def __init__(self, client, *args, **kwargs):
            super().__init__(client, *args, **kwargs)
            self._visitflow_token = None
            self._visitflow = None
            try:
                self._visitflow_token = _caller_token.get()
                self._visitflow = shared_trigger()
            except Exception:  # noqa: BLE001 - blueapi's task goes on without the trigger
                log.exception("visitflow trigger: not attached to this task")

        def __call__(self, name, doc, *args, **kwargs):
            out = super().__call__(name, doc, *args, **kwargs)   # the raw data first
            if self._visitflow is not None:
                self._visitflow(name, doc, token=self._visitflow_token)  # never raises
            return out

    return TriggeringTiledWriter


def _wrap_begin_task(begin_task):
    """blueapi's ``begin_task``, with the caller's bearer token remembered while it runs."""

    @functools.wraps(begin_task)
    def visitflow_begin_task(task, pass_through_headers=None, *args, **kwargs):
        reset = _caller_token.set(bearer_from_headers(pass_through_headers))
        try:
            return begin_task(task, pass_through_headers, *args, **kwargs)
        finally:
            _caller_token.reset(reset)

    visitflow_begin_task._visitflow_hook = True
    return visitflow_begin_task


def check_interface(interface) -> None:
    """Refuse a blueapi whose seam is not the one the hook was tested on: ``begin_task`` taking
    ``pass_through_headers`` and a module-level ``TiledWriter``, both in
    ``blueapi.service.interface``."""
    tested = ", ".join(TESTED_BLUEAPI)
    begin = getattr(interface, "begin_task", None)
    problems = []
    if getattr(interface, "TiledWriter", None) is None:
        problems.append("has no TiledWriter")
    if not callable(begin):
        problems.append("has no begin_task")
    else:
        try:
            params = inspect.signature(begin).parameters
        except (TypeError, ValueError):
            params = {}
        if "pass_through_headers" not in params:
            problems.append("begin_task takes no pass_through_headers")
    if problems:
        try:
            from importlib.metadata import version

            found = version("blueapi")
        except Exception:  # noqa: BLE001 - only for the message
            found = "unknown"
        raise ConfigError(f"blueapi.service.interface {' and '.join(problems)}: blueapi {found} is not "
                          f"a version the hook knows (tested with blueapi {tested})")


def install(settings: TriggerSettings | None = None, interface=None) -> bool:
    """Put :class:`TriggeringTiledWriter` where blueapi's ``begin_task`` finds TiledWriter, and
    wrap ``begin_task`` to hand it the caller's token.  True if installed; False (with ONE
    ERROR log line) if it cannot be — blueapi runs on, unchanged."""
    global _settings
    try:
        settings = settings or load_settings()
        if interface is None:
            from blueapi.service import interface
        check_interface(interface)
        if not getattr(interface.TiledWriter, "_visitflow_hook", False):
            writer = _writer_class()
            writer._visitflow_hook = True
            interface.TiledWriter = writer
        if not getattr(interface.begin_task, "_visitflow_hook", False):
            interface.begin_task = _wrap_begin_task(interface.begin_task)
        _settings = settings
    except Exception as exc:  # noqa: BLE001 - a bad hook config must not stop blueapi
        log.error("visitflow trigger NOT installed: %s", exc)
        return False
    log.info("visitflow trigger installed: issuer %s, Prefect %s, client %s, outbox %s",
             settings.issuer, settings.prefect_api_url, settings.client_id, settings.state_dir)
    return True


if os.environ.get("VISITFLOW_TRIGGER_NO_INSTALL") != "1":
    install()
