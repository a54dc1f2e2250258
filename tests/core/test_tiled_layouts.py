"""A second real Tiled with a blueapi-style raw-only layout (``{instrument}/{visit}/{run}``),
as in a deployment where raw and processed live on two servers."""

from __future__ import annotations

import pytest

from tests.fixtures.tiled_fixtures import start_tiled
from visitflow.core.tiled_admin import admin_auth, ensure_visits
from visitflow.core.tiled_client import BearerAuth, raw_client

TEMPLATE = "{instrument}/{visit}/{run}"


@pytest.fixture(scope="module")
def raw_only(idp, tmp_path_factory):
    handle = start_tiled(idp, tmp_path_factory.mktemp("tiled-raw-only"), raw_template=TEMPLATE, processed_template="")
    try:
        admin = admin_auth(idp.issuer, "visitflow-admin", "admin-dev-secret")
        created = ensure_visits(handle.uri, admin, ["a1", "a2"], layout=handle.layout, extra={"instrument": "i22"})
        assert created == ["i22", "i22/a1", "i22/a2"]
        yield handle
    finally:
        handle.service.stop()


def test_templates_drive_access_on_a_raw_only_server(raw_only, idp):
    import bluesky.plans as bp
    from bluesky import RunEngine
    from bluesky_tiled_plugins import TiledWriter
    from ophyd.sim import det

    alice = BearerAuth(lambda: idp.token("alice"))
    RE = RunEngine({})
    RE.subscribe(TiledWriter(raw_client(raw_only.uri, alice, visit="a1", layout=raw_only.layout,
                                        extra={"instrument": "i22"})))
    (uid,) = RE(bp.count([det], num=2))
    run = raw_client(raw_only.uri, alice, visit="a1", run=uid, layout=raw_only.layout, extra={"instrument": "i22"})
    assert run.metadata["stop"]["exit_status"] == "success"
    assert len(run["primary"]["det"].read()) == 2

    bob = idp.token("bob")
    assert raw_only.keys("", bob) == ["i22"]
    assert raw_only.keys("i22", bob) == ["a2"]
    assert raw_only.get(f"metadata/i22/a1/{uid}", bob).status_code == 404
    t_data = idp.delegate(idp.token("alice"), "a1", uid)[1]
    assert raw_only.keys("i22/a1", t_data) == [uid]
    assert raw_only.get(f"metadata/processed/a1/{uid}", t_data).status_code == 404   # no such store here
