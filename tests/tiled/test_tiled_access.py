"""Tiled with our authenticator and access policy, against the real servers.

Alice writes real bluesky runs with bluesky's own ``TiledWriter``; Bob (visit a2), a
delegated run-scoped token obtained by the real two-hop exchange, the admin service account
and a matrix of bad tokens then meet the same Tiled process.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time

import httpx
import jwt
import numpy as np
import pytest

from visitflow.core.tiled_client import BearerAuth, connect, node_uri, processed_client, raw_client
from visitflow.core.tokens import unverified_claims

FRAME = (16, 12)


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def alice_auth(idp):
    return BearerAuth(lambda: idp.token("alice"))


@pytest.fixture(scope="module")
def bob_token(idp):
    return idp.token("bob")


@pytest.fixture(scope="module")
def runs(tiled_server, alice_auth):
    """Two real scans by Alice, written by bluesky's TiledWriter into raw/a1.

    Returns {uid: the saxs frames the event documents carried} to compare reads exactly.
    """
    return write_runs(tiled_server, alice_auth)


def write_runs(tiled_server, alice_auth, wrap=lambda writer: writer):
    """The two scans; ``wrap`` may stand between the RunEngine and TiledWriter (the Rego-policy
    module uses it to tag each run, tests/tiled/test_tiled_rego_policy.py)."""
    import bluesky.plans as bp
    from bluesky import RunEngine
    from bluesky_tiled_plugins import TiledWriter
    from ophyd.sim import SynSignal, det, motor

    rng = np.random.default_rng(7)
    saxs = SynSignal(func=lambda: rng.random(FRAME), name="saxs")  # 2-D detector, data inline
    visit = raw_client(tiled_server.uri, alice_auth, visit="a1")
    RE = RunEngine({})
    RE.subscribe(wrap(TiledWriter(visit)))
    emitted: list[np.ndarray] = []
    RE.subscribe(lambda name, doc: emitted.append(np.asarray(doc["data"]["saxs"])), "event")
    out = {}
    for plan in (bp.scan([det, saxs], motor, -1, 1, 5), bp.count([det, saxs], num=3)):
        emitted.clear()
        (uid,) = RE(plan)
        out[uid] = np.stack(emitted)   # exactly what the event documents carried
    return out


@pytest.fixture(scope="module")
def uids(runs):
    return list(runs)


@pytest.fixture(scope="module")
def t_data(idp, uids):
    """Alice -> blueapi (T_grant, aud visitflow) -> visitflow (T_data, aud tiled), for run 1."""
    _grant, data = idp.delegate(idp.token("alice"), "a1", uids[0])
    return data


def patch_metadata(tiled, path, token, metadata):
    body = {"content-type": "application/merge-patch+json", "metadata": metadata, "specs": None}
    return tiled.request("PATCH", f"metadata/{path}", token, json=body)


def new_container(tiled, path, token, key=None, metadata=None):
    body = {"structure_family": "container", "metadata": metadata or {}, "specs": [], "data_sources": []}
    if key is not None:
        body["id"] = key
    return tiled.request("POST", f"metadata/{path}", token, json=body)


# ---------------------------------------------------------------------- alice and TiledWriter
def test_alice_writes_runs_with_tiledwriter_and_reads_them_back(tiled_server, runs, uids, alice_auth):
    scan_uid, count_uid = uids
    run = raw_client(tiled_server.uri, alice_auth, visit="a1", run=scan_uid)
    start, stop = run.metadata["start"], run.metadata["stop"]
    assert start["uid"] == scan_uid and start["plan_name"] == "scan"
    assert stop["run_start"] == scan_uid and stop["exit_status"] == "success"
    assert stop["num_events"] == {"primary": 5}
    stream = run["primary"]
    saxs = stream["saxs"].read()
    assert saxs.shape == (5, *FRAME)
    np.testing.assert_array_equal(saxs, runs[scan_uid])
    np.testing.assert_allclose(stream["motor"].read(), np.linspace(-1, 1, 5))
    assert len(stream["det"].read()) == 5
    assert set(uids) <= set(raw_client(tiled_server.uri, alice_auth, visit="a1"))


def test_identity_encoding_is_requested_and_honoured(tiled_server, uids, alice_auth):
    run = raw_client(tiled_server.uri, alice_auth, visit="a1", run=uids[0])
    assert run.context.http_client.headers["accept-encoding"] == "identity"
    r = httpx.get(f"{tiled_server.api}/array/full/raw/a1/{uids[0]}/primary/saxs",
                  headers={"Authorization": f"Bearer {alice_auth.token()}", "accept-encoding": "identity",
                           "accept": "application/octet-stream"})
    assert r.status_code == 200 and "content-encoding" not in r.headers
    assert len(r.content) == 5 * FRAME[0] * FRAME[1] * 8


# ------------------------------------------------------------------------------------- bob
def test_bob_lists_only_his_visit(tiled_server, runs, bob_token):
    assert sorted(tiled_server.keys("", bob_token)) == ["processed", "raw"]
    assert tiled_server.keys("raw", bob_token) == ["a2"]
    assert tiled_server.keys("processed", bob_token) == ["a2"]


@pytest.mark.parametrize("route", ["metadata/raw/a1", "metadata/raw/a1/{uid}", "search/raw/a1",
                                   "array/full/raw/a1/{uid}/primary/saxs", "metadata/processed/a1"])
def test_bob_cannot_read_a1(tiled_server, uids, bob_token, route):
    r = tiled_server.get(route.format(uid=uids[0]), bob_token)
    assert r.status_code in (403, 404), (route, r.status_code, r.text)


def test_bob_cannot_create_under_a1_but_can_under_a2(tiled_server, bob_token):
    assert new_container(tiled_server, "raw/a1", bob_token, key="bobs-run").status_code in (403, 404)
    assert new_container(tiled_server, "processed/a1", bob_token, key="bobs-run").status_code in (403, 404)
    ok = new_container(tiled_server, "raw/a2", bob_token, key="bobs-run")
    assert ok.status_code == 200, ok.text


def test_deep_search_does_not_leak_other_visits(tiled_server, uids, bob_token, alice_auth):
    """Tiled applies only the search root's filter to all descendants; ours must not leak."""
    def deep(path, token):
        r = tiled_server.get(f"search-deep/{path}", token, params={"page[limit]": 300})
        assert r.status_code == 200, r.text
        return [item["id"] for item in r.json()["data"]]

    assert set(deep("", bob_token)) <= {"raw", "processed"}
    assert set(deep("raw", bob_token)) <= {"a2"}
    found = deep("raw/a1", alice_auth.token())   # visit-wide: the whole subtree
    assert set(uids) | {"primary", "saxs", "internal"} <= set(found)


# ---------------------------------------------------------------------- delegated T_data
def test_delegated_token_reads_only_its_run(tiled_server, runs, uids, t_data):
    claims = unverified_claims(t_data)
    assert claims["aud"] in ("tiled", ["tiled"]) and claims["sub"] == "alice" and claims.get("act")
    auth = BearerAuth(lambda: t_data)
    run = raw_client(tiled_server.uri, auth, visit="a1", run=uids[0])
    np.testing.assert_array_equal(run["primary"]["saxs"].read(), runs[uids[0]])
    assert tiled_server.keys("raw/a1", t_data) == [uids[0]]
    assert tiled_server.keys("raw", t_data) == ["a1"]
    for route in (f"metadata/raw/a1/{uids[1]}", f"array/full/raw/a1/{uids[1]}/primary/saxs",
                  "metadata/raw/a2", "metadata/processed/a2"):
        assert tiled_server.get(route, t_data).status_code == 404, route


def test_delegated_token_cannot_write_raw(tiled_server, uids, t_data):
    r = patch_metadata(tiled_server, f"raw/a1/{uids[0]}", t_data, {"tampered": True})
    assert r.status_code == 403, r.text
    assert new_container(tiled_server, f"raw/a1/{uids[0]}", t_data, key="extra").status_code == 403
    assert new_container(tiled_server, "raw/a1", t_data, key=uids[0] + "x").status_code == 403


def test_delegated_token_writes_processed_for_its_run_only(tiled_server, runs, uids, t_data, alice_auth):
    auth = BearerAuth(lambda: t_data)
    node = processed_client(tiled_server.uri, auth, visit="a1", run=uids[0])   # creates processed/a1/<uid1>
    out = node.create_container("saxs_average", metadata={"analysis": "saxs_average"})
    average = runs[uids[0]].mean(axis=0)
    out.write_array(average, key="average")
    out.update_metadata({"status": "done", "frames": 5})
    # Alice (visit-wide) reads what the delegated token wrote.
    mine = connect(node_uri(tiled_server.uri, f"processed/a1/{uids[0]}/saxs_average"), alice_auth)
    np.testing.assert_allclose(mine["average"].read(), average)
    assert mine.metadata["status"] == "done"
    # ...but the token cannot create another run's node, nor one with a key the server picks.
    assert new_container(tiled_server, "processed/a1", t_data, key=uids[1]).status_code == 403
    assert new_container(tiled_server, "processed/a1", t_data).status_code == 403
    assert tiled_server.keys("processed/a1", t_data) == [uids[0]]
    assert new_container(tiled_server, "processed/a2", t_data, key=uids[0]).status_code == 404
    # Outputs may be replaced (deleted) inside its processed run; raw is never deleted.
    out.write_array(average, key="scratch")
    delete = lambda path, token: tiled_server.request(  # noqa: E731
        "DELETE", f"metadata/{path}", token, params={"recursive": True, "external_only": False}).status_code
    assert delete(f"processed/a1/{uids[0]}/saxs_average/scratch", t_data) == 200
    assert delete(f"raw/a1/{uids[0]}/primary", t_data) == 403
    assert delete(f"raw/a1/{uids[0]}/primary", alice_auth.token()) == 403


def test_run_scoped_raw_writer_may_create_exactly_its_run(tiled_server, idp):
    token = idp.sign(idp.claims(aud="tiled", scope="write:raw:a1/run-x read:raw:a1/run-x"))
    assert new_container(tiled_server, "raw/a1", token, key="run-y").status_code == 403
    r = new_container(tiled_server, "raw/a1", token, key="run-x")
    assert r.status_code == 200, r.text
    assert new_container(tiled_server, "raw/a1/run-x", token, key="primary").status_code == 200
    assert tiled_server.keys("raw/a1", token) == ["run-x"]
    assert new_container(tiled_server, "processed/a1", token, key="run-x").status_code == 404  # hidden


def test_processed_scope_cannot_write_raw(tiled_server, uids, idp):
    token = idp.sign(idp.claims(aud="tiled", scope="write:processed:a1"))
    assert new_container(tiled_server, "raw/a1", token, key="sneaky").status_code in (403, 404)
    assert patch_metadata(tiled_server, f"raw/a1/{uids[0]}", token, {"x": 1}).status_code in (403, 404)


# ----------------------------------------------------------------------------------- admin
def test_only_admin_creates_visits_and_store_roots(tiled_server, idp, alice_auth):
    from visitflow.core.tiled_admin import admin_auth, ensure_visits

    alice = alice_auth.token()
    assert new_container(tiled_server, "raw", alice, key="a9").status_code == 403
    assert new_container(tiled_server, "", alice, key="elsewhere").status_code == 403
    assert patch_metadata(tiled_server, "raw/a1", alice, {"owner": "alice"}).status_code == 403
    admin = admin_auth(idp.issuer, "visitflow-admin", "admin-dev-secret")
    assert ensure_visits(tiled_server.uri, admin, ["a1", "a2"]) == []   # idempotent
    assert ensure_visits(tiled_server.uri, admin, ["a3"]) == ["raw/a3", "processed/a3"]
    assert "a3" not in tiled_server.keys("raw", alice)


def test_ensure_visits_cli(tiled_server, idp):
    import os

    argv = [sys.executable, "-m", "visitflow.cli", "tiled", "ensure-visits", "--uri", tiled_server.uri,
            "--issuer", idp.issuer, "a4"]
    out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "VISITFLOW_ADMIN_SECRET": "admin-dev-secret"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["created", "raw/a4", "created", "processed/a4"]
    wrong = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "VISITFLOW_ADMIN_SECRET": "nope"})
    assert wrong.returncode != 0 and "401" in wrong.stderr


# ------------------------------------------------------------------------ bad-token matrix
def _b64(obj) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _hs256_with_public_key(idp, claims) -> str:
    import hashlib
    import hmac

    header = {"alg": "HS256", "typ": "at+jwt", "kid": idp.signing_key()[0]}
    signing_input = f"{_b64(header)}.{_b64(claims)}"
    sig = hmac.new(idp.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(sig)}"


def _rs256_raw_header(idp, header, claims) -> str:
    """RS256 with the IdP's real key but a header pyjwt would refuse to write."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    signing_input = f"{_b64(header)}.{_b64(claims)}"
    sig = idp.signing_key()[1].sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(sig)}"


def bad_tokens(idp) -> dict[str, str | None]:
    now = int(time.time())
    c = lambda **kw: idp.claims(**{"aud": "tiled", **kw})  # noqa: E731
    good = idp.sign(c())
    head, _body, sig = good.split(".")
    return {
        "expired": idp.sign(c(exp=now - 600, iat=now - 900, nbf=now - 900)),
        "not_yet_valid": idp.sign(c(nbf=now + 600)),
        "issued_in_future": idp.sign(c(iat=now + 600, nbf=None)),
        "wrong_audience": idp.sign(c(aud=["blueapi", "visitflow"])),
        "wrong_issuer": idp.sign(c(iss="http://evil.example")),
        "unknown_kid": idp.sign(c(), headers={"kid": "no-such-key"}),
        "kid_not_a_string": _rs256_raw_header(idp, {"alg": "RS256", "typ": "at+jwt", "kid": 123}, c()),
        "no_kid": jwt.encode(c(), idp.signing_key()[1], algorithm="RS256", headers={"typ": "at+jwt"}),
        "bad_signature": idp.sign(c(), key=idp.other_key),
        "tampered_payload": f"{head}.{_b64(c(scope='read:data:a1 read:data:a2'))}.{sig}",
        "alg_none": f"{_b64({'alg': 'none', 'typ': 'at+jwt', 'kid': idp.signing_key()[0]})}.{_b64(c())}.",
        "hs256_with_public_key": _hs256_with_public_key(idp, c()),
        "id_token": idp.sign(c(typ="ID", nonce="n"), headers={"typ": "JWT"}),
        "wrong_typ_header": idp.sign(c(), headers={"typ": "dpop+jwt"}),
        "missing_exp": idp.sign(c(exp=None)),
        "missing_sub": idp.sign(c(sub=None)),
        "garbage": "not.a.jwt",
        "five_segments": "a.b.c.d.e",
        "no_token": None,
        # valid signatures, but nothing Tiled-relevant granted
        "only_run_scope": idp.sign(c(scope="run:saxs_average:a1 openid")),
        "smuggled_tiled_scopes": idp.sign(c(scope="read:metadata read:data write:data create:node")),
    }


UNAUTHENTICATED = ["expired", "not_yet_valid", "issued_in_future", "wrong_audience", "wrong_issuer",
                   "unknown_kid", "kid_not_a_string", "no_kid", "bad_signature", "tampered_payload", "alg_none",
                   "hs256_with_public_key", "id_token", "wrong_typ_header", "missing_exp", "missing_sub",
                   "garbage", "five_segments", "no_token", "only_run_scope", "smuggled_tiled_scopes"]
ROUTES = ["metadata/raw/a1/{uid}", "search/raw", "array/full/raw/a1/{uid}/primary/saxs"]


@pytest.fixture(scope="module")
def bad(idp):
    return bad_tokens(idp)


def test_control_token_is_accepted(tiled_server, idp, uids):
    """The matrix is meaningful only if a token signed the same way, but well-formed, works."""
    r = tiled_server.get(f"metadata/raw/a1/{uids[0]}", idp.sign(idp.claims(aud="tiled")))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", UNAUTHENTICATED)
def test_bad_tokens_are_401_with_a_reason(tiled_server, bad, uids, case, route):
    r = tiled_server.get(route.format(uid=uids[0]), bad[case])
    assert r.status_code == 401, (case, r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and len(detail) > 5, detail
    assert r.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("route", ROUTES)
def test_valid_token_for_another_visit_is_403_or_404(tiled_server, idp, uids, route):
    token = idp.sign(idp.claims(aud="tiled", sub="bob", scope="read:data:a2 write:data:a2"))
    r = tiled_server.get(route.format(uid=uids[0]), token)
    if route.startswith("search/raw"):
        assert r.status_code == 200 and [d["id"] for d in r.json()["data"]] == ["a2"]
    else:
        assert r.status_code in (403, 404), r.text


def test_unknown_kid_after_rotation_is_picked_up(tiled_server, idp, uids):
    """Key rotation reaches Tiled: a token with a new kid makes it refetch the JWKS."""
    subprocess.run([sys.executable, "-m", "visitflow.cli", "idp", "--rotate-keys", "--keys-dir", str(idp.keys_dir)],
                   check=True, capture_output=True)
    token = idp.token("alice")
    deadline, statuses = time.monotonic() + 15, []
    while time.monotonic() < deadline:   # a refetch may be rate-limited for a few seconds
        r = tiled_server.get(f"metadata/raw/a1/{uids[0]}", token)
        statuses.append(r.status_code)
        if r.status_code == 200:
            break
        assert r.status_code == 401 and "signing key" in r.json()["detail"], r.text
        time.sleep(1)
    assert statuses[-1] == 200, statuses


# --------------------------------------------------------------------------- client auth
def test_auth_retries_once_on_401_with_a_fresh_token(tiled_server, idp, uids):
    tokens = iter(["garbage-token", idp.token("alice")])
    auth = BearerAuth(lambda: next(tokens))
    run = raw_client(tiled_server.uri, auth, visit="a1", run=uids[0])
    assert run.metadata["start"]["uid"] == uids[0]
    assert auth.fetches == 2


def test_auth_does_not_retry_forever(tiled_server, uids):
    calls = []

    def provider():
        calls.append(1)
        return "still-garbage"

    auth = BearerAuth(provider)
    with httpx.Client(auth=auth) as client:
        r = client.get(f"{tiled_server.api}/metadata/raw/a1/{uids[0]}")
    assert r.status_code == 401 and len(calls) == 2   # one fetch, one forced refresh, no loop


def test_auth_refreshes_before_expiry(tiled_server, idp, uids):
    now = [time.time()]
    issued = []

    def provider():
        issued.append(idp.token("alice"))
        return issued[-1]    # expiry read from the JWT's exp

    auth = BearerAuth(provider, refresh_margin=60, clock=lambda: now[0])
    url = f"{tiled_server.api}/metadata/raw/a1/{uids[0]}"
    with httpx.Client(auth=auth) as client:
        assert client.get(url).status_code == 200
        exp = unverified_claims(issued[0])["exp"]
        now[0] = exp - 61          # still outside the margin: no refresh
        assert client.get(url).status_code == 200 and auth.fetches == 1
        now[0] = exp - 59          # inside the margin: refreshed *before* sending
        r = client.get(url)
        assert r.status_code == 200 and auth.fetches == 2
        assert r.request.headers["Authorization"] == f"Bearer {issued[1]}"


def test_auth_is_thread_safe(tiled_server, idp, uids):
    now = [time.time()]
    calls = []

    def provider():
        calls.append(1)
        time.sleep(0.2)   # widen the window in which threads could race
        return idp.token("alice"), now[0] + 300

    auth = BearerAuth(provider, refresh_margin=60, clock=lambda: now[0])
    url = f"{tiled_server.api}/metadata/raw/a1/{uids[0]}"
    statuses = []
    with httpx.Client(auth=auth) as client:
        statuses.append(client.get(url).status_code)
        now[0] += 250             # the token is now inside the refresh margin for every thread
        threads = [threading.Thread(target=lambda: statuses.append(client.get(url).status_code)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert statuses == [200] * 9 and len(calls) == 2   # eight threads, one refresh


# -------------------------------------------------------------------------------- config
def test_tiled_config_cli_renders_our_plugins(tmp_path):
    import yaml

    out = subprocess.run([sys.executable, "-m", "visitflow.cli", "tiled-config", "--issuer", "http://idp.example",
                          "--state-dir", str(tmp_path), "--port", "9000", "--raw-template", "{instrument}/{visit}/{run}"],
                         check=True, capture_output=True, text=True).stdout
    config = yaml.safe_load(out)
    assert config["authentication"]["providers"][0]["authenticator"].endswith(":VisitflowAuthenticator")
    assert config["authentication"]["allow_anonymous_access"] is False
    assert config["access_control"]["args"]["raw_template"] == "{instrument}/{visit}/{run}"
    assert config["catalog"]["writable_storage"][1].startswith("sqlite:///")
    assert config["uvicorn"]["port"] == 9000


def test_bearer_auth_forces_a_caching_provider_to_renew_after_401():
    """A provider that caches (like the block's DataTokenSource) is asked to *renew* after a
    401, not just asked again (which would return the refused token)."""
    import httpx as _httpx

    class Caching:
        def __init__(self):
            self.token, self.forced = "old", 0

        def __call__(self):
            return self.token, None

        def force_refresh(self):
            self.forced += 1
            self.token = "new"
            return self.token, None

    provider = Caching()
    seen = []

    def handler(request):
        seen.append(request.headers["Authorization"])
        return _httpx.Response(200 if request.headers["Authorization"] == "Bearer new" else 401)

    with _httpx.Client(transport=_httpx.MockTransport(handler), auth=BearerAuth(provider)) as client:
        assert client.get("http://tiled.invalid/api/v1/").status_code == 200
    assert seen == ["Bearer old", "Bearer new"] and provider.forced == 1
