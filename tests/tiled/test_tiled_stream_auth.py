"""Who may subscribe (``stream``): the websocket route gets exactly the HTTP path's decision.

The three ways of presenting a token are tried — an ``Authorization: Bearer`` header on the
upgrade request (what :mod:`visitflow.flow.push` sends), Tiled's first-message auth and
``?access_token=`` — against the real policy.  The
positive control receives the run's appends; every negative receives neither the schema nor a
single data message.  An open subscription ends (close 4001) when its token expires or is
revoked: :class:`visitflow.tiled.auth_gate.AuthGate` re-checks it before each message.
"""

from __future__ import annotations

import time

import pytest

from visitflow.core import oauth
from visitflow.core.tokens import discover

from tests.fixtures.scans import run_scan
from tests.fixtures.stream_helpers import receive, scan_in_thread
from tests.tiled.test_tiled_revocation import CACHE, checked_tiled  # noqa: F401 - the introspecting Tiled fixture

pytestmark = pytest.mark.stream

MODES = ("first-message", "query", "header")
LEEWAY = 10.0   # the authenticator's clock-skew leeway (its default)
DATA_TYPES = {"array-data", "array-ref", "table-data", "container-child-created", "container-child-metadata-updated"}


def subscribe(base_uri: str, path: str, token: str | None, mode: str, *, duration: float = 3.0,
              stop_after=None) -> dict:
    """Messages received on ``path`` within ``duration`` s (or until closed), and how it ended."""
    how = {} if token is None else {
        "first-message": dict(first={"type": "auth", "access_token": token}),
        "query": dict(query=[("access_token", token)]),
        "header": dict(headers=[("Authorization", f"Bearer {token}")]),
    }[mode]
    return receive(base_uri, path, duration=duration, open_timeout=10, stop_after=stop_after, **how)


def data_messages(got: dict) -> list:
    return [m for m in got["messages"] if m.get("type") in DATA_TYPES]


@pytest.fixture(scope="module")
def runs(idp, tiled_server):
    alice, bob = idp.token("alice"), idp.token("bob")
    return {"mine": run_scan(tiled_server.uri, alice, num=3), "sibling": run_scan(tiled_server.uri, alice, num=3),
            "other_visit": run_scan(tiled_server.uri, bob, visit="a2", num=3)}


@pytest.fixture(scope="module")
def run_token(idp, runs):
    return idp.delegate(idp.token("alice"), "a1", runs["mine"])[1]


@pytest.mark.parametrize("mode", MODES)
def test_run_token_receives_its_runs_appends(tiled_server, runs, run_token, mode):
    got = subscribe(tiled_server.uri, f"raw/a1/{runs['mine']}/primary/saxs", run_token, mode)
    assert got["messages"] and got["messages"][0]["type"] == "array-schema", got
    assert [m["type"] for m in data_messages(got)] == ["array-data"] * 3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["other_visit", "sibling", "visit_container"])
def test_run_token_gets_nothing_outside_its_run(tiled_server, runs, run_token, mode, case):
    path = {"other_visit": f"raw/a2/{runs['other_visit']}/primary/saxs",
            "sibling": f"raw/a1/{runs['sibling']}/primary/saxs",
            "visit_container": "raw/a1"}[case]
    got = subscribe(tiled_server.uri, path, run_token, mode)
    assert not got["messages"], got
    assert got["close"] is not None or got["status"] in (403, 404), got


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["expired", "garbage", "foreign_key", "no_token"])
def test_bad_or_missing_tokens_get_nothing(idp, tiled_server, runs, mode, case):
    uid = runs["mine"]
    now = int(time.time())
    token = {"expired": idp.sign(idp.claims(exp=now - 120, iat=now - 600, nbf=now - 600,
                                            scope=f"read:raw:a1/{uid}")),
             "garbage": "not.a.jwt",
             "foreign_key": idp.sign(idp.claims(scope=f"read:raw:a1/{uid}"), key=idp.other_key,
                                     headers={"kid": "not-published"}),
             "no_token": None}[case]
    got = subscribe(tiled_server.uri, f"raw/a1/{uid}/primary/saxs", token, mode, duration=2.0)
    assert not got["messages"], got
    if token is not None:  # refused outright; with no token at all Tiled waits for the auth message
        assert got["close"] is not None or got["status"] in (401, 403), got


def test_subscription_ends_when_its_token_expires(idp, tiled_server):
    """Tiled checks a websocket's token only at connect; the gate ends the subscription at the
    first message after the token's expiry (plus the validator's 10 s leeway, as on HTTP)."""
    alice = idp.token("alice")
    cap, thread, out = scan_in_thread(tiled_server.uri, alice, num=100, delay=0.15)
    now = int(time.time())
    short = idp.sign(idp.claims(exp=now + 3, scope=f"read:raw:a1/{cap.uid}"))
    expires = now + 3
    got = _wait_for_saxs(tiled_server.uri, cap.uid, short, duration=30.0)
    thread.join(60)
    assert tiled_server.get(f"metadata/raw/a1/{cap.uid}", short).status_code == 401   # HTTP agrees
    assert data_messages(got), got                       # it was streaming...
    assert got["close"] is not None and got["close"][0] == 4001, got["close"]   # ...and was ended
    late = [t for t in got["wall"] if t > expires + LEEWAY + 1.5]
    assert not late, "data after expiry"


def _wait_for_saxs(uri, uid, token, duration, stop_after=None):
    deadline = time.monotonic() + 30
    while True:
        got = subscribe(uri, f"raw/a1/{uid}/primary/saxs", token, "first-message", duration=duration,
                        stop_after=stop_after)
        got["wall"] = [time.time() - (time.monotonic() - t) for t in got["times"]]
        if got["messages"] or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_access_revoked_mid_stream_ends_the_subscription(idp, checked_tiled):
    """Documented behaviour: with revocation checks on, a subscription whose token is revoked
    at the IdP is closed (4001, "no longer active") at the first message after the validation
    cache window; nothing is delivered after that.  (Without revocation checks a revoked
    token, like on HTTP, works until it expires, and expiry ends the subscription.)"""
    tiled = checked_tiled
    alice = idp.token("alice")
    cap, thread, out = scan_in_thread(tiled.uri, alice, num=50, delay=0.15)
    _, data = idp.delegate(alice, "a1", cap.uid)
    revoked_at = {}

    def revoke_after_some(got):
        if len(data_messages(got)) >= 3 and not revoked_at:
            oauth.revoke(discover(idp.issuer)["revocation_endpoint"], data, client_id="visitflow",
                         client_secret="visitflow-dev-secret")
            revoked_at["t"] = time.monotonic()

    got = _wait_for_saxs(tiled.uri, cap.uid, data, duration=20.0, stop_after=revoke_after_some)
    thread.join(60)
    assert revoked_at, got
    assert got["close"] is not None and got["close"][0] == 4001 and "no longer active" in got["close"][1], got["close"]
    late = [t for t in got["times"] if t > revoked_at["t"] + CACHE + 1.0]
    assert not late, f"{len(late)} messages after revocation + cache window"
    # the HTTP path agrees
    assert tiled.get(f"metadata/raw/a1/{cap.uid}", data).status_code == 401
