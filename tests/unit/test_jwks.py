"""The cluster's JWKS: private material never passes, the uploaded document is public-only and canonical,
and the fingerprint changes exactly when the set of keys changes."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import HMACAlgorithm, OKPAlgorithm

from chainguard_identity_operator.jwks import PUBLIC_MEMBERS, JWKSError, parse_jwks

JWK = dict[str, Any]
ToJWK = Callable[[Any, str], JWK]


@pytest.fixture
def rsa_public(rsa_private_key: rsa.RSAPrivateKey, public_jwk: ToJWK) -> JWK:
    return public_jwk(rsa_private_key, "rsa-1")


@pytest.fixture
def ec_public(ec_private_keys: tuple[ec.EllipticCurvePrivateKey, ...], public_jwk: ToJWK) -> JWK:
    return public_jwk(ec_private_keys[0], "ec-1")


# ---------------------------------------------------------------------------------------------------
# Private and symmetric material


@pytest.mark.parametrize("kind", ["rsa", "ec", "okp"])
def test_private_keys_are_rejected_without_echoing_private_values(
    kind: str,
    rsa_private_key: rsa.RSAPrivateKey,
    ec_private_keys: tuple[ec.EllipticCurvePrivateKey, ...],
    to_jwk: ToJWK,
) -> None:
    if kind == "rsa":
        private = to_jwk(rsa_private_key, "leaky")
        expected_members = ["d", "dp", "dq", "p", "q", "qi"]
    elif kind == "ec":
        private = to_jwk(ec_private_keys[0], "leaky")
        expected_members = ["d"]
    else:
        private = OKPAlgorithm.to_jwk(ed25519.Ed25519PrivateKey.generate(), as_dict=True)
        private["kid"] = "leaky"
        expected_members = ["d"]
    with pytest.raises(JWKSError) as caught:
        parse_jwks({"keys": [private]})
    message = str(caught.value)
    assert "private" in message
    assert f"private material: {', '.join(expected_members)}" in message
    for member in expected_members:
        assert private[member] not in message
        assert private[member] not in repr(caught.value.args)


@pytest.mark.parametrize("member", ["d", "p", "q", "dp", "dq", "qi", "oth", "k"])
def test_each_private_member_alone_is_rejected(rsa_public: JWK, member: str) -> None:
    secret = "c2VjcmV0LXZhbHVlLXRoYXQtbXVzdC1ub3QtbGVhaw"
    key = {**rsa_public, member: secret}
    with pytest.raises(JWKSError, match=rf": {member}$") as caught:
        parse_jwks({"keys": [key]})
    assert secret not in str(caught.value)


def test_one_private_key_among_public_ones_names_its_index(
    rsa_public: JWK, ec_private_keys: tuple[ec.EllipticCurvePrivateKey, ...], to_jwk: ToJWK
) -> None:
    private = to_jwk(ec_private_keys[1], "second")
    with pytest.raises(JWKSError, match=r"^key 1 \(second\) holds private material: d$") as caught:
        parse_jwks({"keys": [rsa_public, private]})
    assert private["d"] not in str(caught.value)


def test_symmetric_oct_keys_are_rejected_without_echoing_the_secret() -> None:
    oct_key = HMACAlgorithm.to_jwk(b"a shared secret that must stay home", as_dict=True)
    with pytest.raises(JWKSError, match=r"private material: k$") as caught:
        parse_jwks({"keys": [oct_key]})
    assert oct_key["k"] not in str(caught.value)


def test_oct_key_without_k_is_still_rejected() -> None:
    with pytest.raises(JWKSError, match=r"unsupported key type 'oct'"):
        parse_jwks({"keys": [{"kty": "oct", "kid": "x"}]})


# ---------------------------------------------------------------------------------------------------
# Malformed sets


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("not json", "not valid JSON"),
        (b"{", "not valid JSON"),
        ("[]", '"keys" list'),
        ('{"keys": {}}', '"keys" list'),
        ("{}", '"keys" list'),
        ('{"keys": []}', "no keys"),
        ('{"keys": ["abc"]}', "key 0 is not an object"),
        ('{"keys": [{"kid": "a"}]}', "unsupported key type None"),
        ('{"keys": [{"kty": "DSA", "kid": "a"}]}', "unsupported key type 'DSA'"),
    ],
)
def test_malformed_sets_are_rejected(raw: str | bytes, message: str) -> None:
    with pytest.raises(JWKSError, match=message):
        parse_jwks(raw)


def test_jwks_error_is_a_value_error() -> None:
    # Callers that only know ValueError (e.g. a generic parser error path) still catch it.
    assert issubclass(JWKSError, ValueError)


# ---------------------------------------------------------------------------------------------------
# The document and the fingerprint


def test_document_keeps_only_public_members(rsa_public: JWK, ec_public: JWK) -> None:
    extras = {
        "x5c": ["MIIBIjANBgkq"],
        "x5t": "abc",
        "x5u": "https://example.test/cert",
        "key_ops": ["verify"],
    }
    rsa_key = {**rsa_public, **extras, "use": "sig", "alg": "RS256"}
    ec_key = {**ec_public, **extras, "alg": "ES256"}
    keys = parse_jwks({"keys": [rsa_key, ec_key]})
    uploaded = json.loads(keys.document)["keys"]
    by_kid = {key["kid"]: key for key in uploaded}
    assert by_kid["rsa-1"] == {
        "kty": "RSA",
        "kid": "rsa-1",
        "use": "sig",
        "alg": "RS256",
        "n": rsa_public["n"],
        "e": rsa_public["e"],
    }
    assert by_kid["ec-1"] == {
        "kty": "EC",
        "kid": "ec-1",
        "alg": "ES256",
        "crv": "P-256",
        "x": ec_public["x"],
        "y": ec_public["y"],
    }
    assert set(json.loads(keys.document)) == {"keys"}


def test_okp_keys_are_supported() -> None:
    public = OKPAlgorithm.to_jwk(ed25519.Ed25519PrivateKey.generate().public_key(), as_dict=True)
    keys = parse_jwks({"keys": [{**public, "kid": "ed"}]})
    assert json.loads(keys.document)["keys"] == [
        {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": public["x"]}
    ]
    assert set(PUBLIC_MEMBERS) == {"RSA", "EC", "OKP"}


def test_fingerprint_is_stable_under_order_whitespace_and_extra_members(
    rsa_public: JWK, ec_public: JWK
) -> None:
    base = parse_jwks({"keys": [rsa_public, ec_public]})
    reordered_members = {key: rsa_public[key] for key in reversed(list(rsa_public))}
    variants: list[str | bytes | dict[str, Any]] = [
        {"keys": [ec_public, rsa_public]},
        {"keys": [reordered_members, ec_public]},
        json.dumps({"keys": [rsa_public, ec_public]}, indent=4),
        json.dumps({"keys": [ec_public, rsa_public]}).encode(),
        {"keys": [{**rsa_public, "x5c": ["MIIB"], "key_ops": ["verify"]}, ec_public]},
        base.document,
    ]
    for variant in variants:
        parsed = parse_jwks(variant)
        assert parsed.fingerprint == base.fingerprint
        assert parsed.document == base.document
    assert base.fingerprint.startswith("sha256:")
    assert len(base.fingerprint) == len("sha256:") + 64


def test_fingerprint_changes_when_the_key_set_changes(
    rsa_public: JWK,
    ec_public: JWK,
    ec_private_keys: tuple[ec.EllipticCurvePrivateKey, ...],
    public_jwk: ToJWK,
) -> None:
    sets = [
        [rsa_public],
        [ec_public],
        [rsa_public, ec_public],
        [rsa_public, ec_public, public_jwk(ec_private_keys[2], "ec-3")],  # a key added during rotation
        [{**rsa_public, "kid": "renamed"}],
        [{**rsa_public, "alg": "RS256"}],
    ]
    fingerprints = {parse_jwks({"keys": keys}).fingerprint for keys in sets}
    assert len(fingerprints) == len(sets)


def test_key_ids_are_sorted_and_skip_keys_without_kid(
    ec_private_keys: tuple[ec.EllipticCurvePrivateKey, ...], public_jwk: ToJWK
) -> None:
    keys = [public_jwk(ec_private_keys[0], "zeta"), public_jwk(ec_private_keys[1], "alpha")]
    anonymous = public_jwk(ec_private_keys[2], "x")
    del anonymous["kid"]
    parsed = parse_jwks({"keys": [*keys, anonymous]})
    assert parsed.key_ids == ("alpha", "zeta")
    assert len(json.loads(parsed.document)["keys"]) == 3
