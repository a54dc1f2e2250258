"""visitflow's isolation matrix (tests/tiled/test_tiled_access.py, its cases imported, not
copied) against a Tiled whose access policy is Tiled's own ``ExternalPolicyDecisionPoint``
asking a real OPA with deployments/opa/tiled_{entry,visitflow}.rego beside the emulated
facility rules (facility_tiled.rego), configured by the shipped
deployments/opa/tiled-access-control.yml.

That policy decides on access tags only (it never sees a path), so here every node is created
carrying its tags: the admin step tags the store roots and visit containers, and Alice's
TiledWriter gets ``tiled_access_tags`` in each start document.  Tiled 0.2.20 refuses a tag
that has no row in its ``access_tags`` table; :class:`TagSync` writes those rows — EMULATED:
it stands in for whatever keeps a facility's tag definitions (Diamond's sessions) in the
catalog.  Cases whose outcome differs under this policy are marked ``xfail(strict=True)``
with the reason, and a tagged counterpart (or the hole itself) is tested beside them.
"""

from __future__ import annotations

import functools
import sqlite3

import httpx
import pytest

from tests.fixtures.opa_fixtures import OPA_DIR, start_opa
from tests.fixtures.tiled_fixtures import VISITS, start_tiled
from tests.tiled import test_tiled_access as matrix
from tests.tiled.test_tiled_access import (  # noqa: F401  (fixtures the imported cases use)
    alice_auth, bad, bob_token, new_container, patch_metadata, t_data, uids, write_runs,
)
from visitflow.core.tiled_client import BearerAuth, connect, node_uri
from visitflow.core.tiled_admin import admin_auth

pytestmark = pytest.mark.opa

REGO = (OPA_DIR / "tiled_entry.rego", OPA_DIR / "tiled_visitflow.rego", OPA_DIR / "facility_tiled.rego",
        OPA_DIR / "data.json")
ACCESS_CONTROL = OPA_DIR / "tiled-access-control.yml"


class TagSync:
    """EMULATED facility tag sync: defines tag rows in the catalog before nodes carry them."""

    def __init__(self, catalog):
        self.catalog = catalog

    def define(self, tags):
        with sqlite3.connect(self.catalog, timeout=30) as db:
            db.executemany("INSERT OR IGNORE INTO access_tags (name, is_public) VALUES (?, 0)",
                           [(t,) for t in tags])


def run_tags(store, visit, run):
    return [f"visitflow:{store}:{visit}/{run}", f"visitflow:{store}:{visit}/*"]


def tagged(tiled, path, token, key, tags, sync):
    sync.define(tags)
    body = {"structure_family": "container", "metadata": {}, "specs": [], "data_sources": [],
            "id": key, "access_tags": tags}
    return tiled.request("POST", f"metadata/{path}", token, json=body)


@pytest.fixture(scope="module")
def tiled_opa(tmp_path_factory):
    handle = start_opa(tmp_path_factory.mktemp("opa-tiled"), REGO)
    yield handle
    handle.proxy.close()
    handle.service.stop()


@pytest.fixture(scope="module")
def tag_sync(tiled_server):
    return TagSync(tiled_server.state_dir / "catalog.sqlite")


@pytest.fixture(scope="module")
def tiled_server(idp, tiled_opa, tmp_path_factory):
    """Overrides the session's plug-in-policy Tiled for the imported cases."""
    handle = start_tiled(idp, tmp_path_factory.mktemp("tiled-rego"),
                         extra_args=("--access-control", str(ACCESS_CONTROL)),
                         env={"VISITFLOW_OPA_URL": tiled_opa.url})
    try:
        sync = TagSync(handle.state_dir / "catalog.sqlite")
        with httpx.Client(auth=admin_auth(idp.issuer, "visitflow-admin", "admin-dev-secret"), timeout=30) as admin:
            def create(path, key, tags):
                sync.define(tags)
                r = admin.post(f"{handle.api}/metadata/{path}", json={
                    "structure_family": "container", "metadata": {}, "specs": [], "data_sources": [],
                    "id": key, "access_tags": tags})
                assert r.status_code == 200, r.text
            for store in ("raw", "processed"):
                create("", store, ["visitflow:store"])
                for visit in VISITS:
                    create(store, visit, [f"visitflow:{store}:{visit}"])
        yield handle
    finally:
        handle.service.stop()


@pytest.fixture(scope="module")
def runs(tiled_server, alice_auth, tag_sync):
    """The matrix's two scans, each run tagged through TiledWriter's ``tiled_access_tags``."""
    def wrap(writer):
        def callback(name, doc):
            if name == "start":
                tags = run_tags("raw", "a1", doc["uid"])
                tag_sync.define(tags)
                doc = {**doc, "tiled_access_tags": tags}
            writer(name, doc)
        return callback
    return write_runs(tiled_server, alice_auth, wrap)


def differs(reason):
    """The imported case, expected to fail here (strict): a wrapper, so the original keeps its marks."""
    def mark(case):
        @functools.wraps(case)
        def wrapper(*args, **kwargs):
            return case(*args, **kwargs)
        wrapper.pytestmark = [*getattr(case, "pytestmark", []),
                              pytest.mark.xfail(strict=True, reason=reason)]
        return wrapper
    return mark


# ----------------------------------------------------------------- same cases, same outcome
test_alice_writes_runs_with_tiledwriter_and_reads_them_back = matrix.test_alice_writes_runs_with_tiledwriter_and_reads_them_back
test_identity_encoding_is_requested_and_honoured = matrix.test_identity_encoding_is_requested_and_honoured
test_bob_lists_only_his_visit = matrix.test_bob_lists_only_his_visit
test_bob_cannot_read_a1 = matrix.test_bob_cannot_read_a1
test_delegated_token_reads_only_its_run = matrix.test_delegated_token_reads_only_its_run
test_delegated_token_cannot_write_raw = matrix.test_delegated_token_cannot_write_raw
test_processed_scope_cannot_write_raw = matrix.test_processed_scope_cannot_write_raw
test_only_admin_creates_visits_and_store_roots = matrix.test_only_admin_creates_visits_and_store_roots
test_control_token_is_accepted = matrix.test_control_token_is_accepted
test_bad_tokens_are_401_with_a_reason = matrix.test_bad_tokens_are_401_with_a_reason
test_valid_token_for_another_visit_is_403_or_404 = matrix.test_valid_token_for_another_visit_is_403_or_404

# ------------------------------------------------------------- same cases, different outcome
UNTAGGED = "the case creates untagged nodes; under a tag-only policy an untagged create is refused (403)"
test_bob_cannot_create_under_a1_but_can_under_a2 = differs(UNTAGGED)(matrix.test_bob_cannot_create_under_a1_but_can_under_a2)
test_delegated_token_writes_processed_for_its_run_only = differs(UNTAGGED)(matrix.test_delegated_token_writes_processed_for_its_run_only)
test_run_scoped_raw_writer_may_create_exactly_its_run = differs(UNTAGGED)(matrix.test_run_scoped_raw_writer_may_create_exactly_its_run)
test_deep_search_does_not_leak_other_visits = differs(
    "deep search from the root returns every descendant the caller may see (Bob's own a2 too); the "
    "plug-in policy confines it to direct children")(matrix.test_deep_search_does_not_leak_other_visits)


# ------------------------------------------------------------------ their tagged counterparts
def test_bob_creates_tagged_runs_only_in_his_visit(tiled_server, bob_token, tag_sync):
    assert tagged(tiled_server, "raw/a1", bob_token, "bobs-run", run_tags("raw", "a1", "bobs-run"), tag_sync).status_code in (403, 404)
    assert tagged(tiled_server, "raw/a2", bob_token, "bobs-run", run_tags("raw", "a1", "bobs-run"), tag_sync).status_code == 403
    ok = tagged(tiled_server, "raw/a2", bob_token, "bobs-run", run_tags("raw", "a2", "bobs-run"), tag_sync)
    assert ok.status_code == 200, ok.text
    assert "bobs-run" in tiled_server.keys("raw/a2", bob_token)


def test_delegated_token_writes_tagged_processed_for_its_run(tiled_server, runs, uids, t_data, alice_auth, tag_sync):
    import numpy as np

    mine = run_tags("processed", "a1", uids[0])
    assert tagged(tiled_server, "processed/a1", t_data, uids[0], mine, tag_sync).status_code == 200
    node = connect(node_uri(tiled_server.uri, f"processed/a1/{uids[0]}"), BearerAuth(lambda: t_data))
    average = runs[uids[0]].mean(axis=0)
    node.write_array(average, key="average", access_tags=mine)
    seen = connect(node_uri(tiled_server.uri, f"processed/a1/{uids[0]}/average"), alice_auth)
    np.testing.assert_allclose(seen.read(), average)
    # another run's tags, or raw's, are refused whatever the key
    assert tagged(tiled_server, "processed/a1", t_data, uids[1], run_tags("processed", "a1", uids[1]), tag_sync).status_code == 403
    assert tagged(tiled_server, f"processed/a1/{uids[0]}", t_data, "x", run_tags("raw", "a1", uids[0]), tag_sync).status_code == 403
    assert tiled_server.keys("processed/a1", t_data) == [uids[0]]


def test_deep_search_shows_only_what_the_caller_may_see(tiled_server, runs, uids, bob_token, t_data):
    def deep(path, token):
        r = tiled_server.get(f"search-deep/{path}", token, params={"page[limit]": 300})
        assert r.status_code == 200, r.text
        return [item["id"] for item in r.json()["data"]]

    assert {"raw", "processed", "a2"} <= set(deep("", bob_token)) <= {"raw", "processed", "a2", "bobs-run"}
    found = deep("raw", t_data)
    assert not any(uids[1] in key for key in found) and any(uids[0] in key for key in found), found
    assert "a2" not in found and uids[0] in found, found


def test_untagged_columns_are_reached_only_through_tagged_ancestors(tiled_server, runs, uids, bob_token, t_data):
    """A table's columns carry no tags of their own (the policy grants read on untagged nodes);
    the ancestors' tag filters keep other visits' and other runs' columns out of reach."""
    column = "array/full/raw/a1/{}/primary/internal/motor"
    assert tiled_server.get(column.format(uids[0]), t_data).status_code == 200
    assert tiled_server.get(column.format(uids[1]), t_data).status_code == 404
    assert tiled_server.get(column.format(uids[0]), bob_token).status_code in (403, 404)


def test_the_key_is_not_checked_only_the_tags(tiled_server, uids, t_data, tag_sync):
    """What a tag-only policy cannot express: a run-scoped writer may create a node under *any*
    key of its visit's processed store, as long as it carries its own run's tags (the
    plug-in policy refuses any key but the run's).  It cannot read or write another run."""
    r = tagged(tiled_server, "processed/a1", t_data, "not-my-run", run_tags("processed", "a1", uids[0]), tag_sync)
    assert r.status_code == 200, r.text


def test_opa_down_is_a_500_not_a_refusal(tiled_server, tiled_opa, uids, alice_auth):
    """ExternalPolicyDecisionPoint calls OPA per decision and does not catch transport errors."""
    route = f"metadata/raw/a1/{uids[0]}"
    assert tiled_server.get(route, alice_auth.token()).status_code == 200
    tiled_opa.down()
    try:
        assert tiled_server.get(route, alice_auth.token()).status_code == 500
    finally:
        tiled_opa.up()
    assert tiled_server.get(route, alice_auth.token()).status_code == 200
