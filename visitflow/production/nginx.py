"""What visitflow's two nginx load balancers share (the token service's replicas,
visitflow/production/token_lb.py, and Prefect's API servers, visitflow/production/ha_topology.py):
the process settings, writable temp paths under the state directory (nginx's compiled-in
defaults are not writable for an unprivileged run) and upstream lines that skip a dead
server for 2 s after one failure.  Their ``location`` blocks differ on purpose (retrying
POSTs is right for the token service and wrong for Prefect), so each keeps its own."""

from __future__ import annotations

from pathlib import Path

__all__ = ['http_preamble', 'upstream_servers']


def http_preamble(state: Path, error_log: Path, *, user_root: bool) -> str:
    """From ``worker_processes`` to the temp paths: everything up to the ``http`` block's own
    directives (the caller closes the block)."""
    user = "user root;\n" if user_root else ""
    return f"""worker_processes 1;
{user}pid {state}/nginx.pid;
error_log {error_log} warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {state}/nginx-tmp/body;
    proxy_temp_path {state}/nginx-tmp/proxy;
    fastcgi_temp_path {state}/nginx-tmp/fastcgi;
    uwsgi_temp_path {state}/nginx-tmp/uwsgi;
    scgi_temp_path {state}/nginx-tmp/scgi;
"""


def upstream_servers(upstreams: list[str]) -> str:
    """One ``server`` line per upstream: skipped for 2 s after one failed attempt."""
    return "\n".join(f"        server {u} max_fails=1 fail_timeout=2s;" for u in upstreams)
