"""RS256 signing keys with key ids and rotation.

Keys live as PEM files in a directory (so tokens — notably 24 h delegation grants waiting in
Prefect — stay valid across an IdP restart), or only in memory for throwaway test servers.
Rotation adds a new key and signs with it; old keys stay in the JWKS until retired, so
tokens already issued keep validating while ``PyJWKClient`` picks up the new kid.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

__all__ = ['SigningKey', 'new_rsa_key', 'KeyStore']


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: rsa.RSAPrivateKey
    created: float

    def public_jwk(self) -> dict:
        jwk = json.loads(RSAAlgorithm.to_jwk(self.private_key.public_key()))
        jwk.update(kid=self.kid, use="sig", alg="RS256")
        return jwk

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class KeyStore:
    """The IdP's keys; the newest signs, all published in the JWKS."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory else None
        self._keys: list[SigningKey] = []
        self._lock = threading.Lock()
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)
            for pem in sorted(self.directory.glob("*.pem")):
                key = serialization.load_pem_private_key(pem.read_bytes(), password=None)
                self._keys.append(SigningKey(pem.stem, key, pem.stat().st_mtime))
            self._keys.sort(key=lambda k: (k.created, k.kid))
        if not self._keys:
            self.rotate()

    def reload_if_changed(self) -> None:
        """Pick up keys another process (``visitflow idp rotate-keys``) added to the directory."""
        if not self.directory:
            return
        known = {k.kid for k in self._keys}
        on_disk = {p.stem: p for p in self.directory.glob("*.pem")}
        if set(on_disk) == known:
            return
        with self._lock:
            keys = [k for k in self._keys if k.kid in on_disk]
            for kid in set(on_disk) - known:
                pem = on_disk[kid]
                key = serialization.load_pem_private_key(pem.read_bytes(), password=None)
                keys.append(SigningKey(kid, key, pem.stat().st_mtime))
            keys.sort(key=lambda k: (k.created, k.kid))
            if keys:
                self._keys = keys

    def rotate(self) -> SigningKey:
        """Add a new signing key (newest signs); returns it."""
        key = SigningKey(f"vf-{int(time.time())}-{os.urandom(3).hex()}", new_rsa_key(), time.time())
        with self._lock:
            if self.directory:
                path = self.directory / f"{key.kid}.pem"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(key.private_pem())
            self._keys.append(key)
        return key

    def retire(self, keep: int = 2) -> list[str]:
        """Drop all but the newest ``keep`` keys from the JWKS (and disk); returns retired kids."""
        with self._lock:
            retired, self._keys = self._keys[:-keep], self._keys[-keep:]
            for k in retired:
                if self.directory:
                    (self.directory / f"{k.kid}.pem").unlink(missing_ok=True)
        return [k.kid for k in retired]

    @property
    def current(self) -> SigningKey:
        return self._keys[-1]

    def jwks(self) -> dict:
        return {"keys": [k.public_jwk() for k in self._keys]}

    def public_key(self, kid: str):
        for k in self._keys:
            if k.kid == kid:
                return k.private_key.public_key()
        return None
