"""nginx in front of the token service's replicas (docs/operations.md "Token service on
several replicas"): what a facility's load balancer must do so a replica lost in the middle
of a request costs the caller nothing.

* ``proxy_next_upstream error timeout http_502 http_503 non_idempotent``: a request whose
  replica died (connection refused or reset, no answer) or answered 503 (its database did not
  answer, or it is shutting down) is sent to the next replica.  ``/token`` is a POST, which
  nginx retries only with ``non_idempotent``: an exchange or client-credentials grant sent
  twice mints two tokens, which is harmless.  A *refresh* retried after the dead replica had
  already committed its redemption is seen as reuse by the next one and revokes that
  family; the client then exchanges its grant again (the flow's credentials do).
* ``max_fails=1 fail_timeout=2s``: a dead replica is skipped for 2 s after one failure, so a
  burst does not pay a failed connect per request.

The same settings as :func:`visitflow.production.ha_topology.nginx_config` (Prefect's API
servers) otherwise; that one must not retry POSTs (a flow-run state change is not
idempotent), hence a separate generator.
"""

from __future__ import annotations

import os
from pathlib import Path

from .nginx import http_preamble, upstream_servers

__all__ = ['nginx_config']


def nginx_config(state: Path, listen: str, upstreams: list[str]) -> str:
    """An nginx.conf (run with ``nginx -c FILE -p STATE -g 'daemon off;'``)."""
    return http_preamble(state, state / "nginx-error.log", user_root=os.geteuid() == 0) + f"""\
    upstream token_service {{
{upstream_servers(upstreams)}
        keepalive 16;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://token_service;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_connect_timeout 2s;
            proxy_read_timeout 30s;
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries 3;
        }}
    }}
}}
"""
