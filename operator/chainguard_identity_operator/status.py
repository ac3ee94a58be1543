"""The status of a ``ChainguardIdentity``: one typed record, read, written and declared here only.

``IdentityStatus`` is the operator's memory between passes and the auditor's record. The reconcile builds
the next one from what a pass observed, ``to_dict`` gives the wire form that is patched, ``from_dict``
reads back what an earlier pass (or a person, or an attacker with status rights) left there, and
``schema`` is the CRD's status schema. Status can be hand-edited, so ``from_dict`` ignores anything
malformed (as if it had never been written) rather than letting it break every later pass — and the
reconcile never trusts an identity ID read from here without checking its ownership marker.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Mapping
from typing import Any

from chainguard_identity_operator.timestamps import format_time, parse_time

_UIDP = re.compile(r"^[0-9a-f]{40}(/[0-9a-f]{16})*$")
MODES = ("Static", "ClaimMatch")


@dataclasses.dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str
    observed_generation: int
    last_transition_time: str

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Condition | None:
        kind, status = _text(data.get("type")), _text(data.get("status"))
        reason, changed = _text(data.get("reason")), _text(data.get("lastTransitionTime"))
        if kind is None or status is None or reason is None or changed is None:
            return None  # not a condition the schema would take: as if it were absent
        generation = data.get("observedGeneration")
        return cls(
            type=kind,
            status=status,
            reason=reason,
            message=data["message"] if isinstance(data.get("message"), str) else "",
            observed_generation=_int(generation) or 0,
            last_transition_time=changed,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "observedGeneration": self.observed_generation,
            "lastTransitionTime": self.last_transition_time,
        }


@dataclasses.dataclass(frozen=True)
class BindingRecord:
    role: str  # as written in spec.roles (or the role UIDP of an inherited role)
    role_id: str
    binding_id: str


@dataclasses.dataclass(frozen=True)
class Retiring:
    identity_id: str
    delete_after: datetime.datetime


@dataclasses.dataclass(frozen=True)
class RotationPending:
    """A forced rotation about to be written: the request, and the identity's ``updateTime`` before it.
    After a crash, an identity whose ``updateTime`` moved on shows the write happened; one that did not
    shows it did not — so a forced rotation is written exactly once."""

    request: str
    identity_updated_at: str


@dataclasses.dataclass(frozen=True)
class PullSecretRecord:
    name: str
    expires_at: datetime.datetime | None  # when the token in it expires
    attached_to: str | None = None  # the service account the operator added it to (imagePullSecrets)


@dataclasses.dataclass(frozen=True)
class ExchangeRecord:
    """The last check that a token of the service account exchanges for the identity."""

    identity_id: str
    identity_updated_at: str  # the identity's updateTime when checked: a change of it means check again
    verified_at: datetime.datetime
    ok: bool
    message: str


@dataclasses.dataclass(frozen=True)
class IdentityStatus:
    observed_generation: int | None = None
    identity_id: str | None = None
    identity_name: str | None = None
    mode: str | None = None
    issuer: str | None = None
    subject: str | None = None
    audience: str | None = None
    parent: str | None = None
    key_fingerprint: str | None = None
    key_ids: tuple[str, ...] = ()
    expires_at: datetime.datetime | None = None
    renew_at: datetime.datetime | None = None
    last_rotated_at: datetime.datetime | None = None
    role_bindings: tuple[BindingRecord, ...] = ()
    # Roles an adopted identity already held in its parent: kept bound, and bound to its successors.
    inherited_roles: tuple[str, ...] = ()
    adopted: str | None = None  # the value of spec.adopt that was acted on
    config_map_name: str | None = None
    retiring: tuple[Retiring, ...] = ()
    rotation_request: str | None = None  # the last value of the rotate annotation acted on
    rotation_pending: RotationPending | None = None
    pull_secret: PullSecretRecord | None = None
    exchange: ExchangeRecord | None = None
    conditions: tuple[Condition, ...] = ()

    def condition(self, kind: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == kind), None)

    @classmethod
    def from_dict(cls, status: Mapping[str, Any] | None) -> IdentityStatus:
        status = status if isinstance(status, Mapping) else {}
        raw_keys = status.get("keys")
        keys: Mapping[str, Any] = raw_keys if isinstance(raw_keys, Mapping) else {}
        pending = status.get("rotationPending")
        pending_request = _text(pending.get("request")) if isinstance(pending, Mapping) else None
        pending_at = pending.get("identityUpdatedAt", "") if isinstance(pending, Mapping) else None
        mode = _text(status.get("mode"))
        return cls(
            observed_generation=_int(status.get("observedGeneration")),
            identity_id=_identity(status.get("identityId")),
            identity_name=_text(status.get("identityName")),
            mode=mode if mode in MODES else None,
            issuer=_text(status.get("issuer")),
            subject=_text(status.get("subject")),
            audience=_text(status.get("audience")),
            parent=_uidp(status.get("parent")),
            key_fingerprint=_text(keys.get("fingerprint")),
            key_ids=tuple(_texts(keys.get("keyIds"))),
            expires_at=_time(status.get("expiresAt")),
            renew_at=_time(status.get("renewAt")),
            last_rotated_at=_time(status.get("lastRotatedAt")),
            role_bindings=tuple(
                BindingRecord(role=role, role_id=role_id, binding_id=binding_id)
                for item in _items(status.get("roleBindings"))
                for role in [_text(item.get("role"))]
                for role_id in [_uidp(item.get("roleId"))]
                for binding_id in [_uidp(item.get("bindingId"))]
                if role is not None and role_id is not None and binding_id is not None
            ),
            inherited_roles=tuple(uid for uid in map(_uidp, _texts(status.get("inheritedRoles"))) if uid),
            adopted=_identity(status.get("adopted")),
            config_map_name=_text(status.get("configMapName")),
            retiring=tuple(
                Retiring(uid, when)
                for item in _items(status.get("retiring"))
                for uid in [_identity(item.get("identityId"))]
                for when in [_time(item.get("deleteAfter"))]
                if uid is not None and when is not None
            ),
            rotation_request=_text(status.get("rotationRequest")),
            rotation_pending=RotationPending(request=pending_request, identity_updated_at=pending_at)
            if pending_request is not None and isinstance(pending_at, str)
            else None,
            pull_secret=_pull_secret(status.get("pullSecret")),
            exchange=_exchange(status.get("exchange")),
            conditions=tuple(
                c for c in (Condition.from_dict(item) for item in _items(status.get("conditions"))) if c
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """The wire form; unset fields are left out (a patch sets them to null where they were set)."""
        out: dict[str, Any] = {}

        def put(key: str, value: Any) -> None:
            if value is not None and value != () and value != []:
                out[key] = value

        put("observedGeneration", self.observed_generation)
        put("identityId", self.identity_id)
        put("identityName", self.identity_name)
        put("mode", self.mode)
        put("issuer", self.issuer)
        put("subject", self.subject)
        put("audience", self.audience)
        put("parent", self.parent)
        if self.key_fingerprint is not None:
            out["keys"] = {"fingerprint": self.key_fingerprint, "keyIds": list(self.key_ids)}
        put("expiresAt", _format(self.expires_at))
        put("renewAt", _format(self.renew_at))
        put("lastRotatedAt", _format(self.last_rotated_at))
        put(
            "roleBindings",
            [{"role": b.role, "roleId": b.role_id, "bindingId": b.binding_id} for b in self.role_bindings],
        )
        put("inheritedRoles", list(self.inherited_roles))
        put("adopted", self.adopted)
        put("configMapName", self.config_map_name)
        put(
            "retiring",
            [
                {"identityId": r.identity_id, "deleteAfter": format_time(r.delete_after)}
                for r in self.retiring
            ],
        )
        put("rotationRequest", self.rotation_request)
        if self.rotation_pending is not None:
            out["rotationPending"] = {
                "request": self.rotation_pending.request,
                "identityUpdatedAt": self.rotation_pending.identity_updated_at,
            }
        if self.pull_secret is not None:
            record: dict[str, Any] = {"name": self.pull_secret.name}
            if self.pull_secret.expires_at is not None:
                record["expiresAt"] = format_time(self.pull_secret.expires_at)
            if self.pull_secret.attached_to is not None:
                record["attachedTo"] = self.pull_secret.attached_to
            out["pullSecret"] = record
        if self.exchange is not None:
            out["exchange"] = {
                "identityId": self.exchange.identity_id,
                "identityUpdatedAt": self.exchange.identity_updated_at,
                "verifiedAt": format_time(self.exchange.verified_at),
                "result": "Verified" if self.exchange.ok else "Failed",
                "message": self.exchange.message,
            }
        put("conditions", [c.to_dict() for c in self.conditions])
        return out


def status_patch(before: Mapping[str, Any], after: IdentityStatus) -> dict[str, Any]:
    """The merge patch that turns the status ``before`` into ``after``: changed fields only, ``None`` for
    fields to remove, and nothing at all when nothing changed (a quiet resync writes nothing). kopf's own
    bookkeeping under ``status.kopf`` is never touched."""
    wanted = after.to_dict()
    patch: dict[str, Any] = {key: None for key in before if key not in wanted and key != "kopf"}
    patch.update({key: value for key, value in wanted.items() if before.get(key) != value})
    return patch


# ---------------------------------------------------------------------------------------------------
# The CRD's status schema


def _string(description: str, **constraints: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **constraints}


def _object(description: str, properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "object", "description": description}
    if required:
        node["required"] = list(required)
    node["properties"] = properties
    return node


_TIMESTAMP = {"type": "string", "format": "date-time"}
# metav1.Condition's own validation, as Kubernetes' generated CRDs spell it.
_CONDITION_TYPE_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
_CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


def schema() -> dict[str, Any]:
    """The CRD's ``status`` schema: every key ``to_dict`` writes, and ``kopf``'s bookkeeping."""
    condition = _object(
        "A metav1.Condition.",
        {
            "type": _string("Ready, Reconciling or Stalled.", maxLength=316, pattern=_CONDITION_TYPE_PATTERN),
            "status": _string("True, False or Unknown.", enum=["True", "False", "Unknown"]),
            "reason": _string(
                "A CamelCase reason a program can match on.",
                minLength=1,
                maxLength=1024,
                pattern=_CONDITION_REASON_PATTERN,
            ),
            "message": _string("What a human should know.", maxLength=32768),
            "observedGeneration": {
                "type": "integer",
                "format": "int64",
                "minimum": 0,
                "description": "The metadata.generation this condition describes.",
            },
            "lastTransitionTime": {**_TIMESTAMP, "description": "When status last changed."},
        },
        required=("type", "status", "lastTransitionTime", "reason", "message"),
    )
    properties: dict[str, Any] = {
        "observedGeneration": {
            "type": "integer",
            "format": "int64",
            "description": "The metadata.generation the operator last reconciled.",
        },
        "identityId": _string("UIDP of the Chainguard identity."),
        "identityName": _string("Name of the identity in Chainguard."),
        "mode": _string("What the identity is: Static or ClaimMatch.", enum=["Static", "ClaimMatch"]),
        "issuer": _string("The issuer the identity trusts."),
        "subject": _string("The exact subject the identity trusts."),
        "audience": _string("The audience the identity expects."),
        "parent": _string("UIDP of the group the identity lives and is bound in."),
        "keys": _object(
            "The cluster signing keys registered with a Static identity.",
            {
                "fingerprint": _string("sha256 fingerprint of the registered public JWKS."),
                "keyIds": {
                    "type": "array",
                    "description": "Key IDs (kid) of the registered keys.",
                    "items": {"type": "string"},
                },
            },
        ),
        "expiresAt": {**_TIMESTAMP, "description": "When the Static identity's keys expire."},
        "renewAt": {**_TIMESTAMP, "description": "When the operator renews the Static identity."},
        "lastRotatedAt": {**_TIMESTAMP, "description": "When the identity's keys or ID last changed."},
        "roleBindings": {
            "type": "array",
            "description": "The role bindings the operator keeps.",
            "items": _object(
                "One role binding.",
                {
                    "role": _string("The role as written in spec.roles, or the UIDP of an inherited role."),
                    "roleId": _string("UIDP of the role."),
                    "bindingId": _string("UIDP of the role binding."),
                },
            ),
        },
        "inheritedRoles": {
            "type": "array",
            "description": "Roles an adopted identity already held in its parent: kept, and given to the "
            "identities that replace it.",
            "items": {"type": "string"},
        },
        "adopted": _string("The spec.adopt identity the operator took over."),
        "configMapName": _string("The ConfigMap holding the identity ID for pods."),
        "retiring": {
            "type": "array",
            "description": "Identities this resource owns but no longer uses (replaced by a rotation, or "
            "duplicates left by a lost answer), kept until pods have the new ID.",
            "items": _object(
                "An identity awaiting deletion.",
                {
                    "identityId": _string("UIDP of the identity."),
                    "deleteAfter": {**_TIMESTAMP, "description": "When the operator deletes it."},
                },
            ),
        },
        "rotationRequest": _string("The last value of the rotation annotation the operator acted on."),
        "rotationPending": _object(
            "A forced rotation being written (so that it is written once, even across a crash).",
            {
                "request": _string("The value of the rotation annotation."),
                "identityUpdatedAt": _string("The identity's updateTime before the write."),
            },
        ),
        "pullSecret": _object(
            "The pull secret the operator keeps (spec.pullSecret).",
            {
                "name": _string("Name of the Secret."),
                "expiresAt": {**_TIMESTAMP, "description": "When the registry token in it expires."},
                "attachedTo": _string("The service account whose imagePullSecrets the operator added it to."),
            },
        ),
        "exchange": _object(
            "The last check that a token of the service account exchanges for the identity.",
            {
                "identityId": _string("The identity checked."),
                "identityUpdatedAt": _string("Its updateTime when checked."),
                "verifiedAt": {**_TIMESTAMP, "description": "When it was checked."},
                "result": _string("Verified or Failed.", enum=["Verified", "Failed"]),
                "message": _string("The STS's answer when it failed."),
            },
        ),
        "conditions": {
            "type": "array",
            "description": "Ready, Reconciling and Stalled, in the shape kstatus and kubectl wait read; "
            "PullSecretReady and ExchangeVerified when those are turned on.",
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
            "items": condition,
        },
        "kopf": {
            "type": "object",
            "description": "Bookkeeping of the kopf framework.",
            "x-kubernetes-preserve-unknown-fields": True,
        },
    }
    return _object("Written by the operator only: the audit record of the identity.", properties)


# ---------------------------------------------------------------------------------------------------
# Tolerant readers


def _items(value: object) -> list[Mapping[str, Any]]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, Mapping)]


def _pull_secret(value: object) -> PullSecretRecord | None:
    if not isinstance(value, Mapping):
        return None
    name = _text(value.get("name"))
    if name is None:
        return None
    return PullSecretRecord(
        name=name, expires_at=_time(value.get("expiresAt")), attached_to=_text(value.get("attachedTo"))
    )


def _exchange(value: object) -> ExchangeRecord | None:
    if not isinstance(value, Mapping):
        return None
    identity, at = _identity(value.get("identityId")), _time(value.get("verifiedAt"))
    result, updated = value.get("result"), value.get("identityUpdatedAt", "")
    if identity is None or at is None or result not in ("Verified", "Failed") or not isinstance(updated, str):
        return None
    message = value.get("message")
    return ExchangeRecord(
        identity_id=identity,
        identity_updated_at=updated,
        verified_at=at,
        ok=result == "Verified",
        message=message if isinstance(message, str) else "",
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _texts(value: object) -> list[str]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, str) and item]


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _uidp(value: object) -> str | None:
    text = _text(value)
    return text if text is not None and _UIDP.fullmatch(text) else None


def _identity(value: object) -> str | None:
    """An identity's UIDP: always a child (an organization or a role is a bare 40-hex root)."""
    uid = _uidp(value)
    return uid if uid is not None and "/" in uid else None


def _time(value: object) -> datetime.datetime | None:
    try:
        return parse_time(value)
    except (ValueError, OverflowError):  # RFC 3339 allows times that leave datetime's range in UTC
        return None


def _format(value: datetime.datetime | None) -> str | None:
    return format_time(value) if value is not None else None
