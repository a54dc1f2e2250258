"""Internal: visitflow's plug-ins, which run inside Tiled's server process only.

A request's path through them::

    AuthGate (server.py, ASGI middleware: header size, one credential per request, token re-check)
      → Tiled decodes the request
      → VisitflowAuthenticator (authenticator.py: JWT → principal + scopes; facility_users.py)
      → principals (principals.py: Tiled's principal store, without a database round trip per call)
      → VisitflowAccessPolicy (access_policy.py: node tags (node_tags.py), file roots
        (file_roots.py) and the authority decide; request_context.py carries the request)

``config.py`` renders the server's config and ``cli.py`` runs it.  Every Tiled-internal
name these modules use is in one place (``tiled_compat``).  The flow-run side of Tiled
(source, push, sink) is ``visitflow.flow``; the HTTP client is ``visitflow.core``.  No
stability promise.
"""

__all__ = []
