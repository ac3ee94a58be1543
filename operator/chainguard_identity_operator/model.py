"""Typed views of a ``ChainguardIdentity``: the validated spec and the recorded status.

The CRD schema and its CEL rules reject most bad specs at ``kubectl apply`` time, but the operator does
not trust that the schema was installed (or is current), so ``parse_spec`` checks every rule again and
reports the first violation as a ``SpecError`` naming the field. Policy that depends on operator-wide
settings (the role allow-list) is checked here too, because no schema can know it.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import re
from collections.abc import Mapping, Sequence
from typing import Any

from chainguard_identity_operator.chainguard.types import DEFAULT_AUDIENCE, parse_time
from chainguard_identity_operator.config import Settings
from chainguard_identity_operator.durations import parse_duration
from chainguard_identity_operator.urls import ISSUER_URL, ISSUER_URL_RULE

UIDP = re.compile(r"^[0-9a-f]{40}(/[0-9a-f]{16})*$")
CHILD_UIDP = re.compile(r"^[0-9a-f]{40}(/[0-9a-f]{16})+$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
ROLE_NAME = re.compile(r"^[a-z][a-z0-9._-]{0,62}$")

DEFAULT_VALID_FOR = datetime.timedelta(days=30)
MAX_VALID_FOR = datetime.timedelta(hours=8760)
MIN_VALID_FOR = datetime.timedelta(hours=1)


class Mode(enum.StrEnum):
    AUTO = "Auto"
    CLAIM_MATCH = "ClaimMatch"
    STATIC = "Static"


class DeletionPolicy(enum.StrEnum):
    DELETE = "Delete"
    ORPHAN = "Orphan"


class SpecError(Exception):
    """A spec the operator can never satisfy as written. ``field`` is the JSON path of the culprit."""

    def __init__(self, field: str, message: str, *, reason: str = "InvalidSpec") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class StaticSpec:
    valid_for: datetime.timedelta = DEFAULT_VALID_FOR
    renew_before: datetime.timedelta = DEFAULT_VALID_FOR / 3


DEFAULT_REFRESH_BEFORE = datetime.timedelta(minutes=10)
MAX_REFRESH_BEFORE = datetime.timedelta(minutes=50)  # an exchanged token lives at most an hour


@dataclasses.dataclass(frozen=True)
class PullSecretSpec:
    """A Secret of type kubernetes.io/dockerconfigjson the operator keeps filled with a registry token."""

    name: str
    attach_to_service_account: bool = False
    refresh_before: datetime.timedelta = DEFAULT_REFRESH_BEFORE


@dataclasses.dataclass(frozen=True)
class IdentitySpec:
    namespace: str
    name: str
    parent: str | None
    parent_name: str | None
    service_account_name: str
    roles: tuple[str, ...]
    mode: Mode
    issuer: str | None
    audience: str
    static: StaticSpec
    config_map_name: str
    deletion_policy: DeletionPolicy
    description: str
    adopt: str | None
    pull_secret: PullSecretSpec | None = None
    verify_exchange: bool | None = None  # None: the operator's default (CGID_VERIFY_EXCHANGE)

    @property
    def subject(self) -> str:
        # Always this namespace: a tenant can never bind another namespace's service account.
        return f"system:serviceaccount:{self.namespace}:{self.service_account_name}"


def default_config_map_name(name: str) -> str:
    return f"{name}-chainguard-identity"


def _string(spec: Mapping[str, Any], key: str, *, default: str | None = None) -> str | None:
    value = spec.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str):
        raise SpecError(f"spec.{key}", f"must be a string, not {type(value).__name__}")
    return value


def parse_spec(namespace: str, name: str, spec: Mapping[str, Any], settings: Settings) -> IdentitySpec:
    """Validate a raw ``spec`` and return its typed view, or raise ``SpecError`` for the first problem."""
    parent = _string(spec, "parent") or None
    parent_name = _string(spec, "parentName") or None
    if (parent is None) == (parent_name is None):
        raise SpecError("spec.parent", "exactly one of spec.parent and spec.parentName must be set")
    if parent is not None and not UIDP.fullmatch(parent):
        raise SpecError(
            "spec.parent", f"{parent!r} is not a group UIDP (40 hex digits, then /16 hex per level)"
        )

    service_account = _string(spec, "serviceAccountName", default="default") or "default"
    if len(service_account) > 253 or not DNS1123_SUBDOMAIN.fullmatch(service_account):
        raise SpecError("spec.serviceAccountName", f"{service_account!r} is not a valid service account name")

    raw_roles = spec.get("roles")
    if raw_roles is None:
        raw_roles = ["registry.pull"]
    if not isinstance(raw_roles, Sequence) or isinstance(raw_roles, str) or not raw_roles:
        raise SpecError("spec.roles", "must be a non-empty list of role names or role UIDPs")
    roles: list[str] = []
    for index, role in enumerate(raw_roles):
        if not isinstance(role, str) or not (ROLE_NAME.fullmatch(role) or UIDP.fullmatch(role)):
            raise SpecError(f"spec.roles[{index}]", f"{role!r} is neither a role name nor a role UIDP")
        if role not in settings.allowed_roles:
            raise SpecError(
                f"spec.roles[{index}]",
                f"role {role!r} is not allowed by this operator (allowed: {', '.join(settings.allowed_roles)}; "
                "a cluster admin can extend CGID_ALLOWED_ROLES)",
                reason="RoleNotAllowed",
            )
        if role not in roles:
            roles.append(role)

    raw_mode = _string(spec, "mode", default=Mode.AUTO.value) or Mode.AUTO.value
    try:
        mode = Mode(raw_mode)
    except ValueError:
        raise SpecError("spec.mode", f"{raw_mode!r} is not one of Auto, ClaimMatch, Static") from None

    issuer = _string(spec, "issuer") or None
    if issuer is not None and (len(issuer) > 2048 or not ISSUER_URL.fullmatch(issuer)):
        raise SpecError("spec.issuer", f"{issuer!r} is not {ISSUER_URL_RULE}")

    audience = _string(spec, "audience", default=DEFAULT_AUDIENCE) or DEFAULT_AUDIENCE
    if len(audience) > 253 or any(ch.isspace() for ch in audience):
        raise SpecError("spec.audience", "must be 1-253 characters without spaces")

    static = _parse_static(spec.get("static") or {})

    config_map = spec.get("configMap") or {}
    if not isinstance(config_map, Mapping):
        raise SpecError("spec.configMap", "must be an object with a name")
    config_map_name = config_map.get("name") or default_config_map_name(name)
    if (
        not isinstance(config_map_name, str)
        or len(config_map_name) > 253
        or not DNS1123_SUBDOMAIN.fullmatch(config_map_name)
    ):
        raise SpecError("spec.configMap.name", f"{config_map_name!r} is not a valid ConfigMap name")

    raw_policy = (
        _string(spec, "deletionPolicy", default=DeletionPolicy.DELETE.value) or DeletionPolicy.DELETE.value
    )
    try:
        deletion_policy = DeletionPolicy(raw_policy)
    except ValueError:
        raise SpecError("spec.deletionPolicy", f"{raw_policy!r} is not one of Delete, Orphan") from None

    description = _string(spec, "description", default="") or ""
    if len(description) > 256 or any(ch in description for ch in "\t\n\r"):
        raise SpecError("spec.description", "must be at most 256 characters on one line")

    adopt = _string(spec, "adopt") or None
    if adopt is not None and not CHILD_UIDP.fullmatch(adopt):
        raise SpecError("spec.adopt", f"{adopt!r} is not an identity UIDP (<40 hex>/<16 hex>)")
    if adopt is not None and parent is not None and adopt.rsplit("/", 1)[0] != parent:
        raise SpecError("spec.adopt", f"identity {adopt} is not a child of spec.parent {parent}")

    pull_secret = _parse_pull_secret(spec.get("pullSecret"))
    verify = spec.get("verifyExchange")
    if verify is not None and not isinstance(verify, bool):
        raise SpecError("spec.verifyExchange", "must be true or false")

    return IdentitySpec(
        namespace=namespace,
        name=name,
        parent=parent,
        parent_name=parent_name,
        service_account_name=service_account,
        roles=tuple(roles),
        mode=mode,
        issuer=issuer,
        audience=audience,
        static=static,
        config_map_name=config_map_name,
        deletion_policy=deletion_policy,
        description=description,
        adopt=adopt,
        pull_secret=pull_secret,
        verify_exchange=verify,
    )


def _parse_pull_secret(raw: object) -> PullSecretSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise SpecError("spec.pullSecret", "must be an object with a name")
    name = raw.get("name")
    if not isinstance(name, str) or len(name) > 253 or not DNS1123_SUBDOMAIN.fullmatch(name):
        raise SpecError("spec.pullSecret.name", f"{name!r} is not a valid Secret name")
    attach = raw.get("attachToServiceAccount", False)
    if not isinstance(attach, bool):
        raise SpecError("spec.pullSecret.attachToServiceAccount", "must be true or false")
    refresh_before = DEFAULT_REFRESH_BEFORE
    if raw.get("refreshBefore") not in (None, ""):
        refresh_before = _duration("spec.pullSecret.refreshBefore", raw["refreshBefore"])
        if refresh_before > MAX_REFRESH_BEFORE:
            raise SpecError("spec.pullSecret.refreshBefore", "must be at most 50m (a token lives an hour)")
    return PullSecretSpec(name=name, attach_to_service_account=attach, refresh_before=refresh_before)


def _parse_static(raw: object) -> StaticSpec:
    if not isinstance(raw, Mapping):
        raise SpecError("spec.static", "must be an object with validFor and renewBefore")
    valid_for = DEFAULT_VALID_FOR
    if raw.get("validFor") not in (None, ""):
        valid_for = _duration("spec.static.validFor", raw["validFor"])
    if valid_for > MAX_VALID_FOR:
        raise SpecError("spec.static.validFor", "must be at most 8760h (the API's maximum lifetime)")
    if valid_for < MIN_VALID_FOR:
        raise SpecError("spec.static.validFor", "must be at least 1h")
    renew_before = valid_for / 3
    if raw.get("renewBefore") not in (None, ""):
        renew_before = _duration("spec.static.renewBefore", raw["renewBefore"])
        if renew_before >= valid_for:
            raise SpecError("spec.static.renewBefore", "must be shorter than spec.static.validFor")
    return StaticSpec(valid_for=valid_for, renew_before=renew_before)


def _duration(field: str, value: object) -> datetime.timedelta:
    if not isinstance(value, str):
        raise SpecError(field, "must be a duration string like 720h")
    try:
        parsed = parse_duration(value)
    except ValueError as exc:
        raise SpecError(field, str(exc)) from None
    if parsed <= datetime.timedelta(0):
        raise SpecError(field, "must be positive")
    return parsed


@dataclasses.dataclass(frozen=True)
class RecordedBinding:
    role: str
    role_id: str
    binding_id: str


@dataclasses.dataclass(frozen=True)
class RecordedStatus:
    """What the last pass wrote to ``status`` — the operator's memory between passes."""

    identity_id: str | None = None
    parent: str | None = None
    expires_at: datetime.datetime | None = None
    last_rotated_at: datetime.datetime | None = None
    key_fingerprint: str | None = None
    config_map_name: str | None = None
    rotation_request: str | None = None  # the last value of the rotate annotation acted on
    retiring: tuple[tuple[str, datetime.datetime], ...] = ()  # replaced identities and when they go
    role_bindings: tuple[RecordedBinding, ...] = ()
    conditions: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def from_status(cls, status: Mapping[str, Any] | None) -> RecordedStatus:
        """Read back what earlier passes wrote. Status can be hand-edited, so anything malformed is
        ignored (as if never written) rather than allowed to break every later pass."""
        status = status if isinstance(status, Mapping) else {}
        keys = status.get("keys")
        bindings = tuple(
            RecordedBinding(
                role=str(item.get("role", "")),
                role_id=str(item.get("roleId", "")),
                binding_id=str(item.get("bindingId", "")),
            )
            for item in _items(status.get("roleBindings"))
        )
        retiring = tuple(
            (uid, when)
            for item in _items(status.get("retiring"))
            for uid in [_uidp(item.get("identityId"))]
            for when in [_time(item.get("deleteAfter"))]
            if uid is not None and when is not None
        )
        return cls(
            identity_id=_uidp(status.get("identityId")),
            rotation_request=_text(status.get("rotationRequest")),
            retiring=retiring,
            parent=_uidp(status.get("parent")),
            expires_at=_time(status.get("expiresAt")),
            last_rotated_at=_time(status.get("lastRotatedAt")),
            key_fingerprint=_text(keys.get("fingerprint")) if isinstance(keys, Mapping) else None,
            config_map_name=_text(status.get("configMapName")),
            role_bindings=bindings,
            conditions=tuple(_items(status.get("conditions"))),
        )


def _items(value: object) -> list[Mapping[str, Any]]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, Mapping)]


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _uidp(value: object) -> str | None:
    text = _text(value)
    return text if text is not None and UIDP.fullmatch(text) else None


def _time(value: object) -> datetime.datetime | None:
    try:
        return parse_time(value)
    except ValueError:
        return None
