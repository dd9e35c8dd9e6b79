"""OpenID Connect bearer tokens: JWTs signed by a configured issuer, verified against its
published keys (JWKS), their claims mapped to a principal (role, and site for uploaders).

Nothing of a token (nor its claims) goes into a log or a response: refusals name the kind of
failure only, and a principal is named by a hash of issuer and subject."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import orjson

from ricord_archive.config import ROLES, OidcConfig
from ricord_archive.web.auth import Forbidden, Principal, Unauthenticated

log = logging.getLogger(__name__)

MAX_JWKS_BYTES = 1024**2
MAX_KEYS = 64  # keys kept from one JWKS
MIN_REFRESH_SECONDS = 30.0  # an unknown kid refetches the JWKS at most this often
MAX_AGE_SECONDS = 3600.0  # known keys are refetched after this long anyway
FETCH_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class _Key:
    jwk: jwt.PyJWK
    alg: str | None  # the "alg" the JWKS pins the key to, if any


class KeySet:
    """The issuer's signing keys by kid, from `jwks_url` or `jwks_file`. An unknown kid (key
    rotation) refetches them, at most once per `min_refresh` seconds however many tokens ask."""

    def __init__(self, config: OidcConfig, *, min_refresh: float = MIN_REFRESH_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._min_refresh = min_refresh
        self._clock = clock
        self._keys: dict[str | None, _Key] = {}
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    async def key(self, kid: str | None) -> _Key | None:
        """The key a token's `kid` names (a token without kid: the only key), or None."""
        if self._stale() or self._lookup(kid) is None:
            async with self._lock:  # one fetch at a time; waiters see its result
                if self._stale() or (self._lookup(kid) is None and self._may_refresh()):
                    await self._refresh()
        return self._lookup(kid)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _lookup(self, kid: str | None) -> _Key | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid) if kid is not None else None

    def _stale(self) -> bool:
        return self._fetched_at is None or (
            self._clock() - self._fetched_at > MAX_AGE_SECONDS and self._may_refresh()
        )

    def _may_refresh(self) -> bool:
        return self._fetched_at is None or self._clock() - self._fetched_at >= self._min_refresh

    async def _refresh(self) -> None:
        self._fetched_at = self._clock()  # a failed fetch counts too: no hammering the issuer
        try:
            document = orjson.loads(await self._fetch())
            entries = document["keys"]
            if not isinstance(entries, list):
                raise TypeError("keys is not a list")
        except (OSError, aiohttp.ClientError, ValueError, KeyError,  # OSError: timeouts too
                TypeError) as exc:
            log.warning("cannot load the OIDC issuer's keys: %s", type(exc).__name__)
            return  # keep the keys known so far
        self._keys = _parse_keys(entries)
        log.info("loaded %d OIDC signing key(s)", len(self._keys))

    async def _fetch(self) -> bytes:
        if self._config.jwks_file is not None:
            return await asyncio.to_thread(self._config.jwks_file.read_bytes)
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
            )
        assert self._config.jwks_url is not None
        async with self._session.get(self._config.jwks_url) as response:
            response.raise_for_status()
            body = await response.content.read(MAX_JWKS_BYTES + 1)
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError("JWKS too large")
        return body


def _parse_keys(entries: list[Any]) -> dict[str | None, _Key]:
    """Signing keys of a JWKS by kid; keys that are not for signatures or not usable are left
    out. A key without kid is kept only as the set's single key."""
    keys: dict[str | None, _Key] = {}
    for entry in entries[:MAX_KEYS]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig" or \
                entry.get("kty") == "oct":  # a shared secret is no issuer's public key
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            continue
        kid = entry.get("kid") if isinstance(entry.get("kid"), str) else None
        alg = entry.get("alg") if isinstance(entry.get("alg"), str) else None
        keys[kid] = _Key(jwk, alg)
    if None in keys and len(keys) > 1:
        del keys[None]
    return keys


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


class OidcVerifier:
    """Verifies a JWT's signature (pinned algorithms, the issuer's keys), iss, aud, exp and
    nbf, and maps its role and site claims to a principal."""

    def __init__(self, config: OidcConfig, site_ids: Mapping[str, int],
                 keys: KeySet | None = None) -> None:
        self._config = config
        self._site_ids = site_ids
        self._keys = keys or KeySet(config)

    async def principal(self, token: str) -> Principal:
        """The principal of a valid token; Unauthenticated (401) for an invalid one,
        Forbidden (403) for a valid one that grants no archive role."""
        claims = await self._verified_claims(token)
        values = _claim(claims, self._config.role_claim)
        values = [values] if isinstance(values, str) else values
        roles = {v for v in values if v in ROLES} if isinstance(values, list) else set()
        if len(roles) != 1:
            raise Forbidden("the token grants no single archive role")
        role = roles.pop()
        subject = hashlib.sha256(f"{claims['iss']}\0{claims['sub']}".encode()).hexdigest()
        name = f"oidc:{subject[:16]}"
        if role != "uploader":
            return Principal(name, role)
        site = _claim(claims, self._config.site_claim)
        if not isinstance(site, str) or site not in self._site_ids:
            raise Forbidden("the uploader token names no configured site")
        return Principal(name, role, site, self._site_ids[site])

    async def close(self) -> None:
        await self._keys.close()

    async def _verified_claims(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated("malformed token") from exc
        alg = header.get("alg")
        if alg not in self._config.algorithms:  # "none", HS256 with the public key, others
            raise Unauthenticated("token algorithm not allowed")
        kid = header.get("kid")
        key = await self._keys.key(kid if isinstance(kid, str) else None)
        if key is None:
            raise Unauthenticated("token signed by an unknown key")
        if key.alg is not None and key.alg != alg:
            raise Unauthenticated("token algorithm does not match its key")
        try:
            return jwt.decode(
                token, key.jwk.key, algorithms=[alg], audience=list(self._config.audience),
                issuer=self._config.issuer, leeway=self._config.leeway,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"token refused ({type(exc).__name__})") from exc
