"""The tag on a node decides, not its path: real Tiled, a real TiledWriter run, and the run's
tags changed in the catalog database behind Tiled's back (as no client can: init_node sets
them and modify_node keeps them), so that path and tag disagree.

* a run token for the run the *path* names is refused, and its listing does not show it;
* a run token for the run the *tag* names reads it, and its listing shows it;
* a run token for the run reads nothing once the run's nodes carry another session's tag
  (the visit container still says a1: only the tag of the node itself was changed).
"""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest

from tests.fixtures.scans import run_scan

DECOY = "decoy-run"


def retag(catalog, old: str, new: str) -> int:
    """Move every node tagged ``old`` to tag ``new`` (creating its row); returns how many."""
    with closing(sqlite3.connect(catalog, timeout=30)) as db, db:
        db.execute("INSERT OR IGNORE INTO access_tags (name, is_public, time_created, time_updated) "
                   "VALUES (?, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)", (new,))
        (old_id,), (new_id,) = (db.execute("SELECT id FROM access_tags WHERE name = ?", (n,)).fetchone()
                                for n in (old, new))
        return db.execute("UPDATE node_access_tags_association SET tag_id = ? WHERE tag_id = ?",
                          (new_id, old_id)).rowcount


@pytest.fixture(scope="module")
def retagged(tiled_server, idp):
    uid = run_scan(tiled_server.uri, idp.token("alice"), num=2, seed=11)
    catalog = tiled_server.state_dir / "catalog.sqlite"
    assert catalog.exists(), list(tiled_server.state_dir.iterdir())
    return uid, catalog


def data_token(idp, visit, run):
    return idp.delegate(idp.token("alice" if visit == "a1" else "bob"), visit, run)[1]


def test_path_says_one_run_tag_says_another(tiled_server, idp, retagged):
    t = tiled_server
    uid, catalog = retagged
    own, decoy = data_token(idp, "a1", uid), data_token(idp, "a1", DECOY)
    path = f"metadata/raw/a1/{uid}/primary"
    assert t.get(path, own).status_code == 200 and t.keys("raw/a1", own) == [uid]
    assert t.get(path, decoy).status_code in (403, 404) and t.keys("raw/a1", decoy) == []
    moved = retag(catalog, f"visitflow:raw:a1/{uid}", f"visitflow:raw:a1/{DECOY}")
    try:
        assert moved >= 3, "the run, its stream and the stream's nodes all carry the run's tag"
        r = t.get(path, own)
        assert r.status_code in (403, 404), ("the path names this token's run; the tag does not", r.text)
        assert uid not in t.keys("raw/a1", own)
        assert t.get(path, decoy).status_code == 200, "the tag names the decoy's run"
        assert t.keys("raw/a1", decoy) == [uid]
        assert t.get(path, idp.token("alice")).status_code == 200, "visit-wide: still her session"
    finally:
        retag(catalog, f"visitflow:raw:a1/{DECOY}", f"visitflow:raw:a1/{uid}")
    assert t.get(path, own).status_code == 200


def test_a_run_tagged_with_another_session_is_not_read_by_this_sessions_tokens(tiled_server, idp, retagged):
    t = tiled_server
    uid, catalog = retagged
    own = data_token(idp, "a1", uid)
    path = f"metadata/raw/a1/{uid}"
    retag(catalog, f"visitflow:raw:a1/{uid}", f"visitflow:raw:a2/{uid}")
    try:
        assert t.get(path, own).status_code in (403, 404)
        assert t.get(path, idp.token("alice")).status_code in (403, 404), "Alice is not in a2"
        assert uid not in t.keys("raw/a1", own)
    finally:
        retag(catalog, f"visitflow:raw:a2/{uid}", f"visitflow:raw:a1/{uid}")
    assert t.get(path, own).status_code == 200
