"""Typed views of the Chainguard IAM v2 wire objects the operator reads and writes.

The grpc-gateway emits zero values but may also omit fields, so every ``from_wire`` accepts a key
missing or present-but-zero, and every ``to_wire`` writes lowerCamelCase keys. Timestamps are
timezone-aware UTC datetimes in Python and RFC 3339 strings with ``Z`` on the wire.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

DEFAULT_AUDIENCE = "issuer.enforce.dev"


def parse_time(value: object) -> datetime.datetime | None:
    """Parse an RFC 3339 timestamp as the gateway sends it; ``None``/``""`` mean unset."""
    if not value or not isinstance(value, str):
        return None
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    # Go emits up to nanoseconds; Python's fromisoformat takes at most microseconds.
    if "." in text:
        head, _, rest = text.partition(".")
        digits = ""
        while rest and rest[0].isdigit():
            digits, rest = digits + rest[0], rest[1:]
        text = f"{head}.{digits[:6].ljust(6, '0')}{rest}"
    parsed = datetime.datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.astimezone(datetime.UTC)


def format_time(value: datetime.datetime) -> str:
    """Format a datetime as RFC 3339 UTC with ``Z`` and whole seconds."""
    return value.astimezone(datetime.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _str(data: Mapping[str, Any], *keys: str) -> str:
    for key in keys:
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


@dataclasses.dataclass(frozen=True)
class ClaimMatch:
    issuer: str
    subject: str
    audience: str = DEFAULT_AUDIENCE

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> ClaimMatch:
        return cls(
            issuer=_str(data, "issuer", "issuerPattern"),
            subject=_str(data, "subject", "subjectPattern"),
            audience=_str(data, "audience", "audiencePattern") or DEFAULT_AUDIENCE,
        )

    def to_wire(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "subject": self.subject, "audience": self.audience}


@dataclasses.dataclass(frozen=True)
class StaticKeys:
    issuer: str
    subject: str
    issuer_keys: str  # the JWKS as a JSON string, public keys only
    expiration_time: datetime.datetime | None
    audience: str = DEFAULT_AUDIENCE

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> StaticKeys:
        audiences = data.get("audiences") or []
        return cls(
            issuer=_str(data, "issuer"),
            subject=_str(data, "subject"),
            issuer_keys=_str(data, "issuerKeys", "issuer_keys"),
            expiration_time=parse_time(data.get("expirationTime") or data.get("expiration_time")),
            audience=audiences[0] if audiences else DEFAULT_AUDIENCE,
        )

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "issuer": self.issuer,
            "subject": self.subject,
            "issuerKeys": self.issuer_keys,
            "audiences": [self.audience],
        }
        if self.expiration_time is not None:
            wire["expirationTime"] = format_time(self.expiration_time)
        return wire


@dataclasses.dataclass(frozen=True)
class Identity:
    """An IAM v2 identity. Exactly one of ``claim_match``/``static_keys`` is set for ours;
    an identity of another kind (AWS, service principal) has neither and ``other_kind`` names it."""

    uid: str
    name: str
    description: str = ""
    claim_match: ClaimMatch | None = None
    static_keys: StaticKeys | None = None
    other_kind: str = ""
    create_time: datetime.datetime | None = None
    update_time: datetime.datetime | None = None

    @property
    def parent(self) -> str:
        return self.uid.rsplit("/", 1)[0]

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Identity:
        claim = data.get("claimMatch") or data.get("claim_match")
        static = data.get("staticKeys") or data.get("static_keys")
        other = next(
            (key for key in ("awsIdentity", "servicePrincipal") if data.get(key)),
            "",
        )
        return cls(
            uid=_str(data, "uid", "id"),
            name=_str(data, "name"),
            description=_str(data, "description"),
            claim_match=ClaimMatch.from_wire(claim) if isinstance(claim, Mapping) else None,
            static_keys=StaticKeys.from_wire(static) if isinstance(static, Mapping) else None,
            other_kind=other,
            create_time=parse_time(data.get("createTime")),
            update_time=parse_time(data.get("updateTime")),
        )

    def to_wire(self) -> dict[str, Any]:
        """The body of a create request (server-made fields left out)."""
        wire: dict[str, Any] = {"name": self.name, "description": self.description}
        if self.claim_match is not None:
            wire["claimMatch"] = self.claim_match.to_wire()
        if self.static_keys is not None:
            wire["staticKeys"] = self.static_keys.to_wire()
        return wire


@dataclasses.dataclass(frozen=True)
class Role:
    uid: str
    name: str
    description: str = ""

    @property
    def builtin(self) -> bool:
        """Built-in roles are roots (no ``/``); custom roles live under an organization."""
        return "/" not in self.uid

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Role:
        return cls(
            uid=_str(data, "uid", "id"), name=_str(data, "name"), description=_str(data, "description")
        )


@dataclasses.dataclass(frozen=True)
class Group:
    uid: str
    name: str
    description: str = ""
    verified: bool = False

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Group:
        return cls(
            uid=_str(data, "uid", "id"),
            name=_str(data, "name"),
            description=_str(data, "description"),
            verified=bool(data.get("verified", False)),
        )


@dataclasses.dataclass(frozen=True)
class RoleBinding:
    uid: str
    identity_uid: str
    group_uid: str
    role_uid: str

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> RoleBinding:
        def ref(key: str, flat: str) -> str:
            nested = data.get(key)
            if isinstance(nested, Mapping):
                return _str(nested, "uid", "id")
            return _str(data, flat)

        return cls(
            uid=_str(data, "uid", "id"),
            identity_uid=ref("identity", "identityUid"),
            group_uid=ref("group", "groupUid"),
            role_uid=ref("role", "roleUid"),
        )


@dataclasses.dataclass(frozen=True)
class ExchangedToken:
    """A token minted by the STS. ``repr`` hides the token so it can never reach a log."""

    token: str = dataclasses.field(repr=False)
    expiry: datetime.datetime
