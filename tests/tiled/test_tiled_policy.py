"""Pure logic of the Tiled plugins (no server): scope derivation, the policy's per-path
decisions for the default and blueapi-style layouts, and the create-key middleware.
Everything here is also exercised against the real server in test_tiled_access.py."""

from __future__ import annotations

import json

import pytest

from visitflow.core.scopes import ScopeSet
from visitflow.tiled.access_policy import VisitflowAccessPolicy
from visitflow.tiled.authenticator import ADMIN_TILED_SCOPES, carried_scopes, derive_tiled_scopes
from visitflow.tiled.request_context import RequestContextMiddleware, RequestInfo, parse_target

ALICE = ScopeSet.parse("read:data:a1 write:data:a1 run:saxs_average:a1")
T_DATA = ScopeSet.parse("read:raw:a1/u1 write:processed:a1/u1")
BOB = ScopeSet.parse("read:data:a2 write:data:a2")


def create(path, key):
    return RequestInfo("POST", "metadata", tuple(path), key)


def test_derived_tiled_scopes():
    assert derive_tiled_scopes(ScopeSet.parse("read:raw:a1/u1")) == {"read:metadata", "read:data"}
    assert derive_tiled_scopes(ScopeSet.parse("write:raw:a1/u1")) == {
        "read:metadata", "read:data", "write:metadata", "write:data", "create:node"}
    assert derive_tiled_scopes(T_DATA) == {"read:metadata", "read:data", "write:metadata", "write:data",
                                           "create:node", "delete:node", "delete:revision"}
    assert "register" in derive_tiled_scopes(T_DATA, grant_register=True)
    assert derive_tiled_scopes(ScopeSet.parse("visitflow:admin")) == set(ADMIN_TILED_SCOPES)
    # Tiled's own scope names in a token grant nothing; run scopes grant no data access.
    assert derive_tiled_scopes(ScopeSet.parse("read:data read:metadata create:node run:*:a1 openid")) == set()
    assert carried_scopes(ScopeSet.parse("read:data:a1 openid read:metadata visitflow:admin")) == {
        "read:data:a1", "visitflow:admin"}


@pytest.fixture
def policy():
    return VisitflowAccessPolicy()


def test_default_layout_reads(policy):
    at = lambda path, scopes, req=None: policy.scopes_at(tuple(path.split("/")) if path else (), scopes, req)  # noqa: E731
    assert at("", BOB) == {"read:metadata"}
    assert at("raw", BOB) == {"read:metadata"}
    assert at("raw/a1", BOB) == set()
    assert "read:data" in at("raw/a1/u1/primary/saxs", ALICE)
    assert at("raw/a1/u1", T_DATA) == {"read:metadata", "read:data"}
    assert at("raw/a1/u2", T_DATA) == set()
    assert at("raw/a1", T_DATA) == {"read:metadata"}               # traverse, not list all
    assert {"write:data", "delete:node"} <= at("processed/a1/u1/saxs_average/average", T_DATA)
    assert "delete:node" not in at("raw/a1/u1/primary", ALICE)    # raw is never deleted
    assert at("processed/a1/u2", T_DATA) == set()
    assert at("elsewhere/x", ALICE) == set()                       # not placed by the layout
    assert at("raw/a1/bad name", ALICE) == set()


def test_creating_runs_depends_on_the_key(policy):
    req = lambda key: create(("processed", "a1"), key)  # noqa: E731
    assert "create:node" in policy.scopes_at(("processed", "a1"), T_DATA, req("u1"))
    assert "create:node" not in policy.scopes_at(("processed", "a1"), T_DATA, req("u2"))
    assert "create:node" not in policy.scopes_at(("processed", "a1"), T_DATA, req(None))
    assert "create:node" in policy.scopes_at(("processed", "a1"), ALICE, req(None))
    assert "create:node" not in policy.scopes_at(("raw", "a1"), T_DATA, create(("raw", "a1"), "u1"))
    # editing the visit container itself (not a create) is admin-only
    patch = RequestInfo("PATCH", "metadata", ("raw", "a1"))
    assert not {"write:metadata", "create:node"} & policy.scopes_at(("raw", "a1"), ALICE, patch)
    # without the middleware: only visit-wide writers may create
    assert "create:node" in policy.scopes_at(("raw", "a1"), ALICE, None)
    assert "create:node" not in policy.scopes_at(("processed", "a1"), T_DATA, None)
    # store roots: nobody but admin
    assert "create:node" not in policy.scopes_at(("raw",), ALICE, create(("raw",), "a1"))


def test_visible_children_default_layout(policy):
    assert policy.visible_children((), BOB) == (False, {"raw", "processed"})
    assert policy.visible_children(("raw",), BOB) == (False, {"a2"})
    assert policy.visible_children(("raw", "a1"), T_DATA) == (False, {"u1"})
    assert policy.visible_children(("raw", "a1"), ALICE) == (True, None)
    assert policy.visible_children(("raw", "a1"), BOB) == (False, set())
    assert policy.visible_children(("raw", "a1", "u1"), T_DATA) == (True, None)


def test_blueapi_style_layout():
    policy = VisitflowAccessPolicy("{instrument}/{proposal}/{visit}/{run}", None)
    # above the visit, any instrument/proposal is listed (they are not visits)...
    assert policy.visible_children((), BOB) == (False, None)
    assert policy.scopes_at(("i22",), BOB, None) == {"read:metadata"}
    # ...but below, the visit decides
    assert policy.visible_children(("i22", "p1"), BOB) == (False, {"a2"})
    assert policy.scopes_at(("i22", "p1", "a1", "u1"), ALICE, None) >= {"read:data", "write:data"}
    assert policy.scopes_at(("i22", "p1", "a1", "u1"), BOB, None) == set()
    assert policy.scopes_at(("i22", "p1", "a1", "u1"), T_DATA, None) == {"read:metadata", "read:data"}


def test_parse_target():
    assert parse_target("post", "/api/v1/metadata/raw/a1") == RequestInfo("POST", "metadata", ("raw", "a1"))
    assert parse_target("GET", "/api/v1/array/full/raw/a1/u1/x").route == "array"
    assert parse_target("GET", "/healthz") is None


@pytest.mark.parametrize("body,content_type,key", [
    (json.dumps({"id": "u1", "metadata": {}}).encode(), "application/json", "u1"),
    (json.dumps({"metadata": {}}).encode(), "application/json", None),
    (b"not json", "application/json", None),
])
def test_middleware_reads_the_key_and_replays_the_body(body, content_type, key):
    import asyncio

    seen = {}

    async def app(scope, receive, send):
        from visitflow.tiled.request_context import REQUEST

        seen["info"] = REQUEST.get()
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        seen["body"] = b"".join(chunks)

    half = len(body) // 2
    messages = [{"type": "http.request", "body": body[:half], "more_body": True},
                {"type": "http.request", "body": body[half:], "more_body": False}]

    async def receive():
        return messages.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/api/v1/metadata/processed/a1",
             "headers": [(b"content-type", content_type.encode())]}
    asyncio.run(RequestContextMiddleware(app)(scope, receive, None))
    assert seen["body"] == body
    assert seen["info"] == RequestInfo("POST", "metadata", ("processed", "a1"), key)


def test_register_scope_only_with_file_roots_and_the_middleware():
    import asyncio

    from visitflow.tiled.request_context import REQUEST

    plain = VisitflowAccessPolicy()
    files = VisitflowAccessPolicy(file_roots={"raw": "/data/{visit}"})
    register = RequestInfo("POST", "register", ("raw", "a1", "u1", "primary"), "saxs", ("file:///data/a1/x.h5",))
    run_node = ("raw", "a1", "u1", "primary")
    assert "register" not in plain.scopes_at(run_node, ALICE, register)
    assert "register" in files.scopes_at(run_node, ALICE, register)
    assert "register" not in files.scopes_at(run_node, ALICE, None)            # no middleware: no register
    assert "register" not in files.scopes_at(("processed", "a1", "u1", "x"), ALICE, register)
    assert "register" not in files.scopes_at(run_node, T_DATA, register)       # reads raw only
    assert files.registration_refusal(register) is None
    assert "outside" in files.registration_refusal(
        RequestInfo("POST", "register", run_node, "saxs", ("file:///data/a2/x.h5",)))
    assert "no external files" in plain.registration_refusal(register)
    assert "could not read" in files.registration_refusal(RequestInfo("PUT", "data_source", run_node + ("saxs",)))

    class Node:  # admin never reaches node_path
        pass

    admin = ["visitflow:admin"]
    assert "register" not in asyncio.run(files.allowed_scopes(Node(), object(), None, admin))  # no middleware
    token = REQUEST.set(RequestInfo("GET", "metadata", run_node))
    try:
        assert "register" in asyncio.run(files.allowed_scopes(Node(), object(), None, admin))
    finally:
        REQUEST.reset(token)


def test_the_nodes_tag_decides_not_its_path(policy):
    """A node at raw/a1/u1 whose tag says another place is governed by the tag."""
    u2 = ScopeSet.parse("read:raw:a1/u2")
    node = ("raw", "a1", "u1", "primary")
    assert policy.scopes_at(node, T_DATA, None) == {"read:metadata", "read:data"}  # untagged: the path
    assert policy.scopes_at(node, T_DATA, None, tags=["visitflow:raw:a1/u1"]) == {"read:metadata", "read:data"}
    assert policy.scopes_at(node, T_DATA, None, tags=["visitflow:raw:a1/u2"]) == set()
    assert policy.scopes_at(node, u2, None, tags=["visitflow:raw:a1/u2"]) == {"read:metadata", "read:data"}
    assert policy.scopes_at(node, ALICE, None, tags=["visitflow:raw:a2/u1"]) == set(), "tag says Bob's session"
    assert policy.scopes_at(node, BOB, None, tags=["visitflow:raw:a2/u1"]) >= {"read:data", "write:data"}
    # a visit container's place comes from its tag too
    reader_a2 = ScopeSet.parse("read:raw:a2")
    assert policy.scopes_at(("raw", "a1"), reader_a2, None, tags=["visitflow:raw:a2"]) == {"read:metadata", "read:data"}
    assert policy.scopes_at(("raw", "a1"), ALICE, None, tags=["visitflow:raw:a2"]) == set()
    # a visitflow: tag that is not a place: nothing, never the path's answer
    assert policy.scopes_at(node, ALICE, None, tags=["visitflow:raw:../a1"]) == set()
    # other tags (e.g. blueapi's access_tags) do not place a node: the path does
    assert policy.scopes_at(node, T_DATA, None, tags=["public"]) == {"read:metadata", "read:data"}


def test_visit_listing_filters_by_run_tags(policy):
    """(filters() wraps these in Tiled's AccessTagsFilter; test_tiled_node_tags.py: on a server.)"""
    from visitflow.tiled.access_policy import Place

    visit = policy.place_of(("raw", "a1"), ["visitflow:raw:a1"])
    assert visit == Place(("raw", "a1"), visit.locations, True)
    assert policy.visible_tags(visit, T_DATA) == ["visitflow:raw:a1/u1"]
    assert policy.visible_tags(visit, ScopeSet.parse("read:raw:a1/u1 write:raw:a1/u3")) == [
        "visitflow:raw:a1/u1", "visitflow:raw:a1/u3"]
    assert policy.visible_tags(visit, ALICE) is None, "visit-wide: every child"
    assert policy.visible_tags(visit, BOB) == []
    run = policy.place_of(("raw", "a1", "u1"), ["visitflow:raw:a1/u1"])
    assert policy.visible_tags(run, T_DATA) is None
