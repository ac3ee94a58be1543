"""The cluster's JSON Web Key Set: parsing, the public-keys-only check, and a stable fingerprint.

The JWKS is uploaded to Chainguard as a static identity's ``issuerKeys``; the API server only ever
serves public keys, but a JWKS pasted by hand or served by a misconfigured proxy could carry private
members, and uploading those would leak the cluster's signing key. So every key is checked for private
or symmetric material before anything leaves the cluster, and the upload is rebuilt from the public
members only.

The fingerprint is a SHA-256 over the canonical JSON of the public members of every key, sorted, so it
changes exactly when the set of keys changes (not when the server reorders them or adds whitespace).
A changed fingerprint is the cluster-wide signal that the signing keys rotated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

# Members that only a private or symmetric key has (RFC 7518 §6.2.2, §6.3.2, §6.4; RFC 8037 §2).
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# Members worth keeping: what a verifier needs and nothing else.
PUBLIC_MEMBERS = {
    "RSA": ("kty", "kid", "use", "alg", "n", "e"),
    "EC": ("kty", "kid", "use", "alg", "crv", "x", "y"),
    "OKP": ("kty", "kid", "use", "alg", "crv", "x"),
}


class JWKSError(ValueError):
    """The key set is malformed or holds private or symmetric key material."""


@dataclasses.dataclass(frozen=True)
class KeySet:
    document: str  # canonical JSON of the public members only: what is uploaded
    fingerprint: str  # "sha256:<hex>"
    key_ids: tuple[str, ...]


def parse_jwks(raw: str | bytes | Mapping[str, Any]) -> KeySet:
    """Parse a JWKS, refuse private material, and return its public form and fingerprint."""
    if isinstance(raw, (str, bytes)):
        try:
            data = json.loads(raw)
        except ValueError:
            raise JWKSError("the JWKS is not valid JSON") from None
    else:
        data = raw
    if not isinstance(data, Mapping) or not isinstance(data.get("keys"), list):
        raise JWKSError('the JWKS must be an object with a "keys" list')
    keys = data["keys"]
    if not keys:
        raise JWKSError("the JWKS has no keys")
    public: list[dict[str, Any]] = []
    for index, key in enumerate(keys):
        if not isinstance(key, Mapping):
            raise JWKSError(f"key {index} is not an object")
        kty = key.get("kty")
        private = sorted(PRIVATE_MEMBERS.intersection(key))
        if private:
            # Name the members, never their values.
            raise JWKSError(
                f"key {index} ({key.get('kid', 'no kid')}) holds private material: {', '.join(private)}"
            )
        if kty not in PUBLIC_MEMBERS:
            raise JWKSError(f"key {index} has unsupported key type {kty!r}")
        public.append({member: key[member] for member in PUBLIC_MEMBERS[kty] if member in key})
    public.sort(key=lambda item: json.dumps(item, sort_keys=True))
    document = json.dumps({"keys": public}, sort_keys=True, separators=(",", ":"))
    fingerprint = "sha256:" + hashlib.sha256(document.encode()).hexdigest()
    key_ids = tuple(sorted(str(item["kid"]) for item in public if "kid" in item))
    return KeySet(document=document, fingerprint=fingerprint, key_ids=key_ids)


def public_keys(keys: KeySet) -> frozenset[str]:
    """Each public key of the set as canonical JSON: two sets share a key when these intersect."""
    return frozenset(
        json.dumps(key, sort_keys=True, separators=(",", ":")) for key in json.loads(keys.document)["keys"]
    )
