"""Token service production config and the revocation log (pure logic; the servers are in
test_token_service.py)."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from tests.fixtures.federation_fixtures import TOKEN_SERVICE_CONFIG
from visitflow.errors import ConfigError
from visitflow.token_service.config import IdPConfig
from visitflow.token_service.federation import Federation
from visitflow.token_service.revocations import RevocationLog


def shipped() -> dict:
    return yaml.safe_load(TOKEN_SERVICE_CONFIG.read_text())


def test_shipped_config_loads_with_secrets_from_the_environment(monkeypatch):
    for name in ("BLUEAPI", "VISITFLOW", "TILED", "ADMIN"):
        monkeypatch.setenv(f"VISITFLOW_{name}_SECRET", f"s-{name}")
    monkeypatch.setenv("VISITFLOW_OPA_TOKEN", "t-opa")
    monkeypatch.setenv("VISITFLOW_TOKEN_SERVICE_DATABASE_URL", "postgresql://ts:pw@db/tokens")
    config = IdPConfig.from_dict(shipped())
    assert config.production and not config.users
    assert config.state.kind == "postgres" and config.state.poll_seconds < config.state.key_publish_ahead
    assert config.clients["blueapi"].secret == "s-BLUEAPI"
    assert all("password" not in c.grants for c in config.clients.values())
    fed = Federation.from_config(config.federation)
    assert fed.trusts("http://127.0.0.1:8080/realms/facility")
    assert fed.authority._headers == {"Authorization": "Bearer t-opa"}, "OPA is asked with its token"
    monkeypatch.delenv("VISITFLOW_OPA_TOKEN")
    with pytest.raises(ConfigError, match="VISITFLOW_OPA_TOKEN"):
        Federation.from_config(config.federation)
    monkeypatch.delenv("VISITFLOW_TILED_SECRET")
    with pytest.raises(ConfigError, match="VISITFLOW_TILED_SECRET"):
        IdPConfig.from_dict(shipped())


def test_production_refuses_users_password_and_missing_federation(monkeypatch):
    for name in ("BLUEAPI", "VISITFLOW", "TILED", "ADMIN"):
        monkeypatch.setenv(f"VISITFLOW_{name}_SECRET", "x")
    with pytest.raises(ConfigError, match="no users"):
        IdPConfig.from_dict({**shipped(), "users": {"alice": {"password": "a", "scopes": []}}})
    d = shipped()
    d["clients"]["blueapi"]["grants"].append("password")
    with pytest.raises(ConfigError, match="no password grant"):
        IdPConfig.from_dict(d)
    with pytest.raises(ConfigError, match="needs federation"):
        IdPConfig.from_dict({**shipped(), "federation": None})
    with pytest.raises(ConfigError, match="at least one trusted issuer"):
        Federation.from_config({"issuers": [], "authority": {"kind": "scopes"}})
    with pytest.raises(ConfigError, match="unknown keys"):
        Federation.from_config({"issuers": ["http://x"], "authorities": {}})


def test_revocation_log_survives_reload_and_drops_expired(tmp_path):
    log = RevocationLog(tmp_path / "revocations.jsonl")
    log.append("jti", "live", time.time() + 60)
    log.append("jti", "old", time.time() - 1)
    log.append("sid", "s1", time.time() + 60)
    with open(tmp_path / "revocations.jsonl", "a") as f:
        f.write('{"kind": "jti", "id": "torn"')  # a crash mid-write
    jtis, sids = RevocationLog(tmp_path / "revocations.jsonl").load()
    assert set(jtis) == {"live"} and set(sids) == {"s1"}
    lines = (tmp_path / "revocations.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)
    assert RevocationLog(None).load() == ({}, {})


def test_the_shared_state_settings_are_checked(monkeypatch):
    """state.kind postgres: the URL only from the environment; a key must be known everywhere
    before it signs; no key may be retired while a token it signed is still valid."""
    from visitflow.token_service.config import StateConfig

    assert IdPConfig.from_dict({}).state.kind == "file"            # `visitflow up`: one node
    monkeypatch.delenv("VF_TEST_DB", raising=False)
    with pytest.raises(ConfigError, match=r"\$VF_TEST_DB is not set"):
        StateConfig.from_dict({"kind": "postgres", "database_url_env": "VF_TEST_DB"})
    with pytest.raises(ConfigError, match="database_url_env"):
        StateConfig.from_dict({"kind": "postgres", "database_url": "postgresql://x"})
    monkeypatch.setenv("VF_TEST_DB", "postgresql://u:p@h/d")
    assert StateConfig.from_dict({"kind": "postgres", "database_url_env": "VF_TEST_DB"}).database_url == "postgresql://u:p@h/d"
    with pytest.raises(ConfigError, match="poll_seconds < key_publish_ahead"):
        StateConfig.from_dict({"kind": "postgres", "database_url_env": "VF_TEST_DB", "poll_seconds": 5,
                               "key_publish_ahead": 5})
    with pytest.raises(ConfigError, match="state.kind must be"):
        StateConfig.from_dict({"kind": "redis"})
    state = {"kind": "postgres", "database_url_env": "VF_TEST_DB", "key_overlap": 3600}
    with pytest.raises(ConfigError, match="key_overlap .* shorter than the longest access-token lifetime .86400"):
        IdPConfig.from_dict({"audiences": {"visitflow": {"access": 86400}}, "state": state})
    assert IdPConfig.from_dict({"audiences": {"visitflow": {"access": 3000}}, "state": state}).state.key_overlap == 3600
