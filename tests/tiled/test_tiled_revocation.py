"""Revocation reaches Tiled: ``visitflow tiled serve --introspect-client tiled``.

Without it a stolen or withdrawn T_data works until it expires (5 min).  With it, Tiled
asks the IdP (RFC 7662) whenever a token enters its 1-s validation cache here, so a token
revoked at the IdP (RFC 7009) — or every token of a revoked session — is refused within
that window.  The session's Tiled server (no introspection) is the control.
"""

from __future__ import annotations

import time

import pytest

from visitflow import errors

from tests.fixtures.scans import run_scan
from tests.fixtures.tiled_fixtures import running_tiled, start_tiled
from visitflow.core import oauth
from visitflow.core.tokens import discover

CACHE = 1.0


@pytest.fixture(scope="module")
def checked_tiled(idp, tmp_path_factory):
    with running_tiled(idp, tmp_path_factory.mktemp("tiled-introspect"),
                       extra_args=("--introspect-client", "tiled", "--token-cache", str(CACHE)),
                       env={"VISITFLOW_TILED_CLIENT_SECRET": "tiled-dev-secret"}) as handle:
        yield handle


@pytest.fixture(scope="module")
def uid(checked_tiled, idp):
    return run_scan(checked_tiled.uri, idp.token("alice"), num=3)   # alice's writes pass introspection too


def endpoints(idp):
    doc = discover(idp.issuer)
    return doc["revocation_endpoint"], doc["token_endpoint"]


def test_revoked_data_token_is_refused_within_the_cache_window(checked_tiled, tiled_server, idp, uid):
    grant, data = idp.delegate(idp.token("alice"), "a1", uid)
    path = f"metadata/raw/a1/{uid}"
    assert checked_tiled.get(path, data).status_code == 200
    revocation, _ = endpoints(idp)
    oauth.revoke(revocation, data, client_id="visitflow", client_secret="visitflow-dev-secret")
    time.sleep(CACHE + 0.5)
    r = checked_tiled.get(path, data)
    assert r.status_code == 401 and "no longer active" in r.json()["detail"], r.text
    assert "invalid_token" in r.headers.get("www-authenticate", "")
    # the control: a server without introspection still honours the revoked token
    assert tiled_server.get("metadata/raw/a1", data).status_code == 200
    # revocation is targeted: a fresh data token from the same grant works
    _, token_url = endpoints(idp)
    fresh = oauth.exchange(token_url, grant, client_id="visitflow", client_secret="visitflow-dev-secret",
                           audience="tiled", scope=f"read:raw:a1/{uid} write:processed:a1/{uid}")
    assert checked_tiled.get(path, fresh.access_token).status_code == 200


def test_revoking_the_refresh_token_ends_every_token_of_that_session(checked_tiled, idp, uid):
    grant, _ = idp.delegate(idp.token("alice"), "a1", uid)
    revocation, token_url = endpoints(idp)
    data = oauth.exchange(token_url, grant, client_id="visitflow", client_secret="visitflow-dev-secret",
                          audience="tiled", scope=f"read:raw:a1/{uid} write:processed:a1/{uid}",
                          requested_token_type=oauth.REFRESH_TOKEN_TYPE)
    assert data.refresh_token
    path = f"metadata/raw/a1/{uid}"
    assert checked_tiled.get(path, data.access_token).status_code == 200
    oauth.revoke(revocation, data.refresh_token, client_id="visitflow", client_secret="visitflow-dev-secret")
    time.sleep(CACHE + 0.5)
    assert checked_tiled.get(path, data.access_token).status_code == 401
    with pytest.raises(errors.OAuthRefused):
        oauth.refresh(token_url, data.refresh_token, client_id="visitflow", client_secret="visitflow-dev-secret")


def test_introspection_that_cannot_answer_fails_closed_with_a_reason(idp, tmp_path_factory, uid):
    handle = start_tiled(idp, tmp_path_factory.mktemp("tiled-bad-introspect"),
                         extra_args=("--introspect-client", "tiled"),
                         env={"VISITFLOW_TILED_CLIENT_SECRET": "wrong-secret"})
    try:
        r = handle.get("metadata/raw", idp.token("alice"))
        assert r.status_code == 503 and "cannot confirm the token is still active" in r.text, r.text
        bad = handle.get("metadata/raw", "not.a.jwt")
        assert bad.status_code == 401   # a bad token is still a 401: validation comes first
    finally:
        handle.service.stop()
