"""Internal: the light core, importable in every process (blueapi's environment included).

Only the standard library, httpx, pyjwt, pydantic and jsonschema at import time, and only
``visitflow.core`` and ``visitflow.errors`` of visitflow (``tests/test_code_shape.py``):
this folder, ``trigger/`` and ``errors.py`` are exactly what the light ``visitflow-trigger``
distribution ships.  It owns the scope grammar (:mod:`.scopes`), node paths
(:mod:`.layout`), token validation (:mod:`.tokens`), the OAuth client (:mod:`.oauth`), the
names of flows, deployments, grants and idempotency keys (:mod:`.names`), analysis options
(:mod:`.options`), output checks (:mod:`.outputs`), the Prefect REST client
(:mod:`.prefect_api`), the authority (:mod:`.authority`) and the Tiled HTTP client and
admin step (:mod:`.tiled_client`, :mod:`.tiled_admin`).  No stability promise: the public
API is listed in ``visitflow/__init__.py``.
"""

__all__ = []
