"""Validating our JWT access tokens — one validator used by Tiled, the Block and the tests.

Every component that accepts a token calls :class:`TokenValidator`: pyjwt with a fixed
algorithm allow-list (RS256 only, so ``alg: none`` and the HS256-with-the-public-key trick
are refused by pyjwt itself), required claims, audience, issuer and a small leeway, keys from
the issuer's JWKS found through its OIDC discovery document (``PyJWKClient``, cached).

Every failure is an :class:`InvalidToken` carrying a short, safe reason; servers turn that
into 401 — never a 500, never a silent accept.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import httpx
import jwt

from ..errors import InvalidToken
from .scopes import ScopeSet

__all__ = [ 'ALGORITHMS', 'ACCESS_TOKEN_TYPES', 'REQUIRED_CLAIMS',
    'Claims', 'decode_verified', 'unverified_claims', 'discover', 'TokenValidator',
]

#: The only signing algorithms we accept.  Never derive this from the token header.
ALGORITHMS = ("RS256",)
#: ``typ`` header values accepted for access tokens: RFC 9068 ``at+jwt``; Keycloak says ``JWT``.
ACCESS_TOKEN_TYPES = ("at+jwt", "application/at+jwt", "jwt")
REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp", "iat")


@dataclass(frozen=True)
class Claims:
    """A validated token's claims, with the parsed scope set."""

    raw: dict[str, Any]
    token: str = field(repr=False, default="")

    @property
    def sub(self) -> str:
        return self.raw["sub"]

    @property
    def scopes(self) -> ScopeSet:
        return ScopeSet.lenient(self.raw.get("scope", self.raw.get("scp")))

    @property
    def exp(self) -> float:
        return float(self.raw["exp"])

    @property
    def azp(self) -> str | None:
        return self.raw.get("azp")

    @property
    def act(self) -> dict | None:
        return self.raw.get("act")

    @property
    def audiences(self) -> list[str]:
        aud = self.raw.get("aud", [])
        return [aud] if isinstance(aud, str) else list(aud)

    def actor_chain(self) -> list[str]:
        """The ``act`` chain, outermost (most recent) actor first."""
        chain, act = [], self.act
        while isinstance(act, dict) and "sub" in act:
            chain.append(act["sub"])
            act = act.get("act")
        return chain


def decode_verified(token: str, key, *, issuer: str, audience: list[str] | None, leeway: float,
                    require: Iterable[str]) -> dict:
    """``jwt.decode`` with our fixed algorithms, every failure mapped to a safe reason.

    Shared by :class:`TokenValidator` (keys from JWKS) and the dev IdP (its own keys)."""
    try:
        return jwt.decode(
            token, key, algorithms=list(ALGORITHMS), audience=audience, issuer=issuer, leeway=leeway,
            options={"require": list(require), "verify_aud": audience is not None},
        )
    except jwt.ExpiredSignatureError as exc:
        raise InvalidToken("token has expired", code="expired") from exc
    except jwt.ImmatureSignatureError as exc:
        raise InvalidToken("token is not yet valid", code="not_yet_valid") from exc
    except jwt.InvalidAudienceError as exc:
        raise InvalidToken(f"token audience is not {' or '.join(audience or [])}", code="wrong_audience") from exc
    except jwt.InvalidIssuerError as exc:
        raise InvalidToken(f"token issuer is not {issuer}", code="wrong_issuer") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise InvalidToken(f"token lacks required claim {exc.claim!r}", code="missing_claim") from exc
    except jwt.InvalidSignatureError as exc:
        raise InvalidToken("token signature does not verify", code="bad_signature") from exc
    except jwt.PyJWTError as exc:
        raise InvalidToken(f"invalid token: {exc}") from exc


#: Nothing is checked when reading claims unverified: not the signature, nor any claim.
_UNVERIFIED = {"verify_signature": False, "verify_exp": False, "verify_nbf": False, "verify_iat": False,
               "verify_aud": False, "verify_iss": False, "verify_sub": False, "verify_jti": False}


def unverified_claims(token: str) -> dict[str, Any]:
    """A JWT's claims read **without any verification** (signature, ``exp``, ``aud``, ``iat``,
    ``nbf``, ``iss``...): an expired or foreign token still yields its claims.  Raises
    ``jwt.PyJWTError`` (``DecodeError``) when ``token`` is not a JWT with a JSON object payload.

    Never the basis of an access decision — that is :class:`TokenValidator`'s alone.  Each use
    in this project is one of these, and is safe because a forged value can mislead it only
    into a harmless outcome:

    * **routing** — read ``iss`` to pick the validator that then verifies the token (Tiled's
      authenticator, the token service's federation): a lying ``iss`` meets a validator that
      refuses it;
    * **timing** — read ``exp`` to schedule a refresh, or to explain a refusal the server has
      already made (Tiled client, delegation, the trigger's outage handling): a wrong ``exp``
      only refreshes early or late, or words an error differently;
    * **reporting** — provenance written next to results, and the scope an IdP says it issued
      (checked early so the message is useful; Tiled enforces it again on every request);
    * **clean-up** — grant hygiene reads a stored grant's run and ``exp`` to delete it: the
      worst outcome is an early deletion, after which the run fails closed.
    """
    return jwt.decode(token, options=_UNVERIFIED)


def discover(issuer: str, *, client: httpx.Client | None = None, timeout: float = 10.0) -> dict:
    """Fetch the issuer's OIDC discovery document and check it names the same issuer."""
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    own = client is None
    client = client or httpx.Client(timeout=timeout)
    try:
        resp = client.get(url)
        resp.raise_for_status()
        doc = resp.json()
    finally:
        if own:
            client.close()
    if doc.get("issuer", "").rstrip("/") != issuer.rstrip("/"):
        raise ValueError(f"discovery at {url} names issuer {doc.get('issuer')!r}, expected {issuer!r}")
    return doc


class TokenValidator:
    """Validate access tokens of one issuer for one audience.

    ``jwks_uri`` is found by discovery on first use unless given.  Unknown key ids make
    ``PyJWKClient`` refetch the JWKS (that is how key rotation reaches us); refetches are
    rate-limited so a stream of garbage ``kid``s cannot hammer the IdP.
    """

    def __init__(
        self,
        issuer: str,
        audience: str | Iterable[str],
        *,
        jwks_uri: str | None = None,
        leeway: float = 10.0,
        accepted_types: Iterable[str] = ACCESS_TOKEN_TYPES,
        require_typ: bool = True,
        min_refetch_interval: float = 5.0,
    ):
        self.issuer = issuer.rstrip("/")
        self.audience = [audience] if isinstance(audience, str) else list(audience)
        self.leeway = leeway
        self.accepted_types = tuple(t.lower() for t in accepted_types)
        self.require_typ = require_typ
        self._jwks_uri = jwks_uri
        self._jwk_client: jwt.PyJWKClient | None = None
        self._lock = threading.Lock()
        self._min_refetch = min_refetch_interval

    @property
    def jwks_uri(self) -> str:
        if self._jwks_uri is None:
            self._jwks_uri = discover(self.issuer)["jwks_uri"]
        return self._jwks_uri

    def _jwks(self) -> jwt.PyJWKClient:
        with self._lock:
            if self._jwk_client is None:
                # pyjwt refetches the JWKS on an unknown kid (how rotation reaches us), at most
                # once per cooldown, so a stream of garbage kids cannot hammer the IdP.
                self._jwk_client = jwt.PyJWKClient(
                    self.jwks_uri, cache_keys=True, lifespan=300, timeout=10,
                    cooldown_duration=self._min_refetch,
                )
            return self._jwk_client

    def _signing_key(self, kid: str):
        try:
            return self._jwks().get_signing_key(kid)
        except jwt.PyJWKClientConnectionError as exc:
            raise InvalidToken(f"cannot fetch the issuer's signing keys: {exc}", code="keys_unavailable") from exc
        except jwt.PyJWKClientError as exc:
            raise InvalidToken(f"unknown signing key id {kid!r}", code="unknown_key") from exc

    def validate(self, token: str, *, audience: str | Iterable[str] | None = None) -> Claims:
        """Return the token's claims or raise :class:`InvalidToken` with the reason."""
        if not token or not isinstance(token, str):
            raise InvalidToken("no token", code="no_token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:  # DecodeError, or InvalidTokenError for e.g. a non-string kid
            raise InvalidToken(f"malformed token: {exc}", code="malformed") from exc
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise InvalidToken(f"signing algorithm {alg!r} is not accepted (only {', '.join(ALGORITHMS)})",
                               code="bad_algorithm")
        typ = str(header.get("typ", "")).lower()
        if self.require_typ and typ not in self.accepted_types:
            raise InvalidToken(f"token type {header.get('typ')!r} is not an access token", code="wrong_type")
        kid = header.get("kid")
        if not kid:
            raise InvalidToken("token header has no key id (kid)", code="unknown_key")
        key = self._signing_key(kid)
        aud = self.audience if audience is None else ([audience] if isinstance(audience, str) else list(audience))
        claims = decode_verified(token, key.key, issuer=self.issuer, audience=aud, leeway=self.leeway,
                                 require=REQUIRED_CLAIMS)
        if claims.get("iat", 0) > time.time() + self.leeway:
            raise InvalidToken("token is issued in the future", code="not_yet_valid")
        if str(claims.get("typ", "Bearer")).lower() not in ("bearer", "at+jwt"):
            # Keycloak marks ID and refresh tokens with a typ claim; both are JWTs with our
            # key and issuer, and neither may be used as an access token.
            raise InvalidToken(f"token is a {claims['typ']} token, not an access token", code="wrong_type")
        return Claims(raw=claims, token=token)
