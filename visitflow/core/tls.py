"""Server-side TLS for visitflow's own servers (``visitflow idp``, ``visitflow tiled serve``, the
OPA bundle server): one pair of flags, ``--ssl-certfile``/``--ssl-keyfile``, named as uvicorn
names them, and one check of the pair before the server starts.

Why a check of our own: uvicorn loads the files only when it binds, and a wrong path, a key
that does not match the certificate or a PEM that is not one ends there as a traceback from
deep inside ``ssl``; a site mounting the wrong Secret key should read which file and why, in
one line, and the Pod should exit (CrashLoopBackOff with that line) rather than serve plain.
In Kubernetes the pair is the ``tls.crt``/``tls.key`` of a ``kubernetes.io/tls`` Secret
(cert-manager's shape; docs/deploy.md step 3).
"""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

__all__ = ["add_tls_arguments", "tls_files", "server_context", "scheme"]


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ssl-certfile", default=None, metavar="PEM",
                        help="serve HTTPS with this certificate (chain) file, e.g. a kubernetes.io/tls "
                             "Secret's tls.crt; needs --ssl-keyfile")
    parser.add_argument("--ssl-keyfile", default=None, metavar="PEM",
                        help="the certificate's private key, e.g. the Secret's tls.key")


def tls_files(certfile: str | None, keyfile: str | None) -> dict[str, str]:
    """uvicorn's ``ssl_certfile``/``ssl_keyfile`` for the pair, or ``{}`` for none (plain HTTP).

    Raises SystemExit naming the file when only one is given, a file is missing, or the pair
    does not load (not PEM, the key not the certificate's)."""
    if not certfile and not keyfile:
        return {}
    if not certfile or not keyfile:
        raise SystemExit("--ssl-certfile and --ssl-keyfile go together (a certificate and its key)")
    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if not Path(path).is_file():
            raise SystemExit(f"{flag} {path}: no such file")
    server_context(certfile, keyfile)
    return {"ssl_certfile": str(certfile), "ssl_keyfile": str(keyfile)}


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server context for the pair (TLS 1.2+), or SystemExit saying why it does not load."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, ValueError, OSError) as exc:
        raise SystemExit(f"TLS certificate {certfile} with key {keyfile} does not load: {exc}") from None
    return ctx


def scheme(tls: dict) -> str:
    """``https`` when :func:`tls_files` gave a pair, else ``http`` (for default URLs)."""
    return "https" if tls else "http"
