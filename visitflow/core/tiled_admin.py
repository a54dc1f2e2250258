"""The admin step: create store roots and visit containers before anyone writes.

Only the admin may create these (docs/architecture.md §5), so the first writer of a visit
cannot choose its shape or metadata.  The admin authenticates like everyone else — a JWT from the
IdP, ``client_credentials`` of the service account ``visitflow-admin`` whose only scope is
``visitflow:admin`` — rather than with a Tiled API key: one credential system, tokens that
expire, and revocation/rotation at the IdP instead of a long-lived secret in Tiled's
database.
"""

from __future__ import annotations

from typing import Iterable, Optional

import httpx

from .layout import Layout, PathTemplate
from .scopes import ADMIN_SCOPE, check_name
from .tiled_client import BearerAuth, ClientCredentials, connect, node_uri

__all__ = ['admin_auth', 'ensure_visits']


def admin_auth(issuer: str, client_id: str = "visitflow-admin", client_secret: str = "",
               scope: str = ADMIN_SCOPE) -> BearerAuth:
    return BearerAuth(ClientCredentials(issuer, client_id, client_secret, scope))


def _ensure_path(root, segments: list[str], metadata_for) -> list[str]:
    """Create each missing container along ``segments``; returns the paths created."""
    created, node, walked = [], root, []
    for seg in segments:
        walked.append(seg)
        if seg in node:
            node = node[seg]
            continue
        try:
            node = node.create_container(key=seg, metadata=metadata_for(walked))
            created.append("/".join(walked))
        except Exception:
            if seg not in node:  # not a lost race with another admin
                raise
            node = node[seg]
    return created


def _visit_prefix(template: PathTemplate, visit: str, extra: dict) -> list[str]:
    return template.prefix(**extra, visit=check_name(visit, "visit")).split("/")


def ensure_visits(uri: str, auth: httpx.Auth, visits: Iterable[str], *, layout: Optional[Layout] = None,
                  extra: Optional[dict] = None) -> list[str]:
    """Make sure every store root and ``<store>/<visit>`` container exists (idempotent).

    ``extra`` fills other template placeholders before ``{visit}`` (e.g. instrument,
    proposal for blueapi's layout).  Returns the node paths that were created.
    """
    layout = layout or Layout()
    root = connect(node_uri(uri), auth)
    created: list[str] = []
    for visit in visits:
        for template in layout.templates():
            segments = _visit_prefix(template, visit, extra or {})

            def metadata_for(walked, template=template):
                if len(walked) == len(segments):
                    return {"visitflow": {"store": template.store, "visit": visit}}
                return {"visitflow": {"store": template.store}}

            created += _ensure_path(root, segments, metadata_for)
    return created
