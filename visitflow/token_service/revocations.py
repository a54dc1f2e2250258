"""Revocations that survive a restart of the token service.

A revoked grant must stay revoked: otherwise restarting the token service would resurrect
every grant revoked before it (grants live 24 h, in Prefect Secrets).  Revoked token ids
(``jti``) and sessions (``sid``, which covers every token and refresh token of a session)
are appended to a JSON-lines file with their expiry, fsynced before the revocation is
acknowledged, and loaded at start; expired entries are dropped then (the token would be
refused for its ``exp`` anyway), so the file stays as small as the live revocations.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Optional

__all__ = ['RevocationLog']


class RevocationLog:
    """``append`` then ``load``; ``path=None`` keeps nothing (the dev server's default)."""

    def __init__(self, path: Optional[str | Path]):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()

    def load(self) -> tuple[dict, dict]:
        """(revoked jti → exp, revoked sid → exp), unexpired only; compacts the file."""
        jtis: dict = {}
        sids: dict = {}
        if self.path is None or not self.path.exists():
            return jtis, sids
        now = time.time()
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
                kind, ident, exp = entry["kind"], str(entry["id"]), float(entry["exp"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a crash: the rest still counts
            if exp > now:
                (jtis if kind == "jti" else sids)[ident] = exp
        self._rewrite(jtis, sids)
        return jtis, sids

    def append(self, kind: str, ident: str, exp: float) -> None:
        if self.path is None:
            return
        line = json.dumps({"kind": kind, "id": ident, "exp": exp, "at": time.time()}) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())

    def _rewrite(self, jtis: dict, sids: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for kind, entries in (("jti", jtis), ("sid", sids)):
                for ident, exp in entries.items():
                    f.write(json.dumps({"kind": kind, "id": ident, "exp": exp}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
