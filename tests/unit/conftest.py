"""Fixtures shared by the pure unit tests: real signing keys and a valid ``Settings``.

Keys come from ``cryptography`` and are exported as JWKs by PyJWT, the way a real API server's JWKS
looks. Generating RSA keys is the slowest thing these tests do, so keys are made once per session.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from chainguard_identity_operator.config import Settings

JWK = dict[str, Any]


@pytest.fixture(scope="session")
def rsa_private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ec_private_keys() -> tuple[ec.EllipticCurvePrivateKey, ...]:
    return tuple(ec.generate_private_key(ec.SECP256R1()) for _ in range(3))


def _to_jwk(key: Any, kid: str) -> JWK:
    algorithm: Any = RSAAlgorithm if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)) else ECAlgorithm
    jwk: JWK = algorithm.to_jwk(key, as_dict=True)
    jwk["kid"] = kid
    return jwk


@pytest.fixture(scope="session")
def to_jwk() -> Callable[[Any, str], JWK]:
    """``to_jwk(key, kid)``: the JWK of a key as PyJWT exports it (private members for private keys)."""
    return _to_jwk


@pytest.fixture(scope="session")
def public_jwk() -> Callable[[Any, str], JWK]:
    """``public_jwk(private_key, kid)``: the public half of a key as a JWK, with a ``kid``."""
    return lambda key, kid: _to_jwk(key.public_key(), kid)


@pytest.fixture
def settings() -> Settings:
    """Valid operator settings for a development setup (a token file, no identity)."""
    return Settings(cluster_name="prod", token_file=pathlib.Path("/run/chainguard/token"))
