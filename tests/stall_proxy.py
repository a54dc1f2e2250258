"""A loopback HTTP forwarder in front of the dev IdP that can stall chosen paths: "the IdP's
introspection endpoint hangs for 5 s" while everything else (token minting) still answers."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


class StallProxy:
    def __init__(self, target: str):
        self.target = target.rstrip("/")
        self.stall: dict[str, float] = {}     # path -> seconds to hold each request
        self.stalled: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                path = self.path.split("?")[0]
                if path in proxy.stall:
                    proxy.stalled.append(path)
                    time.sleep(proxy.stall[path])
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                r = httpx.request(self.command, proxy.target + self.path, headers=headers, content=body, timeout=30)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self):
        self._server.shutdown()
        self._server.server_close()
