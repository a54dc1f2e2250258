"""The ``tiled_server`` fixture: a real Tiled process with our authenticator and policy.

Started once per session (``visitflow tiled serve``, the same entry point operators use)
on a random loopback port against the session's dev IdP, then the admin step creates the
visit containers ``raw|processed/{a1,a2}``.  Torn down by process group.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from visitflow.core.layout import DEFAULT_PROCESSED_TEMPLATE, DEFAULT_RAW_TEMPLATE, Layout
from visitflow.stack.services import Service, free_port, start_service

VISITS = ("a1", "a2")


@dataclass
class TiledHandle:
    uri: str
    issuer: str
    state_dir: Path
    service: Service
    layout: Layout

    @property
    def api(self) -> str:
        return f"{self.uri}/api/v1"

    def get(self, path: str, token: str | None = None, **kwargs) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.get(f"{self.api}/{path.lstrip('/')}", headers=headers, timeout=30, **kwargs)

    def request(self, method: str, path: str, token: str | None = None, **kwargs) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.request(method, f"{self.api}/{path.lstrip('/')}", headers=headers, timeout=30, **kwargs)

    def keys(self, path: str, token: str) -> list[str]:
        """Keys of the children of ``path`` as this token sees them (asserts 200)."""
        r = self.get(f"search/{path}", token, params={"fields": "", "page[limit]": 300})
        assert r.status_code == 200, (path, r.status_code, r.text)
        return [item["id"] for item in r.json()["data"]]


def start_tiled(idp, tmp: Path, *, raw_template: str | None = None,
                processed_template: str | None = None, extra_args: tuple[str, ...] = (),
                env: dict | None = None) -> TiledHandle:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "visitflow.cli", "tiled", "serve", "--issuer", idp.issuer,
            "--state-dir", str(tmp / "state"), "--port", str(port), "--log-level", "warning"]
    if raw_template is not None:
        argv += ["--raw-template", raw_template]
    if processed_template is not None:
        argv += ["--processed-template", processed_template]
    argv += list(extra_args)
    service = start_service("tiled", argv, log_dir=tmp / "logs", health_url=f"{uri}/api/v1/", env=env)
    try:
        service.wait_ready(timeout=120)
    except Exception:
        service.stop()
        raise
    layout = Layout.from_templates(
        DEFAULT_RAW_TEMPLATE if raw_template is None else (raw_template or None),
        DEFAULT_PROCESSED_TEMPLATE if processed_template is None else (processed_template or None),
    )
    return TiledHandle(uri, idp.issuer, tmp / "state", service, layout)


@contextlib.contextmanager
def running_tiled(idp, tmp: Path, **kwargs):
    """A Tiled server (``start_tiled`` options) with the visit containers created by the admin
    step; stopped on exit.  Every fixture needing its own server uses this."""
    from visitflow.core.tiled_admin import admin_auth, ensure_visits

    handle = start_tiled(idp, tmp, **kwargs)
    try:
        ensure_visits(handle.uri, admin_auth(idp.issuer, "visitflow-admin", "admin-dev-secret"), VISITS,
                      layout=handle.layout)
        yield handle
    finally:
        handle.service.stop()


@pytest.fixture(scope="session")
def tiled_server(idp, tmp_path_factory):
    with running_tiled(idp, tmp_path_factory.mktemp("tiled")) as handle:
        yield handle
