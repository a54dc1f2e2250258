"""The one reading of a request's credential.

Tiled reads credentials from several places and, when one request carries several, each of
its dependencies picks its own: ``OAuth2PasswordBearer`` the first ``Authorization`` header,
a websocket the *last* ``?access_token=`` value (Starlette's ``QueryParams``), ``get_api_key``
``?api_key=``, an ``Apikey`` header or the ``tiled_api_key`` cookie, and a websocket without
any of those the ``{"type": "auth"}`` first message.  A gate that re-checks "the" token then
checks one of them while Tiled authorises with another (issue 20 finding 1: a subscription
kept streaming on a second token after the first, the one re-checked, had expired).

So there is exactly one reading: :func:`credentials_of` lists *every* credential a
request or websocket handshake carries, :func:`the_credential` refuses more than one (400,
with the reason) and :data:`CREDENTIAL` holds the one that was chosen for the rest of the
request.  :class:`~.auth_gate.AuthGate` is the only caller; the authenticator's
``decode_token`` — the only place Tiled turns a bearer token into a principal, on HTTP, on a
websocket query and in first-message auth — refuses any token that is not :data:`CREDENTIAL`,
so the token the gate validated and re-checks is by construction the one Tiled authorised.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Optional
from urllib.parse import parse_qsl

from ..errors import MoreThanOneCredential

__all__ = [
    'API_KEY_COOKIE', 'CREDENTIAL', 'UNSET', 'Credential', 'credentials_of',
    'first_message_credentials', 'the_credential', 'too_many',
]

#: Tiled's API-key cookie name (tiled.server.authentication.API_KEY_COOKIE_NAME).
API_KEY_COOKIE = "tiled_api_key"

#: Marks "no gate ran" (plain ``tiled serve``): decode_token then has nothing to compare with.
UNSET = object()

#: The bearer token the gate chose for the current request/connection (None: it carries none
#: or only an API key).  Set by the gate, read by ``VisitflowAuthenticator.decode_token``.
CREDENTIAL: ContextVar[object] = ContextVar("visitflow_credential", default=UNSET)


@dataclass(frozen=True)
class Credential:
    where: str            # "Authorization header", "access_token query", "first message", ...
    kind: str             # "bearer" | "apikey" | "other"
    value: str

    @property
    def bearer(self) -> Optional[str]:
        return self.value if self.kind == "bearer" else None


def too_many(found: list[Credential]) -> MoreThanOneCredential:
    """The refusal for ``found`` (two or more credentials), naming where each was."""
    places = tuple(c.where for c in found)
    return MoreThanOneCredential(f"more than one credential in one request ({', '.join(places)}): send exactly one",
                                 places=places)


def _authorization(value: str) -> Credential:
    scheme, _, rest = value.strip().partition(" ")
    kind = {"bearer": "bearer", "apikey": "apikey"}.get(scheme.lower(), "other")
    return Credential("Authorization header", kind, rest.strip() if kind != "other" else value)


def credentials_of(scope) -> list[Credential]:
    """Every credential in an HTTP request's or websocket handshake's headers, query and cookies."""
    found: list[Credential] = []
    for name, value in scope.get("headers", []):
        name = name.lower()
        if name == b"authorization":
            found.append(_authorization(value.decode("latin-1")))
        elif name == b"cookie":
            try:
                jar = SimpleCookie(value.decode("latin-1"))
            except CookieError:
                continue
            if API_KEY_COOKIE in jar:
                found.append(Credential(f"{API_KEY_COOKIE} cookie", "apikey", jar[API_KEY_COOKIE].value))
    for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
        if key == "access_token":
            found.append(Credential("access_token query", "bearer", value))
        elif key == "api_key":
            found.append(Credential("api_key query", "apikey", value))
    return found


def first_message_credentials(message) -> list[Credential]:
    """Credentials in a websocket's first message (Tiled's ``{"type": "auth", ...}``)."""
    raw = message.get("text")
    if raw is None and message.get("bytes"):
        raw = message["bytes"].decode("utf-8", "replace")
    try:
        doc = json.loads(raw) if raw else None
    except ValueError:
        return []
    if not isinstance(doc, dict) or doc.get("type") != "auth":
        return []
    found = []
    if doc.get("access_token") is not None:
        found.append(Credential("first message access_token", "bearer", str(doc["access_token"])))
    if doc.get("api_key") is not None:
        found.append(Credential("first message api_key", "apikey", str(doc["api_key"])))
    return found


def the_credential(found: list[Credential]) -> Optional[Credential]:
    """The single credential, None if there is none; raises :class:`MoreThanOneCredential`."""
    if len(found) > 1:
        raise too_many(found)
    return found[0] if found else None
