"""One credential per request (issue 20, finding 1), on the session's real Tiled server.

A request or stream subscription that carries more than one credential — two
``access_token`` values, a header beside a query token, a first message beside a handshake
credential, two ``Authorization`` headers, a header beside an API key — is refused with a
400 (websocket handshake) or a close 4400, and the reason.  The finding itself: a
subscription with an expired token and a good one must not stream.  Each refusal has a
single-credential control that succeeds, so the refusal is about the count, not the token.
"""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi import HTTPException
from visitflow.tiled.authenticator import VisitflowAuthenticator
from visitflow.tiled.credentials import CREDENTIAL

from tests.fixtures.scans import run_scan
from tests.fixtures.stream_helpers import receive, scan_in_thread
from tests.fixtures.waiting import wait_until

pytestmark = pytest.mark.security

TWO = "more than one credential"


@pytest.fixture(scope="module")
def uid(idp, tiled_server):
    return run_scan(tiled_server.uri, idp.token("alice"), num=3)


@pytest.fixture(scope="module")
def tokens(idp, uid):
    now = int(time.time())
    good = idp.delegate(idp.token("alice"), "a1", uid)[1]
    expired = idp.sign(idp.claims(exp=now - 120, iat=now - 600, nbf=now - 600, scope=f"read:raw:a1/{uid}"))
    other = idp.delegate(idp.token("alice"), "a1", uid)[1]   # a second good token
    return {"good": good, "expired": expired, "other": other}


# -- HTTP -----------------------------------------------------------------------------------

def _http(tiled_server, uid, headers=(), params=(), cookies=None):
    url = f"{tiled_server.api}/metadata/raw/a1/{uid}"
    with httpx.Client(timeout=30, cookies=cookies) as client:
        return client.get(url, headers=list(headers), params=list(params))


def test_http_control_one_header_is_accepted(tiled_server, uid, tokens):
    assert _http(tiled_server, uid, [("Authorization", f"Bearer {tokens['good']}")]).status_code == 200


@pytest.mark.parametrize("case", ["two_headers", "header_and_query_token", "header_and_api_key",
                                  "two_query_tokens", "header_and_api_key_cookie", "expired_header_good_query"])
def test_http_more_than_one_credential_is_refused_with_a_reason(tiled_server, uid, tokens, case):
    good, other, expired = tokens["good"], tokens["other"], tokens["expired"]
    bearer = ("Authorization", f"Bearer {good}")
    kwargs = {
        "two_headers": dict(headers=[bearer, ("Authorization", f"Bearer {other}")]),
        "header_and_query_token": dict(headers=[bearer], params=[("access_token", other)]),
        "header_and_api_key": dict(headers=[bearer], params=[("api_key", "0123abcd")]),
        "two_query_tokens": dict(params=[("access_token", good), ("access_token", other)]),
        "header_and_api_key_cookie": dict(headers=[bearer], cookies={"tiled_api_key": "0123abcd"}),
        "expired_header_good_query": dict(headers=[("Authorization", f"Bearer {expired}")],
                                          params=[("access_token", good)]),
    }[case]
    r = _http(tiled_server, uid, **kwargs)
    assert r.status_code == 400, (r.status_code, r.text)
    assert TWO in r.json()["detail"], r.text


# -- websocket ------------------------------------------------------------------------------

def _subscribe(tiled_server, uid, *, query=(), headers=(), first=None, duration=3.0):
    return receive(tiled_server.uri, f"raw/a1/{uid}/primary/saxs", query=query, headers=headers, first=first,
                   envelope="json", duration=duration)


def _data(got):
    return [m for m in got["messages"] if m.get("type") == "array-data"]


@pytest.mark.parametrize("how", ["query", "first", "bearer_header"])
def test_ws_control_one_credential_streams(tiled_server, uid, tokens, how):
    kwargs = {"query": dict(query=[("access_token", tokens["good"])]),
              "first": dict(first={"type": "auth", "access_token": tokens["good"]}),
              "bearer_header": dict(headers=[("Authorization", f"Bearer {tokens['good']}")])}[how]
    got = _subscribe(tiled_server, uid, **kwargs)
    assert len(_data(got)) == 3, got


@pytest.mark.parametrize("case", ["expired_then_good_query", "good_then_expired_query", "two_good_query",
                                  "bearer_header_and_query", "apikey_header_and_query"])
def test_ws_handshake_with_more_than_one_credential_is_refused(tiled_server, uid, tokens, case):
    good, other, expired = tokens["good"], tokens["other"], tokens["expired"]
    kwargs = {
        # the finding: the gate re-checked the first value, Tiled authorised with the last
        "expired_then_good_query": dict(query=[("access_token", expired), ("access_token", good)]),
        "good_then_expired_query": dict(query=[("access_token", good), ("access_token", expired)]),
        "two_good_query": dict(query=[("access_token", good), ("access_token", other)]),
        "bearer_header_and_query": dict(headers=[("Authorization", f"Bearer {expired}")],
                                        query=[("access_token", good)]),
        "apikey_header_and_query": dict(headers=[("Authorization", "Apikey 0123abcd")],
                                        query=[("access_token", good)]),
    }[case]
    got = _subscribe(tiled_server, uid, first={"type": "auth", "access_token": good}, **kwargs)
    assert not got["messages"], got
    assert got["status"] == 400 and TWO in got["body"], got


def test_ws_first_message_token_beside_an_api_key_is_refused(tiled_server, uid, tokens):
    got = _subscribe(tiled_server, uid, first={"type": "auth", "access_token": tokens["good"], "api_key": "0123abcd"})
    assert got["close"] is not None and got["close"][0] == 4400 and TWO in got["close"][1], got
    assert not got["messages"], got   # refused before Tiled authenticated anything


def test_ws_first_message_beside_a_query_token_is_refused(idp, tiled_server):
    """On a live run (a finished run's replay can end before the client's first message)."""
    alice = idp.token("alice")
    cap, thread, _out = scan_in_thread(tiled_server.uri, alice, num=40, delay=0.15)
    try:
        good = idp.delegate(alice, "a1", cap.uid)[1]
        other = idp.delegate(alice, "a1", cap.uid)[1]
        wait_until(lambda: tiled_server.get(f"metadata/raw/a1/{cap.uid}/primary/saxs", good).status_code == 200,
                   60, "the live run's saxs array")
        got = _subscribe(tiled_server, cap.uid, query=[("access_token", good)],
                         first={"type": "auth", "access_token": other}, duration=10.0)
    finally:
        thread.join(60)
    assert got["close"] is not None and got["close"][0] == 4400 and TWO in got["close"][1], got


def test_ws_first_message_cannot_override_a_query_token(idp, tiled_server, uid, tokens):
    """bob's query token cannot read visit a1; alice's first-message token beside it must not
    make Tiled authorise the subscription with hers."""
    bob = idp.token("bob")
    got = _subscribe(tiled_server, uid, query=[("access_token", bob)],
                     first={"type": "auth", "access_token": tokens["good"]})
    assert not _data(got), got


# -- by construction: decode_token only accepts the gate's credential -------------------------

def test_decode_token_refuses_a_token_that_is_not_the_requests_credential(idp, tokens):
    auth = VisitflowAuthenticator(issuer=idp.issuer)
    chosen = CREDENTIAL.set(tokens["good"])
    try:
        assert auth.decode_token(tokens["good"])["user"] == "alice"
        with pytest.raises(HTTPException) as refused:
            auth.decode_token(tokens["other"])
        assert refused.value.status_code == 401 and "not the request's credential" in refused.value.detail
    finally:
        CREDENTIAL.reset(chosen)
    assert auth.decode_token(tokens["other"])["user"] == "alice"   # no gate ran: nothing to compare
