"""Issue 20 finding 4 at the token service, on the real server (``visitflow idp``) with the
shipped limits (visitflow/token_service/config.py ``Limits``): a token of too many scopes or
too many bytes is refused with the reason, never truncated; narrowing with ``scope=`` still
works; request headers over the cap get 431 with the reason before any client or token is
looked at."""

from __future__ import annotations

import httpx
import pytest
import yaml

from tests.fixtures.idp_fixtures import IDP_CONFIG, start_idp
from visitflow.token_service.config import Limits

pytestmark = pytest.mark.security

LIMITS = Limits()
MANY = [f"read:data:v{i:05d}" for i in range(LIMITS.max_scopes + 100)]          # too many scopes
LONG = [f"read:data:{'v' * 90}{i:03d}" for i in range(LIMITS.max_scopes - 10)]    # few enough, too long


@pytest.fixture(scope="module")
def hoarding_idp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("idp-limits")
    config = yaml.safe_load(IDP_CONFIG.read_text())
    config["users"]["hoarder"] = {"password": "hoarder", "scopes": MANY}
    config["users"]["longnames"] = {"password": "longnames", "scopes": LONG}
    (tmp / "idp.yaml").write_text(yaml.safe_dump(config))
    handle = start_idp(tmp, tmp / "idp.yaml")
    yield handle
    handle.service.stop()


def login(idp, user, **extra):
    return httpx.post(f"{idp.issuer}/token", data={"grant_type": "password", "client_id": "visitflow-cli",
                                                   "username": user, "password": user, **extra}, timeout=30)


def test_a_token_of_too_many_scopes_is_refused_with_the_reason(hoarding_idp):
    resp = login(hoarding_idp, "hoarder")
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["error"] == "invalid_scope"
    assert body["error_description"] == (f"this token would carry {len(MANY)} scopes; the limit is "
                                         f"{LIMITS.max_scopes}: ask for the scopes you need (scope=...)")


def test_asking_for_fewer_scopes_still_works(hoarding_idp):
    resp = login(hoarding_idp, "hoarder", scope=" ".join(MANY[:3]))
    assert resp.status_code == 200, resp.text
    assert resp.json()["scope"].split() == MANY[:3]


def test_a_token_of_too_many_bytes_is_refused_with_the_reason(hoarding_idp):
    resp = login(hoarding_idp, "longnames")
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["error"] == "invalid_scope"
    assert body["error_description"].startswith("this token would be ")
    assert body["error_description"].endswith(f" bytes; the limit is {LIMITS.max_token_bytes}: ask for fewer "
                                              "scopes (scope=...)")
    assert len(login(hoarding_idp, "longnames", scope=" ".join(LONG[:20])).json()["access_token"]) \
        <= LIMITS.max_token_bytes


def test_oversized_request_headers_get_431_with_the_reason(hoarding_idp):
    url = f"{hoarding_idp.issuer}/token"
    form = {"grant_type": "password", "client_id": "visitflow-cli", "username": "alice", "password": "alice"}
    ok = httpx.post(url, data=form, headers={"x-pad": "p" * (LIMITS.max_header_bytes // 2)}, timeout=30)
    assert ok.status_code == 200, ok.text
    big = httpx.post(url, data=form, headers={"authorization": "Bearer " + "x" * (1 << 20)}, timeout=60)
    assert big.status_code == 431, big.text
    assert big.json()["detail"].startswith("request headers are ")
    assert big.json()["detail"].endswith(f" bytes; the limit is {LIMITS.max_header_bytes}")
