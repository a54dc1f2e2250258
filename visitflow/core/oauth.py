"""Token-endpoint calls every visitflow component makes: login (dev), RFC 8693 exchange,
refresh; and RFC 7662 introspection / RFC 7009 revocation (Tiled's revocation check).  Plain httpx form posts — small enough that a library (authlib's OAuth2Client)
would add an import and hide the error bodies we need to tell "refused, do not retry"
(``invalid_scope``, ``access_denied``) from "try again" (5xx, connection errors).

Every call takes ``client`` (a caller's pooled client) or ``transport`` (what a client made
here for the one call is carried by; ``None``: the network): unit tests pass an
``httpx.MockTransport`` to run the refusal and outage paths without an IdP.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from ..errors import OAuthRefused, OAuthUnavailable

__all__ = [ 'TOKEN_EXCHANGE', 'ACCESS_TOKEN_TYPE',
    'REFRESH_TOKEN_TYPE', 'REFUSALS', 'TokenResponse', 'token_endpoint', 'post_token', 'exchange',
    'refresh', 'password_login', 'introspect', 'introspect_async', 'revoke',
]

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
#: Asking for this in an exchange (RFC 8693) is how Keycloak is told to add a refresh token.
REFRESH_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:refresh_token"
#: OAuth errors that mean the IdP decided: retrying the same request cannot succeed.
REFUSALS = {"invalid_scope", "access_denied", "invalid_target", "unauthorized_client", "invalid_grant",
            "invalid_token", "invalid_client", "invalid_request", "unsupported_grant_type"}


@dataclass(frozen=True)
class TokenResponse:
    access_token: str
    expires_at: float
    refresh_token: str | None = None
    refresh_expires_at: float | None = None
    scope: str = ""

    @classmethod
    def from_json(cls, body: dict, now: float | None = None) -> "TokenResponse":
        now = time.time() if now is None else now
        refresh_in = body.get("refresh_expires_in")
        return cls(
            access_token=body["access_token"],
            expires_at=now + float(body.get("expires_in", 60)),
            refresh_token=body.get("refresh_token"),
            refresh_expires_at=now + float(refresh_in) if refresh_in else None,
            scope=body.get("scope", ""),
        )


def token_endpoint(issuer: str, client: httpx.Client | None = None, *,
                   transport: httpx.BaseTransport | None = None) -> str:
    from .tokens import discover

    if client is None and transport is not None:
        with httpx.Client(timeout=10.0, transport=transport) as own:
            return discover(issuer, client=own)["token_endpoint"]
    return discover(issuer, client=client)["token_endpoint"]


def _post_form(url: str, form: dict, *, client_id: str, client_secret: str | None,
               client: httpx.Client | None, timeout: float,
               transport: httpx.BaseTransport | None = None) -> httpx.Response:
    """POST a form as ``client_id`` (client_secret_basic when confidential, else client_id in
    the body); an unreachable endpoint is :class:`OAuthUnavailable`."""
    own = client is None
    client = client or httpx.Client(timeout=timeout, transport=transport)
    try:
        if client_secret:
            return client.post(url, data=form, auth=(client_id, client_secret))
        return client.post(url, data={**form, "client_id": client_id})
    except httpx.HTTPError as exc:
        raise OAuthUnavailable(f"{url} unreachable: {exc}") from exc
    finally:
        if own:
            client.close()


def _json_or_raise(resp: httpx.Response, what: str) -> dict:
    """A 200's JSON object; otherwise "try again" (5xx, 429, a 200 that is not a JSON object:
    a broken or misrouted endpoint, which an unexpected ``ValueError`` would not say) or
    "refused" (an RFC 6749 error)."""
    if resp.status_code == 200:
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise OAuthUnavailable(f"{what} answered 200 without a JSON object")
        return body
    if resp.status_code >= 500 or resp.status_code == 429:
        raise OAuthUnavailable(f"{what} answered {resp.status_code}")
    try:
        body = resp.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    raise OAuthRefused(body.get("error", f"http_{resp.status_code}"), body.get("error_description", ""),
                       resp.status_code)


def post_token(url: str, form: dict, *, client_id: str, client_secret: str | None = None,
               client: httpx.Client | None = None, timeout: float = 10.0,
               transport: httpx.BaseTransport | None = None) -> TokenResponse:
    """POST to the token endpoint (client_secret_basic for confidential clients).  A 200
    without an ``access_token`` is :class:`OAuthUnavailable` (try again), not a ``KeyError``:
    a caller that retries outages (the trigger's sender) must not see an unexpected error."""
    resp = _post_form(url, form, client_id=client_id, client_secret=client_secret, client=client,
                      timeout=timeout, transport=transport)
    body = _json_or_raise(resp, "token endpoint")
    if not isinstance(body.get("access_token"), str):
        raise OAuthUnavailable(f"token endpoint {url} answered 200 without an access_token")
    return TokenResponse.from_json(body)


def exchange(url: str, subject_token: str, *, client_id: str, client_secret: str, audience: str,
             scope: str, client: httpx.Client | None = None,
             requested_token_type: str = ACCESS_TOKEN_TYPE,
             transport: httpx.BaseTransport | None = None,
             requested_subject: str | None = None) -> TokenResponse:
    """RFC 8693: trade ``subject_token`` for a token for ``audience`` with (narrower) ``scope``.

    ``requested_subject`` (Keycloak's parameter name): the token is to be for that user, the
    subject token's holder acting for them (staff recovery, visitflow/token_service/acting.py).

    ``requested_token_type=REFRESH_TOKEN_TYPE`` asks for an access token *and* a refresh token
    (Keycloak issues a refresh token from an exchange only then)."""
    return post_token(url, {
        "grant_type": TOKEN_EXCHANGE, "subject_token": subject_token,
        "subject_token_type": ACCESS_TOKEN_TYPE, "requested_token_type": requested_token_type,
        "audience": audience, "scope": scope,
        **({"requested_subject": requested_subject} if requested_subject else {}),
    }, client_id=client_id, client_secret=client_secret, client=client, transport=transport)


def refresh(url: str, refresh_token: str, *, client_id: str, client_secret: str | None = None,
            client: httpx.Client | None = None, transport: httpx.BaseTransport | None = None) -> TokenResponse:
    return post_token(url, {"grant_type": "refresh_token", "refresh_token": refresh_token},
                      client_id=client_id, client_secret=client_secret, client=client, transport=transport)


def password_login(url: str, username: str, password: str, *, client_id: str = "visitflow-cli",
                   scope: str | None = None, client: httpx.Client | None = None,
                   transport: httpx.BaseTransport | None = None) -> TokenResponse:
    """Dev-only password grant (the demo's "Alice logs in")."""
    form = {"grant_type": "password", "username": username, "password": password}
    if scope:
        form["scope"] = scope
    return post_token(url, form, client_id=client_id, client=client, transport=transport)


def introspect(url: str, token: str, *, client_id: str, client_secret: str,
               client: httpx.Client | None = None, timeout: float = 5.0,
               transport: httpx.BaseTransport | None = None) -> dict:
    """RFC 7662: the IdP's view of ``token`` (``{"active": false}`` once revoked or expired)."""
    resp = _post_form(url, {"token": token}, client_id=client_id, client_secret=client_secret,
                      client=client, timeout=timeout, transport=transport)
    body = _json_or_raise(resp, "introspection endpoint")
    if not isinstance(body, dict) or "active" not in body:
        raise OAuthUnavailable(f"introspection at {url} answered without 'active'")
    return body


async def introspect_async(url: str, token: str, *, client_id: str, client_secret: str,
                           client: httpx.AsyncClient) -> dict:
    """:func:`introspect` for an event loop (Tiled's authenticator): same answers, same errors."""
    try:
        resp = await client.post(url, data={"token": token}, auth=(client_id, client_secret))
    except httpx.HTTPError as exc:
        raise OAuthUnavailable(f"{url} unreachable: {exc!r}") from exc
    body = _json_or_raise(resp, "introspection endpoint")
    if not isinstance(body, dict) or "active" not in body:
        raise OAuthUnavailable(f"introspection at {url} answered without 'active'")
    return body


def revoke(url: str, token: str, *, client_id: str, client_secret: str,
           client: httpx.Client | None = None, timeout: float = 5.0,
           transport: httpx.BaseTransport | None = None) -> None:
    """RFC 7009: revoke ``token`` (the IdP answers 200 even for unknown tokens)."""
    resp = _post_form(url, {"token": token}, client_id=client_id, client_secret=client_secret,
                      client=client, timeout=timeout, transport=transport)
    if resp.status_code >= 500 or resp.status_code == 429:  # like every other call here: try again
        raise OAuthUnavailable(f"revocation endpoint answered {resp.status_code}")
    if resp.status_code != 200:
        raise OAuthRefused(f"http_{resp.status_code}", resp.text[:200], resp.status_code)
