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

Why this seam.  blueapi has no callback hook.  Its ``begin_task`` builds, per task,
``TiledWriter(from_uri(url, headers=<the caller's Authorization>), batch_size=1)``, subscribes
it to the context's RunEngine and unsubscribes it when the task completes — and it looks the
name ``TiledWriter`` up in ``blueapi.service.interface`` at call time.  blueapi imports
``env.sources`` modules while it builds its context, in the process where the RunEngine runs
(its worker subprocess, by default).  So importing this module replaces that one name with
:class:`TriggeringTiledWriter`: blueapi's own TiledWriter, unchanged, which afterwards hands
each document to the process's one :class:`AnalysisTrigger` with the token of the writer's
own client — the caller's token that has just written the raw data.  The trigger lives and
dies with blueapi's subscription; nothing else in blueapi is touched.

It never blocks or raises into blueapi: the trigger only writes rows to its local outbox on
the RunEngine thread (a background thread talks to the IdP and Prefect), every trigger error
is logged and swallowed, and a missing or broken configuration leaves blueapi exactly as it
was, with one ERROR line saying why.
"""

from __future__ import annotations

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

_lock = threading.Lock()
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
    raise LookupError("the task's Tiled client carries no bearer token (a Tiled service account "
                      "or API key is configured in blueapi, not pass-through)")


def bearer_of(client) -> str | None:
    """The bearer token a tiled client sends (blueapi puts the caller's header there)."""
    try:
        header = client.context.http_client.headers.get("authorization", "")
    except AttributeError:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _writer_class():
    from bluesky.callbacks.tiled_writer import TiledWriter

    class TriggeringTiledWriter(TiledWriter):
        """blueapi's TiledWriter, then visitflow's trigger with the same client's token."""

        def __init__(self, client, *args, **kwargs):
            super().__init__(client, *args, **kwargs)
            self._visitflow_token = None
            self._visitflow = None
            try:
                self._visitflow_token = bearer_of(client)
                self._visitflow = shared_trigger()
            except Exception:  # noqa: BLE001 - blueapi's task goes on without the trigger
                log.exception("visitflow trigger: not attached to this task")

        def __call__(self, name, doc, *args, **kwargs):
            out = super().__call__(name, doc, *args, **kwargs)   # the raw data first
            if self._visitflow is not None:
                self._visitflow(name, doc, token=self._visitflow_token)  # never raises
            return out

    return TriggeringTiledWriter


def install(settings: TriggerSettings | None = None) -> bool:
    """Put :class:`TriggeringTiledWriter` where blueapi's ``begin_task`` finds TiledWriter.
    True if installed; False (with an ERROR log line) if it cannot be — blueapi runs on."""
    global _settings
    try:
        settings = settings or load_settings()
        from blueapi.service import interface

        if getattr(interface, "TiledWriter", None) is None:
            raise ConfigError("blueapi.service.interface has no TiledWriter: this blueapi version "
                              "is not one the hook knows (tested with 1.21.1)")
        if not getattr(interface.TiledWriter, "_visitflow_hook", False):
            writer = _writer_class()
            writer._visitflow_hook = True
            interface.TiledWriter = writer
        _settings = settings
    except Exception as exc:  # noqa: BLE001 - a bad hook config must not stop blueapi
        log.error("visitflow trigger NOT installed: %s", exc)
        return False
    log.info("visitflow trigger installed: issuer %s, Prefect %s, client %s, outbox %s",
             settings.issuer, settings.prefect_api_url, settings.client_id, settings.state_dir)
    return True


if os.environ.get("VISITFLOW_TRIGGER_NO_INSTALL") != "1":
    install()
