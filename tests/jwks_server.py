"""An OpenID Connect issuer's key set for tests: RSA keys generated here, and their JWKS served
by a real aiohttp server on a free port, counting how often it is fetched."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ISSUER = "https://idp.example.org/realms/ricord"
AUDIENCE = "ricord-archive"


class SigningKey:
    """An RSA key pair with a kid; signs tokens as the issuer would."""

    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict[str, Any]:
        jwk = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        return jwt.encode(claims, self.private, algorithm="RS256",
                          headers={"kid": self.kid, **header})


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims for five minutes (a key set to None is left out)."""
    now = int(time.time())
    values = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice-7d1e", "iat": now, "nbf": now - 5,
              "exp": now + 300, **overrides}
    return {k: v for k, v in values.items() if v is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A JWT assembled by hand: HS256 with `secret` as the HMAC key, or no signature."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    if secret is None:
        return f"{signing_input}."
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


class JwksServer:
    """Serves `document` at /jwks.json from a thread of its own; `fetches` counts requests."""

    def __init__(self, *keys: SigningKey) -> None:
        self.document: dict[str, Any] = {"keys": [k.jwk() for k in keys]}
        self.fetches = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    def start(self) -> JwksServer:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("JWKS server did not start")
        return self

    def stop(self) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)

    def _run(self) -> None:
        self._loop = loop = asyncio.new_event_loop()

        async def jwks(_: web.Request) -> web.Response:
            self.fetches += 1
            return web.json_response(self.document)

        app = web.Application()
        app.router.add_get("/jwks.json", jwks)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        self.port = site.port
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()
