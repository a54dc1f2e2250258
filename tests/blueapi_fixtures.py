"""The ``blueapi_stack`` fixture: the real blueapi 1.21.1 server (its own venv, built by
``.ci/install-blueapi``) with visitflow's trigger installed, and the servers it talks to
(tests/blueapi_stack.py).  Started once per session, torn down by process group.

Without the venv the suite skips locally and FAILS under CI=true (.ci/run builds it)."""

from __future__ import annotations

import os

import pytest

from . import blueapi_stack


def require_venv() -> None:
    if blueapi_stack.venv_present():
        return
    message = f"blueapi's venv {blueapi_stack.VENV} is missing: run .ci/install-blueapi"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def blueapi_venv():
    require_venv()
    blueapi_stack.refresh_trigger()
    return blueapi_stack.python()


@pytest.fixture(scope="session")
def blueapi(tmp_path_factory, blueapi_venv):
    with blueapi_stack.running_stack(tmp_path_factory.mktemp("blueapi-stack")) as stack:
        yield stack
