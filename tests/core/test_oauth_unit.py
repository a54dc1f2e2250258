"""The token-endpoint client (visitflow.core.oauth) on an ``httpx.MockTransport``: what it
sends, and how it tells "refused, do not retry" (RFC 6749 error bodies) from "try again"
(5xx, 429, unreachable, an answer that is no token).  No IdP; the real ones (the dev token
service, Keycloak) are asked by the trigger, delegation and keycloak suites."""

from __future__ import annotations

import asyncio
import base64
import time

import httpx
import pytest

from tests.fixtures.scripted_http import ScriptedServer, refused_connection
from visitflow.core import oauth
from visitflow.errors import OAuthRefused, OAuthUnavailable, Refused, Unavailable

ISSUER = "http://idp.test/realms/visitflow"
TOKEN_URL = "http://idp.test/realms/visitflow/token"
TOKEN_PATH = "/realms/visitflow/token"
TOKEN = {"access_token": "T-grant", "token_type": "Bearer", "expires_in": 300, "refresh_token": "R-1",
         "refresh_expires_in": 1800, "scope": "run:saxs_average:a1 read:raw:a1/r1"}


def token_server(*answers) -> ScriptedServer:
    return ScriptedServer().on("POST", TOKEN_PATH, *answers)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def do_exchange(server: ScriptedServer, **kw) -> oauth.TokenResponse:
    return oauth.exchange(TOKEN_URL, "T-user", client_id="blueapi", client_secret="s3cret", audience="visitflow",
                          scope="run:saxs_average:a1", transport=server.transport, **kw)


# ------------------------------------------------------------------ success
def test_exchange_sends_rfc8693_as_a_confidential_client_and_reads_the_token():
    server = token_server(httpx.Response(200, json=TOKEN))
    before = time.time()
    resp = do_exchange(server, requested_token_type=oauth.REFRESH_TOKEN_TYPE)
    after = time.time()
    assert resp.access_token == "T-grant" and resp.refresh_token == "R-1" and resp.scope == TOKEN["scope"]
    assert before + 300 <= resp.expires_at <= after + 300
    assert before + 1800 <= resp.refresh_expires_at <= after + 1800
    (form,) = server.forms("POST", TOKEN_PATH)
    assert form == {"grant_type": oauth.TOKEN_EXCHANGE, "subject_token": "T-user",
                    "subject_token_type": oauth.ACCESS_TOKEN_TYPE, "requested_token_type": oauth.REFRESH_TOKEN_TYPE,
                    "audience": "visitflow", "scope": "run:saxs_average:a1"}
    assert server.requests[0].headers["authorization"] == basic("blueapi", "s3cret"), "client_secret_basic"


def test_a_public_client_names_itself_in_the_body():
    server = token_server(httpx.Response(200, json={"access_token": "T-alice"}))
    before = time.time()
    resp = oauth.password_login(TOKEN_URL, "alice", "pw", scope="openid", transport=server.transport)
    assert resp.access_token == "T-alice" and resp.refresh_token is None and resp.refresh_expires_at is None
    assert resp.expires_at >= before + 60, "no expires_in: a minute"
    (form,) = server.forms("POST", TOKEN_PATH)
    assert form == {"grant_type": "password", "username": "alice", "password": "pw", "scope": "openid",
                    "client_id": "visitflow-cli"}
    assert "authorization" not in server.requests[0].headers


def test_refresh_sends_the_refresh_grant():
    server = token_server(httpx.Response(200, json={**TOKEN, "access_token": "T-data-2", "refresh_token": "R-2"}))
    resp = oauth.refresh(TOKEN_URL, "R-1", client_id="visitflow", client_secret="vs", transport=server.transport)
    assert (resp.access_token, resp.refresh_token) == ("T-data-2", "R-2")
    assert server.forms("POST", TOKEN_PATH) == [{"grant_type": "refresh_token", "refresh_token": "R-1"}]
    assert server.requests[0].headers["authorization"] == basic("visitflow", "vs")


def test_a_dead_refresh_token_is_refused():
    server = token_server(httpx.Response(400, json={"error": "invalid_grant",
                                                    "error_description": "Session not active"}))
    with pytest.raises(OAuthRefused) as info:
        oauth.refresh(TOKEN_URL, "R-old", client_id="visitflow", client_secret="vs", transport=server.transport)
    assert (info.value.error, info.value.description, info.value.status) == ("invalid_grant", "Session not active", 400)


def test_token_endpoint_is_discovered_through_the_transport():
    server = ScriptedServer().on("GET", "/realms/visitflow/.well-known/openid-configuration",
                                 httpx.Response(200, json={"issuer": ISSUER, "token_endpoint": TOKEN_URL}))
    assert oauth.token_endpoint(ISSUER, transport=server.transport) == TOKEN_URL
    wrong = ScriptedServer().on("GET", "/realms/visitflow/.well-known/openid-configuration",
                                httpx.Response(200, json={"issuer": "http://evil.test", "token_endpoint": TOKEN_URL}))
    with pytest.raises(ValueError, match="names issuer 'http://evil.test'"):
        oauth.token_endpoint(ISSUER, transport=wrong.transport)


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("error", sorted(oauth.REFUSALS))
def test_an_rfc6749_error_body_is_a_refusal_with_its_code_and_description(error):
    server = token_server(httpx.Response(400, json={"error": error, "error_description": f"because {error}"}))
    with pytest.raises(OAuthRefused) as info:
        do_exchange(server)
    exc = info.value
    assert isinstance(exc, Refused) and not isinstance(exc, Unavailable)
    assert (exc.error, exc.description, exc.status) == (error, f"because {error}", 400)
    assert str(exc) == f"{error}: because {error}"
    assert len(server.requests) == 1


@pytest.mark.parametrize("status", [401, 403])
def test_a_refusal_keeps_its_status_and_may_have_no_description(status):
    server = token_server(httpx.Response(status, json={"error": "access_denied"}))
    with pytest.raises(OAuthRefused) as info:
        do_exchange(server)
    assert (info.value.error, info.value.description, info.value.status) == ("access_denied", "", status)
    assert str(info.value) == "access_denied"


@pytest.mark.parametrize("answer", [httpx.Response(400, text="<html>Bad Request</html>"),
                                    httpx.Response(403, json=["not", "an", "object"]),
                                    httpx.Response(404)])
def test_an_error_that_is_not_an_rfc6749_body_is_a_refusal_named_by_its_status(answer):
    with pytest.raises(OAuthRefused) as info:
        do_exchange(token_server(answer))
    assert info.value.error == f"http_{answer.status_code}" and info.value.status == answer.status_code
    assert info.value.description == ""


# ------------------------------------------------------------------ try again
@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_5xx_and_429_are_unavailable_even_with_an_error_body(status):
    server = token_server(httpx.Response(status, json={"error": "invalid_scope"}))
    with pytest.raises(OAuthUnavailable, match=f"answered {status}"):
        do_exchange(server)
    assert len(server.requests) == 1, "the caller decides whether to retry"


@pytest.mark.parametrize("failure", [refused_connection, httpx.ReadTimeout("timed out"),
                                     httpx.RemoteProtocolError("Server disconnected")])
def test_an_unreachable_idp_is_unavailable(failure):
    with pytest.raises(OAuthUnavailable, match="unreachable") as info:
        do_exchange(token_server(failure))
    assert isinstance(info.value.__cause__, httpx.TransportError)


@pytest.mark.parametrize("answer", [httpx.Response(200, text="<html>login page</html>"),
                                    httpx.Response(200, json=["T"]),
                                    httpx.Response(200, json={"token_type": "Bearer"}),
                                    httpx.Response(200, json={"access_token": None})])
def test_a_200_that_is_not_a_token_is_unavailable_not_a_crash(answer):
    """It used to escape as ValueError / KeyError / TypeError: the trigger's sender then spun
    on the grant without backoff.  A broken answer is "try again", like a 5xx."""
    with pytest.raises(OAuthUnavailable, match="200 without"):
        do_exchange(token_server(answer))


# ------------------------------------------------------------------ introspection and revocation
def test_introspect_returns_the_idps_view_and_insists_on_active():
    server = ScriptedServer().on("POST", "/introspect", httpx.Response(200, json={"active": False}),
                                 httpx.Response(200, json={"sub": "alice"}))
    url = "http://idp.test/introspect"
    assert oauth.introspect(url, "T", client_id="tiled", client_secret="ts", transport=server.transport) == {
        "active": False}
    with pytest.raises(OAuthUnavailable, match="without 'active'"):
        oauth.introspect(url, "T", client_id="tiled", client_secret="ts", transport=server.transport)
    assert server.forms("POST", "/introspect") == [{"token": "T"}] * 2
    assert server.requests[0].headers["authorization"] == basic("tiled", "ts")


def test_introspect_async_gives_the_same_answers_and_errors():
    server = ScriptedServer().on("POST", "/introspect", httpx.Response(200, json={"active": True, "sub": "a"}),
                                 httpx.Response(503), refused_connection)
    url = "http://idp.test/introspect"

    async def ask():
        async with httpx.AsyncClient(transport=server.transport) as client:
            got = [await oauth.introspect_async(url, "T", client_id="tiled", client_secret="ts", client=client)]
            for _ in range(2):
                try:
                    await oauth.introspect_async(url, "T", client_id="tiled", client_secret="ts", client=client)
                except OAuthUnavailable as exc:
                    got.append(str(exc))
            return got

    active, busy, down = asyncio.run(ask())
    assert active == {"active": True, "sub": "a"}
    assert "answered 503" in busy and "unreachable" in down


def test_revoke_refusal_and_outage_are_told_apart():
    """A 5xx at revocation used to be reported as "refused http_503"."""
    server = ScriptedServer().on("POST", "/revoke", httpx.Response(200), httpx.Response(503),
                                 httpx.Response(401, text="bad client"))
    url = "http://idp.test/revoke"
    kw = dict(client_id="visitflow", client_secret="vs", transport=server.transport)
    assert oauth.revoke(url, "T-grant", **kw) is None
    with pytest.raises(OAuthUnavailable, match="answered 503"):
        oauth.revoke(url, "T-grant", **kw)
    with pytest.raises(OAuthRefused) as info:
        oauth.revoke(url, "T-grant", **kw)
    assert (info.value.error, info.value.description, info.value.status) == ("http_401", "bad client", 401)
    assert server.forms("POST", "/revoke") == [{"token": "T-grant"}] * 3


def test_a_callers_client_is_used_instead_of_a_new_one():
    server = token_server(httpx.Response(200, json=TOKEN))
    with httpx.Client(transport=server.transport) as client:
        assert do_exchange_with(client).access_token == "T-grant"
    assert len(server.requests) == 1


def do_exchange_with(client: httpx.Client) -> oauth.TokenResponse:
    return oauth.exchange(TOKEN_URL, "T-user", client_id="blueapi", client_secret="s3cret", audience="visitflow",
                          scope="run:saxs_average:a1", client=client)
