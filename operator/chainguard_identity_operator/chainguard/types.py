"""Typed views of the Chainguard IAM v2 wire objects the operator reads and writes.

The grpc-gateway emits zero values but may also omit fields, so every ``from_wire`` accepts a key
missing or present-but-zero (and its snake_case proto name), and every ``to_wire`` writes
lowerCamelCase keys. Timestamps are timezone-aware UTC datetimes in Python and RFC 3339 strings with
``Z`` on the wire.

Reads are faithful because the operator judges drift by comparing what it reads with what it wants:
a :class:`ClaimMatch` keeps ``issuerPattern`` apart from ``issuer`` (and so on for subject,
audience, ``claims`` and ``claimPatterns``), so an identity someone widened to a pattern never reads
as the exact one the operator wrote. A :class:`RoleBinding` is read from its flat ``identityUid`` and
``roleUid`` first — the fields a create or update sets, as Chainguard's Terraform provider reads
them — then from the hydrated ``identity``/``role`` objects; the v2 protos have no flat group field,
so the group is the nested ``group.uid`` or else the parent of the binding's own UIDP (a binding
lives under its group).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

from chainguard_identity_operator.timestamps import format_time, parse_time

DEFAULT_AUDIENCE = "issuer.enforce.dev"
__all__ = ["DEFAULT_AUDIENCE", "format_time", "parse_time"]  # the wire's time format is the gateway's


def _str(data: Mapping[str, Any], *keys: str) -> str:
    for key in keys:
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def _str_map(data: Mapping[str, Any], *keys: str) -> dict[str, str]:
    for key in keys:
        value = data.get(key)
        if isinstance(value, Mapping) and value:
            return {str(name): str(item) for name, item in value.items()}
    return {}


@dataclasses.dataclass(frozen=True)
class ClaimMatch:
    """An identity's ``claimMatch``: each of issuer, subject and audience is an exact value or a
    (Go RE2) pattern, plus custom ``claims`` (exact) and ``claim_patterns``.

    ``issuer``, ``subject`` and ``audience`` may also be given by position, as before patterns were
    read; the other members are keyword-only. An unset member is ``""`` (or empty), except that an
    audience with neither value nor pattern is :data:`DEFAULT_AUDIENCE`, as the STS applies it; given
    an ``audience_pattern``, a default ``audience`` is dropped, since only one of the two can be set.
    """

    issuer: str = ""
    issuer_pattern: str = dataclasses.field(default="", kw_only=True)
    subject: str = ""
    subject_pattern: str = dataclasses.field(default="", kw_only=True)
    audience: str = DEFAULT_AUDIENCE
    audience_pattern: str = dataclasses.field(default="", kw_only=True)
    claims: Mapping[str, str] = dataclasses.field(default_factory=dict, kw_only=True)
    claim_patterns: Mapping[str, str] = dataclasses.field(default_factory=dict, kw_only=True)

    def __post_init__(self) -> None:
        # Own copies, so a caller's dict changed later cannot change this frozen value.
        object.__setattr__(self, "claims", dict(self.claims))
        object.__setattr__(self, "claim_patterns", dict(self.claim_patterns))
        if self.audience_pattern and self.audience == DEFAULT_AUDIENCE:
            object.__setattr__(self, "audience", "")

    def __hash__(self) -> int:
        return hash(
            (
                self.issuer,
                self.issuer_pattern,
                self.subject,
                self.subject_pattern,
                self.audience,
                self.audience_pattern,
                tuple(sorted(self.claims.items())),
                tuple(sorted(self.claim_patterns.items())),
            )
        )

    @property
    def is_exact(self) -> bool:
        """Whether only exact issuer/subject/audience are set: no pattern, no custom claim."""
        return not (
            self.issuer_pattern
            or self.subject_pattern
            or self.audience_pattern
            or self.claims
            or self.claim_patterns
        )

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> ClaimMatch:
        audience = _str(data, "audience")
        audience_pattern = _str(data, "audiencePattern", "audience_pattern")
        return cls(
            issuer=_str(data, "issuer"),
            issuer_pattern=_str(data, "issuerPattern", "issuer_pattern"),
            subject=_str(data, "subject"),
            subject_pattern=_str(data, "subjectPattern", "subject_pattern"),
            audience=audience or ("" if audience_pattern else DEFAULT_AUDIENCE),
            audience_pattern=audience_pattern,
            claims=_str_map(data, "claims"),
            claim_patterns=_str_map(data, "claimPatterns", "claim_patterns"),
        )

    def to_wire(self) -> dict[str, Any]:
        """The members that are set, under their JSON names."""
        members = (
            ("issuer", self.issuer),
            ("issuerPattern", self.issuer_pattern),
            ("subject", self.subject),
            ("subjectPattern", self.subject_pattern),
            ("audience", self.audience),
            ("audiencePattern", self.audience_pattern),
        )
        wire: dict[str, Any] = {key: value for key, value in members if value}
        if self.claims:
            wire["claims"] = dict(self.claims)
        if self.claim_patterns:
            wire["claimPatterns"] = dict(self.claim_patterns)
        return wire


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
        """Flat fields first, then the hydrated objects (see the module docstring)."""

        def nested(key: str) -> str:
            value = data.get(key)
            return _str(value, "uid", "id") if isinstance(value, Mapping) else ""

        uid = _str(data, "uid", "id")
        return cls(
            uid=uid,
            identity_uid=_str(data, "identityUid", "identity_uid") or nested("identity"),
            group_uid=nested("group") or (uid.rsplit("/", 1)[0] if "/" in uid else ""),
            role_uid=_str(data, "roleUid", "role_uid") or nested("role"),
        )


@dataclasses.dataclass(frozen=True)
class ExchangedToken:
    """A token minted by the STS. ``repr`` hides the token so it can never reach a log."""

    token: str = dataclasses.field(repr=False)
    expiry: datetime.datetime
