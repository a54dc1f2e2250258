"""Fixtures shared by the blueapi suites of tests/trigger/."""

from __future__ import annotations

import pytest

from visitflow.core.prefect_api import PrefectAPI


@pytest.fixture(scope="module")
def prefect(blueapi):
    """A client of the blueapi stack's Prefect API (tests/fixtures/blueapi_stack.py); a module
    that runs its own stack overrides it."""
    api = PrefectAPI(blueapi.prefect_api)
    yield api
    api.close()
