"""Internal: the token service (its own process): delegation grants and run-bound data tokens.

RFC 8693 token exchange for the ``blueapi`` and ``visitflow`` clients, federating the
facility IdP (:mod:`.federation`), with rotating signing keys (:mod:`.keys`) and persisted
revocations (:mod:`.revocations`).  With demo users on (:mod:`.config`) the same server is
the dev IdP of the embedded stack.  ``visitflow idp`` runs it (:mod:`.cli`).  No stability
promise.
"""

__all__ = []
