"""OPA's bundle server over HTTPS: a static file server for the bundle directory (ConfigMap
``visitflow-opa-bundle`` mounted read-only), TLS with the site's ``kubernetes.io/tls`` Secret.

Why not ``python3 -m http.server``: the images' Python is 3.11, whose http.server has no TLS
(``--tls-cert`` came in 3.14), and OPA fetching its policy and session data in clear would let
anyone on the Pod network change who may analyse what.  This is the standard library's
``SimpleHTTPRequestHandler`` (GET/HEAD of files, nothing else) on a threading server whose
accepted sockets are wrapped with TLS in the handler's thread, so a client that connects and
never finishes the handshake (or talks plain HTTP) costs one thread for ``--handshake-timeout``
seconds and never blocks ``accept``.

    python -m visitflow.production.bundle_server --directory /srv --port 8080 \\
        --ssl-certfile /etc/visitflow-tls/tls.crt --ssl-keyfile /etc/visitflow-tls/tls.key
"""

from __future__ import annotations

import argparse
import functools
import http.server
import signal
import socket
import ssl
import sys

from ..core.tls import add_tls_arguments, scheme, server_context, tls_files

__all__ = ["TLSFileServer", "make_server", "main"]


class TLSFileServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer whose connections are TLS, handshaken in their own thread."""

    daemon_threads = True

    def __init__(self, address, handler, context: ssl.SSLContext | None, handshake_timeout: float = 10.0):
        self.context, self.handshake_timeout = context, handshake_timeout
        super().__init__(address, handler)

    def finish_request(self, request: socket.socket, client_address) -> None:
        if self.context is not None:
            request.settimeout(self.handshake_timeout)
            try:
                request = self.context.wrap_socket(request, server_side=True)   # handshake here, per thread
            except (ssl.SSLError, OSError) as exc:
                sys.stderr.write(f"bundle server: TLS handshake with {client_address[0]} failed: {exc}\n")
                return
            request.settimeout(None)
        super().finish_request(request, client_address)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    """Files only; one log line per request to stderr (as http.server does)."""

    def log_message(self, fmt, *args):
        sys.stderr.write("bundle server: %s %s\n" % (self.address_string(), fmt % args))


def make_server(directory: str, host: str, port: int, tls: dict[str, str],
                handshake_timeout: float = 10.0) -> TLSFileServer:
    """The server for ``directory`` on ``host:port``; plain HTTP when ``tls`` is empty."""
    context = server_context(tls["ssl_certfile"], tls["ssl_keyfile"]) if tls else None
    handler = functools.partial(_Quiet, directory=directory)
    return TLSFileServer((host, port), handler, context, handshake_timeout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m visitflow.production.bundle_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--directory", required=True, help="the directory served (read-only is fine)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS")
    add_tls_arguments(p)
    args = p.parse_args(argv)
    tls = tls_files(args.ssl_certfile, args.ssl_keyfile)
    server = make_server(args.directory, args.host, args.port, tls, args.handshake_timeout)
    # PID 1 in a container ignores SIGTERM without a handler: exit at once on the kubelet's stop
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"bundle server: {args.directory} on {scheme(tls)}://{args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
