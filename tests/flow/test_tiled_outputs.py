"""The ``current`` pointer of processed results, against a real Tiled server.

Live and post of one run are separate flow runs with separate Tiled clients; they often
finish within a second of each other.  Whatever the order, a complete post result must
end up as ``current``.  (CI once caught live overwriting a finished post: the live sink
read the pointer from its client's cached metadata.)
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from visitflow.core.tiled_client import BearerAuth, processed_client
from visitflow.flow.sink import TiledResultSink, read_result


@pytest.fixture
def run_container(tiled_server, idp):
    """A fresh processed/a1/<run> container; each call of the factory is a separate client."""
    run = f"sink-{uuid.uuid4().hex[:8]}"
    auth = BearerAuth(lambda: idp.token("alice"))

    def fresh():
        return processed_client(tiled_server.uri, auth, visit="a1", run=run)

    return fresh


def pointer(run_container):
    node = run_container()["demo"]
    return node.metadata["current"], node


def sinks(run_container, post_id="0123456789abcdef"):
    live = TiledResultSink(run_container(), "demo", "live", {"flow": "demo"})
    post = TiledResultSink(run_container(), "demo", "post", {"flow": "demo"}, flow_run_id=post_id)
    return live, post


def test_live_alone_points_at_live(run_container):
    live, _ = sinks(run_container)
    live.write({"avg": np.ones(3)}, frames=1, status="running")
    assert pointer(run_container)[0] == "live"
    live.write({"avg": np.full(3, 2.0), "n": 2}, frames=2, status="complete")
    current, node = pointer(run_container)
    assert current == "live"
    assert node.metadata["status"] == "complete" and node.metadata["frames_processed"] == 2
    np.testing.assert_array_equal(read_result(node)["avg"], [2.0, 2.0, 2.0])


def test_live_finishing_after_post_leaves_post_current(run_container):
    live, post = sinks(run_container)
    live.write({"avg": np.ones(3)}, frames=1, status="running")      # live's client now caches current=live
    post.write({"avg": np.full(3, 5.0)}, frames=2, status="complete")
    assert pointer(run_container)[0] == "post-01234567"
    live.write({"avg": np.full(3, 5.0)}, frames=2, status="complete")
    current, node = pointer(run_container)
    assert current == "post-01234567", "a complete post result outranks live, whichever finishes last"
    assert node["live"].metadata["status"] == "complete"              # live's own result is still kept
    np.testing.assert_array_equal(read_result(node)["avg"], [5.0, 5.0, 5.0])


def test_live_pointer_write_racing_post_hands_the_pointer_back(run_container, monkeypatch):
    """The interleaving that a stale-cache fix alone does not cover: post has marked its
    result complete but not yet moved the pointer when live reads it; live then writes."""
    live, post = sinks(run_container)
    live.write({"avg": np.ones(3)}, frames=1, status="running")
    real_point = post._point_current
    monkeypatch.setattr(post, "_point_current", lambda final, meta: None)  # freeze post between the two steps
    post.write({"avg": np.full(3, 7.0)}, frames=2, status="complete")
    assert pointer(run_container)[0] == "live"
    live.write({"avg": np.full(3, 7.0)}, frames=2, status="complete")
    current, node = pointer(run_container)
    assert current == "post-01234567"
    assert node.metadata["status"] == "complete" and node.metadata["variant"] == "post"
    real_point(True, {"status": "complete", "frames_processed": 2})   # post resumes: still post
    assert pointer(run_container)[0] == "post-01234567"


def test_failed_post_does_not_take_the_pointer(run_container):
    live, post = sinks(run_container)
    live.write({"avg": np.ones(3)}, frames=3, status="complete")
    post.fail("boom")
    live.write({"avg": np.ones(3)}, frames=3, status="complete")      # e.g. a retried live attempt
    current, node = pointer(run_container)
    assert current == "live"
    assert node["post-01234567"].metadata["status"] == "failed"
