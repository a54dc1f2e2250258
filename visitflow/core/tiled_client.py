"""Client side of our Tiled: bearer auth that stays fresh, and clients for the two stores.

Light on purpose (httpx + pyjwt at import; ``tiled.client`` only inside the functions that
need it): the trigger runs inside blueapi and the Prefect block inside flow runs.

:class:`BearerAuth` is an ``httpx.Auth`` fed by a *token provider* — any callable returning
``token`` or ``(token, expires_at)`` (epoch seconds; read from the JWT's ``exp`` when not
given).  It calls the provider again ``refresh_margin`` seconds before expiry, and once
more if the server answers 401 anyway (revoked key, clock skew), then retries the request
once.  One lock guards the cached token, so concurrent requests (tiled fetches array
chunks from several threads) trigger one refresh, not one each.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Optional, Union

import httpx
import jwt

from .tokens import unverified_claims

__all__ = [
    'token_expiry', 'BearerAuth', 'ClientCredentials', 'IDENTITY_HEADERS', 'node_uri', 'connect',
    'raw_client', 'processed_client', 'child', 'ensure_container',
]

TokenAndExpiry = tuple[str, Optional[float]]
TokenProvider = Callable[[], Union[str, TokenAndExpiry]]


def token_expiry(token: str) -> Optional[float]:
    """The ``exp`` of a JWT, unverified (only to schedule refreshes), or None."""
    try:
        exp = unverified_claims(token).get("exp")
        return float(exp) if exp is not None else None
    except jwt.PyJWTError:
        return None


class BearerAuth(httpx.Auth):
    """``Authorization: Bearer <token>`` from a provider, refreshed before expiry.

    ``refresh_margin``: seconds before ``expires_at`` at which a new token is fetched.
    ``retry_on_401``: after a 401, fetch a new token and resend once (only if the provider
    actually gave a different token; otherwise the 401 is returned as is).
    """

    requires_request_body = True  # so a retried POST/PUT can be resent

    def __init__(self, provider: TokenProvider, *, refresh_margin: float = 30.0,
                 retry_on_401: bool = True, clock: Callable[[], float] = time.time):
        self.provider = provider
        self.refresh_margin = refresh_margin
        self.retry_on_401 = retry_on_401
        self.clock = clock
        self._lock = threading.Lock()
        self._token: Optional[str] = None
        self._expires_at: Optional[float] = None
        self.fetches = 0  # how many times the provider was called (observability, tests)

    def _fetch(self, force: bool = False) -> None:
        # A provider that caches (the block's DataTokenSource) offers force_refresh(): after a
        # 401 its cached token is exactly what was refused, so asking it again would not help.
        got = self.provider.force_refresh() if force and hasattr(self.provider, "force_refresh") else self.provider()
        token, expires_at = (got, None) if isinstance(got, str) else got
        if not token:
            raise RuntimeError("token provider returned no token")
        self._token = token
        self._expires_at = expires_at if expires_at is not None else token_expiry(token)
        self.fetches += 1

    def _fresh(self) -> bool:
        if self._token is None:
            return False
        return self._expires_at is None or self.clock() < self._expires_at - self.refresh_margin

    def token(self) -> str:
        """The current token, refreshed if it is within the margin of expiry."""
        with self._lock:
            if not self._fresh():
                self._fetch()
            return self._token

    def invalidate(self, rejected: str) -> str:
        """Called after a 401 for ``rejected``: fetch a new token unless another thread did."""
        with self._lock:
            if self._token == rejected:
                self._fetch(force=True)
            return self._token

    def auth_flow(self, request: httpx.Request):
        sent = self.token()
        request.headers["Authorization"] = f"Bearer {sent}"
        response = yield request
        if response.status_code == 401 and self.retry_on_401:
            fresh = self.invalidate(sent)
            if fresh != sent:
                request.headers["Authorization"] = f"Bearer {fresh}"
                yield request


# -- token providers ----------------------------------------------------------------------

def _token_endpoint(issuer: str, timeout: float = 10.0) -> str:
    from .tokens import discover

    return discover(issuer, timeout=timeout)["token_endpoint"]


class ClientCredentials:
    """Provider: OAuth ``client_credentials`` for a confidential client (e.g. the admin step)."""

    def __init__(self, issuer: str, client_id: str, client_secret: str, scope: Optional[str] = None,
                 *, timeout: float = 10.0):
        self.issuer, self.client_id, self.client_secret = issuer.rstrip("/"), client_id, client_secret
        self.scope, self.timeout = scope, timeout
        self._endpoint: Optional[str] = None

    def __call__(self) -> TokenAndExpiry:
        self._endpoint = self._endpoint or _token_endpoint(self.issuer, self.timeout)
        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        resp = httpx.post(self._endpoint, data=form, auth=(self.client_id, self.client_secret),
                          timeout=self.timeout)
        resp.raise_for_status()
        body = resp.json()
        expires_in = body.get("expires_in")
        return body["access_token"], (time.time() + float(expires_in)) if expires_in else None


# -- Tiled clients -----------------------------------------------------------------------

#: Array reads uncompressed: measured 3-5x faster for detector frames on a LAN/loopback
#: (the server's gzip/zstd costs more CPU than the bytes it saves).
IDENTITY_HEADERS = {"accept-encoding": "identity"}


def node_uri(base_uri: str, path: str | Iterable[str] = "") -> str:
    """``http://host:port`` + ``raw/a1/uid`` -> ``http://host:port/api/v1/metadata/raw/a1/uid``."""
    if not isinstance(path, str):
        path = "/".join(path)
    base = base_uri.rstrip("/")
    if base.endswith("/api/v1"):
        base += "/metadata"
    elif "/api/v1/" not in base:
        base += "/api/v1/metadata"
    return f"{base}/{path.strip('/')}" if path.strip("/") else base


def connect(uri: str, auth: httpx.Auth, *, compression: bool = False, headers: Optional[dict] = None,
            **kwargs):
    """``tiled.client.from_uri`` with our auth; ``compression=False`` asks for identity."""
    from tiled.client import from_uri

    hdrs = dict(headers or {})
    if not compression:
        hdrs.setdefault("accept-encoding", "identity")
    return from_uri(uri, auth=auth, headers=hdrs, **kwargs)


def _layout(layout=None):
    from .layout import Layout

    return layout or Layout()


def raw_client(uri: str, auth: httpx.Auth, *, visit: Optional[str] = None, run: Optional[str] = None,
               layout=None, extra: Optional[dict] = None, **kwargs):
    """A client on the raw store: the run node if ``run`` is given, else the visit
    container (``visit``), else the server root.  ``extra`` fills other template fields."""
    values = {**(extra or {}), **({"visit": visit} if visit else {}), **({"run": run} if run else {})}
    path = _layout(layout).raw.prefix(**values) if values else ""
    return connect(node_uri(uri, path), auth, **kwargs)


def processed_client(uri: str, auth: httpx.Auth, *, visit: str, run: str, layout=None,
                     extra: Optional[dict] = None, create: bool = True, **kwargs):
    """A client on this run's processed container (``processed/<visit>/<run>``), created if
    missing and ``create`` (a run-scoped writer may do that; the visit container must exist)."""
    template = _layout(layout).processed
    values = {**(extra or {}), "visit": visit}
    parent = connect(node_uri(uri, template.prefix(**values)), auth, **kwargs)
    if not create:
        node = child(parent, run)
        if node is None:
            raise KeyError(f"no processed container for run {run!r} of visit {visit!r}")
        return node
    return ensure_container(parent, run, {"visit": visit, "run": run})


def child(container, key: str):
    """``container[key]`` or None."""
    try:
        return container[key]
    except KeyError:
        return None


def ensure_container(parent, key: str, metadata: Optional[dict] = None):
    """Return ``parent[key]``, creating it (a container) if missing; tolerate a racing creator."""
    node = child(parent, key)
    if node is not None:
        return node
    try:
        return parent.create_container(key=key, metadata=metadata or {})
    except Exception:  # noqa: BLE001 - another writer created it first (409): read theirs
        node = child(parent, key)
        if node is None:
            raise
        return node
