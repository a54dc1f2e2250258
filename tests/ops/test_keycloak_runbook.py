"""runbook:rotate-keycloak-secret on the real Keycloak (the session's, realm ``visitflow`` of
deployments/keycloak/realm.json, where Keycloak itself is the token service): the runbook's
own commands (Keycloak's admin CLI, ``kcadm``) give the ``visitflow`` client a new secret; the old one is then
refused (401) and the new one authenticates (a bogus refresh token is then its 400
``invalid_grant``).  The session's Keycloak is
shared, so the shipped dev secret is put back afterwards (and that is checked too)."""

from __future__ import annotations

import os

import httpx
import pytest

from tests.fixtures.keycloak_fixtures import ADMIN, REALM, keycloak_home
from tests.ops.test_runbooks import run_runbook

pytestmark = [pytest.mark.ops, pytest.mark.keycloak]

OLD = "visitflow-dev-secret"   # deployments/keycloak/realm.json's (the test realm is the shipped one)


def authenticates(keycloak, secret: str) -> tuple[int, str]:
    """(status, error) of a refresh with a bogus refresh token as ``visitflow``: a right secret
    is 400 ``invalid_grant`` (the token is refused), a wrong one 401 ``unauthorized_client``
    ("Invalid client or Invalid client credentials": Keycloak 26's code for it)."""
    r = httpx.post(keycloak.oidc("token"), data={"grant_type": "refresh_token", "refresh_token": "none"},
                   auth=("visitflow", secret), timeout=20)
    return r.status_code, r.json().get("error", "")


def test_rotate_keycloak_secret_runbook_refuses_the_old_secret_and_the_new_one_works(tmp_path, keycloak):
    assert authenticates(keycloak, OLD) == (400, "invalid_grant")     # the control: the old one works
    new_file = tmp_path / "new-secret"
    env = {"KEYCLOAK_HOME": os.environ.get("KEYCLOAK_HOME") or keycloak_home(), "KC": keycloak.base,
           "REALM": REALM, "KC_ADMIN": ADMIN[0], "KC_ADMIN_PASSWORD": ADMIN[1], "OLD_SECRET": OLD,
           "NEW_SECRET_FILE": str(new_file)}
    headers = {"Authorization": f"Bearer {keycloak.admin_token()}"}
    (client,) = httpx.get(f"{keycloak.base}/admin/realms/{REALM}/clients", params={"clientId": "visitflow"},
                          headers=headers, timeout=20).json()
    try:
        out = run_runbook("rotate-keycloak-secret", env)
        assert out.strip() == "old secret: 401", out
        new = new_file.read_text().strip()
        assert new and new != OLD and new not in out
        assert (new_file.stat().st_mode & 0o077) == 0, oct(new_file.stat().st_mode)   # not readable by others
        assert authenticates(keycloak, OLD) == (401, "unauthorized_client")
        assert authenticates(keycloak, new) == (400, "invalid_grant")
    finally:   # the session's other Keycloak tests use the shipped secret
        r = httpx.put(f"{keycloak.base}/admin/realms/{REALM}/clients/{client['id']}",
                      json={**client, "secret": OLD}, headers={"Authorization": f"Bearer {keycloak.admin_token()}"},
                      timeout=20)
        assert r.status_code == 204, r.text
    assert authenticates(keycloak, OLD) == (400, "invalid_grant")
