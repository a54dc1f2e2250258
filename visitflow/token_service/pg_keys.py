"""Signing keys shared by the token service's replicas (``vf_signing_keys``, :mod:`.pg_state`).

A rotation must fail no validation anywhere — not at another replica, not at Tiled:

* a new key is **published ahead**: it is in every replica's JWKS ``key_publish_ahead``
  seconds before any replica signs with it (``signs_from``), which is longer than a replica's
  ``poll_seconds``, so no replica sees a token signed by a key it has not loaded;
  a replica that meets an unknown ``kid`` all the same reloads once before refusing;
* an old key **overlaps**: it stays in the JWKS ``key_overlap`` seconds after its successor
  started signing (at least the longest access-token lifetime; ``config.StateConfig``), and
  only :meth:`SharedKeyStore.rotate` removes keys older than that.

The interface is :class:`.keys.KeyStore`'s (``current``, ``jwks``, ``public_key``,
``reload_if_changed``, ``rotate``, ``retire``).
"""

from __future__ import annotations

import os
import threading
import time

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization

from .keys import SigningKey, new_rsa_key
from .pg_state import SIGNING_KEYS, PostgresState

__all__ = ['SharedKeyStore']


class SharedKeyStore:
    def __init__(self, db: PostgresState, *, poll_seconds: float = 1.0, publish_ahead: float = 5.0,
                 overlap: float = 90000.0):
        self.db = db
        self.poll_seconds, self.publish_ahead, self.overlap = poll_seconds, publish_ahead, overlap
        self._keys: list[tuple[float, SigningKey]] = []   # (signs_from, key), oldest first
        self._loaded = 0.0
        self._lock = threading.Lock()
        self._load()
        if not self._keys:
            self._first_key()

    def _first_key(self) -> None:
        """Make the first key, which signs at once (nothing to overlap with), unless one exists.

        Replicas starting together all find the table empty; under one advisory lock only the
        first makes a key and the others load it, so no replica starts with a JWKS the others
        lack (CI run of stop 25: each replica made its own first key and published only that).
        """
        now = time.time()
        key = SigningKey(f"vf-{int(now)}-{os.urandom(3).hex()}", new_rsa_key(), now)

        async def go():
            async with self.db._engine.begin() as conn:
                await conn.execute(sa.text("SELECT pg_advisory_xact_lock(4242002)"))
                if (await conn.execute(sa.select(sa.func.count()).select_from(SIGNING_KEYS))).scalar():
                    return
                await conn.execute(sa.insert(SIGNING_KEYS).values(
                    kid=key.kid, pem=key.private_pem().decode(), created=now, signs_from=now))

        self.db.run(go())
        self._load()

    def _load(self) -> None:
        rows = self.db.run(self.db._execute(sa.select(SIGNING_KEYS), fetch=True))
        known = {k.kid: (f, k) for f, k in self._keys}
        keys = []
        for row in rows:
            if row.kid in known:
                keys.append(known[row.kid])
            else:
                private = serialization.load_pem_private_key(row.pem.encode(), password=None)
                keys.append((row.signs_from, SigningKey(row.kid, private, row.created)))
        keys.sort(key=lambda fk: (fk[0], fk[1].kid))
        with self._lock:
            self._keys, self._loaded = keys, time.monotonic()

    def reload_if_changed(self) -> None:
        """Re-read the keys if the last read is ``poll_seconds`` old."""
        if time.monotonic() - self._loaded >= self.poll_seconds:
            self._load()

    @property
    def current(self) -> SigningKey:
        """The newest key whose ``signs_from`` has passed (published keys wait their turn)."""
        now = time.time()
        with self._lock:
            signing = [k for f, k in self._keys if f <= now]
            return signing[-1] if signing else self._keys[0][1]

    def jwks(self) -> dict:
        with self._lock:
            return {"keys": [k.public_jwk() for _, k in self._keys]}

    def public_key(self, kid: str):
        for attempt in (0, 1):
            with self._lock:
                for _, k in self._keys:
                    if k.kid == kid:
                        return k.private_key.public_key()
            if attempt == 0:
                self._load()   # another replica's new key, published since our last read
        return None

    def rotate(self, *, immediately: bool = False) -> SigningKey:
        """Publish a new key that signs ``publish_ahead`` s from now; drop keys past the overlap."""
        now = time.time()
        key = SigningKey(f"vf-{int(now)}-{os.urandom(3).hex()}", new_rsa_key(), now)
        self.db.run(self.db._execute(sa.insert(SIGNING_KEYS).values(
            kid=key.kid, pem=key.private_pem().decode(), created=now,
            signs_from=now if immediately else now + self.publish_ahead)))
        self.retire()
        self._load()
        return key

    def retire(self, keep: int | None = None) -> list[str]:
        """Delete every key whose successor has signed for longer than ``overlap``; returns kids."""
        self._load()
        now = time.time()
        with self._lock:
            keys = list(self._keys)
        gone = [k.kid for (_, k), (succ_from, _) in zip(keys, keys[1:]) if succ_from + self.overlap < now]
        if gone:
            self.db.run(self.db._execute(sa.delete(SIGNING_KEYS).where(SIGNING_KEYS.c.kid.in_(gone))))
            self._load()
        return gone
