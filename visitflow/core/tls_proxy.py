"""A TLS-terminating TCP forwarder: the sidecar that puts HTTPS in front of a server that
cannot serve it itself -- blueapi 1.21.1, whose REST config (``api``) has only ``url`` and
``cors`` and whose ``serve`` calls ``uvicorn.run(app, host, port)`` with no TLS arguments.

It accepts TLS on ``--listen`` with the site's ``kubernetes.io/tls`` Secret and forwards the
decrypted bytes, unchanged, to ``--upstream`` (blueapi bound to 127.0.0.1 in the same Pod, so
nothing outside the Pod reaches it in clear).  Bytes, not HTTP: blueapi's websockets and
streaming answers pass as they are.  Standard library only, so it runs from the blueapi
image itself (visitflow.core ships in the light visitflow-trigger distribution).  A client
that never finishes the handshake is dropped after ``--handshake-timeout``; an upstream that
does not accept within 10 s closes the client's connection (the client sees the failure at
once, never a hang).

    python -m visitflow.core.tls_proxy --listen 0.0.0.0:8000 --upstream 127.0.0.1:8001 \\
        --ssl-certfile /etc/visitflow-tls/tls.crt --ssl-keyfile /etc/visitflow-tls/tls.key
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import sys

from .tls import add_tls_arguments, server_context, tls_files

__all__ = ["serve", "main"]

CONNECT_TIMEOUT = 10.0


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"want HOST:PORT, got {text!r}")
    return host, int(port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then pass the half-close on where the transport can (plain TCP)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError, ssl.SSLError):
        pass


async def _handle(client_r, client_w, upstream: tuple[str, int]) -> None:
    try:
        up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*upstream), CONNECT_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as exc:
        print(f"tls proxy: upstream {upstream[0]}:{upstream[1]} unreachable: {exc!r}", file=sys.stderr, flush=True)
        client_w.close()
        return
    try:
        await asyncio.gather(_pipe(client_r, up_w), _pipe(up_r, client_w))
    finally:
        for w in (up_w, client_w):
            w.close()


async def serve(listen: tuple[str, int], upstream: tuple[str, int], context: ssl.SSLContext,
                handshake_timeout: float = 10.0, started: asyncio.Future | None = None) -> None:
    """Serve until cancelled; ``started`` (if given) gets the bound (host, port)."""
    server = await asyncio.start_server(lambda r, w: _handle(r, w, upstream), listen[0], listen[1],
                                        ssl=context, ssl_handshake_timeout=handshake_timeout)
    if started is not None:
        started.set_result(server.sockets[0].getsockname()[:2])
    async with server:
        await server.serve_forever()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m visitflow.core.tls_proxy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", type=_address, required=True, metavar="HOST:PORT")
    p.add_argument("--upstream", type=_address, required=True, metavar="HOST:PORT")
    p.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS")
    add_tls_arguments(p)
    args = p.parse_args(argv)
    tls = tls_files(args.ssl_certfile, args.ssl_keyfile)
    if not tls:
        raise SystemExit("tls proxy: --ssl-certfile and --ssl-keyfile are required (it exists to serve TLS)")
    context = server_context(tls["ssl_certfile"], tls["ssl_keyfile"])
    # PID 1 in a container ignores SIGTERM without a handler: exit at once on the kubelet's stop
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"tls proxy: https on {args.listen[0]}:{args.listen[1]} -> {args.upstream[0]}:{args.upstream[1]}",
          flush=True)
    try:
        asyncio.run(serve(args.listen, args.upstream, context, args.handshake_timeout))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
