"""The worker's endpoint allow-list (visitflow/core/endpoints.py): pure logic, no servers."""

import pytest

from visitflow.core import endpoints
from visitflow.errors import ConfigError, EndpointNotAllowed

LIST = ("http://127.0.0.1:8180", "https://kc.example/realms/facility", "http://tiled:8000/")


@pytest.mark.parametrize("url, ok", [
    ("http://127.0.0.1:8180", True),
    ("http://127.0.0.1:8180/token", True),
    ("http://127.0.0.1:8181/token", False),                          # another port
    ("https://127.0.0.1:8180", False),                               # another scheme
    ("https://kc.example/realms/facility/protocol/openid-connect/token", True),
    ("https://kc.example:443/realms/facility", True),                # default port made explicit
    ("https://KC.example/realms/facility", True),                    # host names are case-blind
    ("https://kc.example/realms/facilityx", False),                  # not on a segment boundary
    ("https://kc.example/realms/other", False),
    ("https://kc.example.evil/realms/facility", False),
    ("https://user@evil.example/realms/facility", False),
    ("http://tiled:8000/api/v1/", True),
    ("ftp://tiled:8000/", False),
    ("not a url", False),
])
def test_permits(url, ok):
    assert endpoints.permits(url, LIST) is ok


def test_check_refuses_with_a_reason_and_none_allows_all():
    with pytest.raises(EndpointNotAllowed, match=r"issuer 'http://evil:1' is not on this worker's allow-list "
                                                 r"\(VISITFLOW_ALLOWED_ENDPOINTS=http://127.0.0.1:8180 "):
        endpoints.check("http://evil:1", "issuer", LIST)
    endpoints.check("http://evil:1", "issuer", None)
    with pytest.raises(EndpointNotAllowed, match=r"\(empty\)"):
        endpoints.check("http://127.0.0.1:8180", "issuer", ())


def test_check_block_checks_every_uri():
    endpoints.check_block({"issuer": "http://127.0.0.1:8180", "raw_uri": "http://tiled:8000",
                           "processed_uri": None}, LIST)
    with pytest.raises(EndpointNotAllowed, match="processed Tiled URI"):
        endpoints.check_block({"issuer": "http://127.0.0.1:8180", "raw_uri": "http://tiled:8000",
                               "processed_uri": "http://elsewhere:8000"}, LIST)


def test_allowed_reads_the_environment_and_refuses_malformed_entries():
    assert endpoints.allowed({}) is None
    assert endpoints.allowed({endpoints.ENV: "http://a:1, https://b/x"}) == ("http://a:1", "https://b/x")
    assert endpoints.allowed({endpoints.ENV: ""}) == ()
    with pytest.raises(ConfigError):
        endpoints.allowed({endpoints.ENV: "a:1"})


def test_env_overrides_names_only_changed_protected_names():
    worker = {"PREFECT_API_URL": "http://p/api", endpoints.ENV: "http://a:1"}
    assert endpoints.env_overrides({"PREFECT_API_URL": "http://p/api", "OTHER": "x"}, worker) == []
    assert endpoints.env_overrides({endpoints.ENV: "http://a:1 http://evil", "PREFECT_API_URL": "http://e/api",
                                    "PREFECT_API_AUTH_STRING": "x"}, worker) == \
        [endpoints.ENV, "PREFECT_API_URL", "PREFECT_API_AUTH_STRING"]
    assert endpoints.env_overrides({"PREFECT_API_KEY": None}, worker) == []
