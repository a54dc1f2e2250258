"""Every route visitflow's Tiled serves is covered by the access policy, allow-listed with a
reason, or closed (issue 20, finding 2).

The enumeration builds the real app (``visitflow.tiled.server.build_app`` on the config
``visitflow tiled serve`` renders, against the session's IdP) and walks every route its router
matches.  A route is *covered* when its endpoint looks the node up through Tiled's
``get_entry``, which asks the access policy; anything else must be on :data:`ALLOWED` below
with why it is safe.  A new Tiled release that mounts a new API fails this test until someone
has read it.  The negative tests replay the GraphQL tricks from the issue against the
session's real server: they now get a 404 that says why.
"""

from __future__ import annotations

import inspect

import httpx
import pytest

from visitflow.tiled.config import prepare_state_dir, render_config
from visitflow.tiled.routes import CLOSED_PREFIXES, closed_reason, served_routes
from visitflow.tiled.server import build_app

from tests.fixtures.scans import run_scan

pytestmark = pytest.mark.security

NO_TOKEN_DERIVES = "needs a Tiled scope no visitflow token derives (see test_principal_and_apikey_routes_refuse_admin)"

#: Routes that do not go through the access policy, and why each is safe (path -> reason).
ALLOWED = {
    "/openapi.json": "API description, no data",
    "/docs": "Swagger UI page, no data",
    "/docs/oauth2-redirect": "Swagger UI page, no data",
    "/redoc": "ReDoc page, no data",
    "/healthz": "liveness, no data",
    "/favicon.ico": "static",
    "/ui/{path:path}": "Tiled's web UI (static files); it reads data through the covered API",
    "/static": "static files of the UI",
    "/": "landing page",
    "/tiled-ui-settings": "UI settings (static)",
    "/api/v1/": "about document: server version, formats, auth providers; no data",
    "/api/v1/auth/provider/visitflow/authorize": "login redirect; VisitflowAuthenticator.authenticate mints nothing",
    "/api/v1/auth/provider/visitflow/token": "login; VisitflowAuthenticator.authenticate mints nothing",
    "/api/v1/auth/provider/visitflow/code": "device-flow login; mints nothing without authenticate",
    "/api/v1/auth/provider/visitflow/device_code": "device-flow login; mints nothing without authenticate",
    "/api/v1/auth/session/refresh": "Tiled sessions, which this server never creates",
    "/api/v1/auth/session/revoke": "Tiled sessions, which this server never creates",
    "/api/v1/auth/session/revoke/{session_id}": "Tiled sessions, which this server never creates",
    "/api/v1/auth/whoami": "the caller's own identity",
    "/api/v1/auth/logout": "logout",
    # The next four need Tiled scopes (create:apikeys, read:/write:principals, admin:apikeys)
    # that derive_tiled_scopes gives to no token, admin included: refused for everyone.
    "/api/v1/auth/apikey": NO_TOKEN_DERIVES,
    "/api/v1/auth/principal": NO_TOKEN_DERIVES,
    "/api/v1/auth/principal/{uuid}": NO_TOKEN_DERIVES,
    "/api/v1/auth/principal/{uuid}/apikey": NO_TOKEN_DERIVES,
    "/api/v1/metrics": "Prometheus metrics; Tiled's 'metrics' scope, which only visitflow:admin derives",
}


def _find_fastapi(app):
    from fastapi import FastAPI

    while not isinstance(app, FastAPI):
        app = app.app
    return app


def _sources(fn):
    """The endpoint's source and that of functions it closes over (Tiled wraps some endpoints
    in a signature-patching closure without ``__wrapped__``)."""
    for f in [fn, getattr(fn, "__wrapped__", None),
              *[c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]]:
        if callable(f) and inspect.isfunction(f):
            try:
                yield inspect.getsource(f)
            except (OSError, TypeError):
                continue


def _covered(route) -> bool:
    """The endpoint looks its node up with Tiled's get_entry, which asks the access policy."""
    return route.endpoint is not None and any("get_entry(" in src for src in _sources(route.endpoint))


@pytest.fixture(scope="module")
def app(idp, tmp_path_factory):
    state = prepare_state_dir(tmp_path_factory.mktemp("tiled-routes") / "state")
    return _find_fastapi(build_app(render_config(issuer=idp.issuer, state_dir=state)))


def test_every_route_is_covered_allowed_or_closed(app):
    routes = served_routes(app)
    assert len(routes) > 30, routes               # really the whole app, flattened
    unreviewed = sorted({(r.kind, r.path) for r in routes
                         if not _covered(r) and r.path not in ALLOWED and not closed_reason(r.path)})
    assert not unreviewed, f"routes neither covered by the access policy nor allow-listed: {unreviewed}"
    covered = {r.path for r in routes if _covered(r)}
    assert {"/api/v1/metadata/{path:path}", "/api/v1/array/full/{path:path}",
            "/api/v1/stream/single/{path:path}"} <= covered, covered
    stale = sorted(set(ALLOWED) - {r.path for r in routes})
    assert not stale, f"allow-list names routes the app no longer serves: {stale}"


def test_graphql_routes_are_not_served(app):
    served = [r.path for r in served_routes(app) if closed_reason(r.path)]
    assert not served, served
    assert "/api/graphql" in CLOSED_PREFIXES


ENTITY_PROBE = """mutation { createEntity(input: {entityType: "x", name: "probe",
                   nodePathParts: ["raw", "a1", "%s"]}) { id } }"""
NAMESPACE_ADD = 'mutation { upsertNamespace(prefix: "evil", uri: "http://evil/") { prefix } }'
NAMESPACE_DELETE = 'mutation { deleteNamespace(prefix: "evil") }'
LIST = "{ namespaces { prefix uri } entities { id name } }"


@pytest.mark.parametrize("trick", ["probe_other_visit_node", "namespace_add", "namespace_delete", "list",
                                   "ide_page", "trailing_slash"])
def test_graphql_tricks_from_the_issue_now_fail(idp, tiled_server, trick):
    alice = idp.token("alice")
    uid = run_scan(tiled_server.uri, alice, num=1) if trick == "probe_other_visit_node" else "x"
    bob = idp.token("bob")          # a user of visit a2, probing a1
    url = f"{tiled_server.uri}/api/graphql"
    query = {"probe_other_visit_node": ENTITY_PROBE % uid, "namespace_add": NAMESPACE_ADD,
             "namespace_delete": NAMESPACE_DELETE, "list": LIST}.get(trick)
    headers = {"Authorization": f"Bearer {bob}"}
    if trick == "ide_page":
        r = httpx.get(url, headers=headers, timeout=30)
    elif trick == "trailing_slash":
        r = httpx.post(url + "/", json={"query": LIST}, headers=headers, timeout=30)
    else:
        r = httpx.post(url, json={"query": query}, headers=headers, timeout=30)
    assert r.status_code == 404, (r.status_code, r.text)
    assert "GraphQL API is off" in r.json()["detail"], r.text
    # the admin is refused too: the API is off, not merely policed
    admin = httpx.post(url, json={"query": LIST}, timeout=30,
                       headers={"Authorization": f"Bearer {idp.client_token('visitflow-admin')}"}) \
        if trick == "list" else None
    if admin is not None:
        assert admin.status_code == 404, admin.text


@pytest.mark.parametrize("method, path", [("POST", "auth/apikey"), ("GET", "auth/principal"),
                                          ("POST", "auth/principal")])
def test_principal_and_apikey_routes_refuse_admin(idp, tiled_server, method, path):
    """The allow-list's NO_TOKEN_DERIVES is true: even visitflow:admin gets a 401/403 there."""
    admin = idp.client_token("visitflow-admin")
    r = tiled_server.request(method, path, admin, json={"expires_in": 60, "scopes": ["read:metadata"]}
                             if path == "auth/apikey" else None)
    assert r.status_code in (401, 403), (r.status_code, r.text)
