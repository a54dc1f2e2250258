"""A loopback TCP forwarder that can be switched off: "Prefect is down" without stopping it."""

from __future__ import annotations

import socket
import threading


class SwitchableProxy:
    def __init__(self, target_port: int, enabled: bool = False):
        self.target_port = target_port
        self.enabled = enabled
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = self._server.getsockname()[1]
        self.refused = 0
        self._closed = False
        self._open: set = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if not self.enabled:
                self.refused += 1
                client.close()  # the client sees the connection dropped: a transport error
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self._open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        """Switch off and drop the connections already open (keep-alive clients notice)."""
        self.enabled = False
        for s in list(self._open):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._open.clear()

    def close(self):
        self._closed = True
        self._server.close()
