"""visitflow/token_service/federation.py ``subject_refused``: which refusal of a subject token is
the caller's fault (401) and which is the facility IdP's silence (503) -- pure logic."""

from __future__ import annotations

import pytest

from visitflow.errors import InvalidToken
from visitflow.token_service.federation import subject_refused


def test_keys_that_could_not_be_fetched_are_503_temporarily_unavailable():
    err = subject_refused(InvalidToken("cannot verify tokens of https://idp now: ConnectError", code="keys_unavailable"))
    assert (err.status, err.error) == (503, "temporarily_unavailable")
    assert err.description == "subject_token: cannot verify tokens of https://idp now: ConnectError"
    assert err.headers == {"Retry-After": "5"}


@pytest.mark.parametrize("code", ["expired", "bad_signature", "unknown_key", "wrong_issuer", "malformed", None])
def test_every_other_failed_check_is_401_invalid_token_with_the_reason(code):
    err = subject_refused(InvalidToken("the reason", code=code))
    assert (err.status, err.error, err.description) == (401, "invalid_token", "subject_token: the reason")
