"""The worker's own allow-list of where a flow run may send the ``visitflow`` client secret.

Why: the credentials Block a flow run loads is a Prefect document, and which Block it loads is
a job variable (``VISITFLOW_CREDENTIALS_BLOCK``); both are chosen by whoever can create flow
runs or save Blocks.  Without a check, such a person saves a Block whose issuer is their own
server, starts a flow run naming it, and the worker's flow run posts the client secret to
that issuer's token endpoint (issue 20, finding 3).  The allow-list comes from the *worker's*
environment (``VISITFLOW_ALLOWED_ENDPOINTS``, set by whoever starts the worker: ``visitflow
up``, a Kubernetes Deployment), never from a job variable or a Block document:

* the ``visitflow`` worker refuses a flow run whose job variables change any name in
  :data:`PROTECTED_ENV` (:func:`env_overrides`), and one whose Block is off the list;
* the Block itself checks its issuer, Tiled URIs and the discovered token endpoint
  (:func:`check`) before any secret leaves the process — the second line, for a stock
  process worker.

Entries are URL prefixes on a path-segment boundary (``https://kc/realms/x`` allows
``https://kc/realms/x`` and ``https://kc/realms/x/protocol/...`` but not
``https://kc/realms/xy``); scheme, host and port must match exactly (default ports made
explicit).  Unset means "no list" (a warning, for library use and tests that run a flow in
process); the stack always sets it.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Optional
from urllib.parse import urlsplit

from ..errors import ConfigError, EndpointNotAllowed

__all__ = ['ENV', 'BLOCK_ENV', 'DEFAULT_BLOCK', 'BLOCK_TYPE_SLUG', 'PROTECTED_ENV', 'allowed', 'permits', 'check', 'check_block', 'env_overrides']

ENV = "VISITFLOW_ALLOWED_ENDPOINTS"
#: Which credentials Block an analysis flow loads (a job variable may choose it; it is checked).
BLOCK_ENV = "VISITFLOW_CREDENTIALS_BLOCK"
DEFAULT_BLOCK = "visitflow"
BLOCK_TYPE_SLUG = "visitflow-scoped-credentials"
#: Environment names a flow run's job variables may not set to anything but the worker's own
#: value: the allow-list itself, and where the flow run's Prefect client points (another
#: Prefect server would hand it another Block and flow run, and receive the auth string).
PROTECTED_ENV = (ENV, "PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "PREFECT_API_KEY")

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _parts(url: str) -> tuple[str, str, int, str]:
    u = urlsplit(url.strip())
    if u.scheme not in _DEFAULT_PORTS or not u.hostname:
        raise ConfigError(f"{url!r} is not an http(s) URL")
    return u.scheme, u.hostname.lower(), u.port or _DEFAULT_PORTS[u.scheme], u.path.rstrip("/")


def allowed(environ: Optional[Mapping[str, str]] = None) -> Optional[tuple[str, ...]]:
    """The list from ``VISITFLOW_ALLOWED_ENDPOINTS`` (comma or space separated), or None if unset."""
    value = (os.environ if environ is None else environ).get(ENV)
    if value is None:
        return None
    entries = tuple(e for e in value.replace(",", " ").split() if e)
    for e in entries:
        _parts(e)  # a malformed entry is a configuration error, not a silent miss
    return entries


def permits(url: str, entries: Iterable[str]) -> bool:
    try:
        scheme, host, port, path = _parts(url)
    except ConfigError:
        return False
    for entry in entries:
        es, eh, ep, epath = _parts(entry)
        if (es, eh, ep) == (scheme, host, port) and (path == epath or path.startswith(epath + "/")):
            return True
    return False


def check(url: str, what: str, entries: Optional[Iterable[str]]) -> None:
    """Raise :class:`EndpointNotAllowed` (with a reason) unless ``url`` is on ``entries``;
    ``None`` (no list configured) allows everything."""
    if entries is None:
        return
    entries = tuple(entries)
    if not permits(url, entries):
        raise EndpointNotAllowed(
            f"{what} {url!r} is not on this worker's allow-list ({ENV}={' '.join(entries) or '(empty)'}): "
            "refusing to send the client secret or a grant there")


def check_block(fields: Mapping[str, object], entries: Optional[Iterable[str]]) -> None:
    """Check a credentials Block's ``issuer``, ``raw_uri`` and ``processed_uri`` (document data
    or the Block's attributes as a mapping)."""
    for key, what in (("issuer", "issuer"), ("raw_uri", "Tiled URI"), ("processed_uri", "processed Tiled URI")):
        value = fields.get(key)
        if value:
            check(str(value), f"{what} ({key})", entries)


def env_overrides(job_env: Mapping[str, object], worker_env: Optional[Mapping[str, str]] = None) -> list[str]:
    """The :data:`PROTECTED_ENV` names that ``job_env`` (a flow run's job-variable ``env``) sets
    to something other than the worker's own value."""
    worker_env = os.environ if worker_env is None else worker_env
    return [name for name in PROTECTED_ENV
            if name in job_env and job_env[name] is not None and str(job_env[name]) != worker_env.get(name)]
