"""The reconcile decision: a pure function from what is observed to the next thing to do.

``decide`` looks at one snapshot — the desired identity (``Target``), what Chainguard and the cluster
hold now (``Observed``) and the time — and returns the single next ``Action``. The reconcile applies
that action, folds its result into the snapshot, and asks again until the answer is ``Done``. Taking
one step at a time from observed state (not from a remembered plan) is what makes the operator crash
safe: after a restart, the same questions get the same answers from whatever state was left behind.

Order matters and is deliberate:
1. a usable identity must exist (create, or replace one that cannot be updated into shape);
2. its shape is corrected in place (description, claims, static keys, expiry renewal);
3. every wanted role is bound before any unwanted binding is removed;
4. the ConfigMap names the identity — only then is a replaced identity deleted, so a pod never reads
   the ID of an identity that no longer exists.

Nothing here does I/O or reads the clock; every branch is unit tested in ``tests/unit/test_decide.py``.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import urllib.parse
from collections.abc import Mapping

from chainguard_identity_operator import naming
from chainguard_identity_operator.chainguard.types import ClaimMatch, Identity, RoleBinding, StaticKeys
from chainguard_identity_operator.config import PUBLIC_ISSUER_HOSTS, Settings
from chainguard_identity_operator.jwks import JWKSError, KeySet, parse_jwks
from chainguard_identity_operator.model import IdentitySpec, Mode, SpecError, StaticSpec

# ---------------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass(frozen=True)
class ClusterFacts:
    """What the cluster says about itself, observed once per interval and shared by every resource."""

    issuer: str
    keys: KeySet | None  # None when the JWKS could not be read


@dataclasses.dataclass(frozen=True)
class Target:
    """The identity the spec asks for, with everything resolved."""

    parent: str
    name: str
    description: str
    mode: Mode  # ClaimMatch or Static, never Auto
    issuer: str
    subject: str
    audience: str
    keys: KeySet | None  # Static only
    static: StaticSpec
    role_ids: Mapping[str, str]  # spec role -> role UIDP, in spec order
    endpoints: Mapping[str, str]  # what the ConfigMap says besides the identity UIDP


@dataclasses.dataclass(frozen=True)
class Observed:
    """What Chainguard and the cluster hold now, as far as this resource is concerned."""

    identity: Identity | None = None  # the identity this resource manages now
    bindings: tuple[RoleBinding, ...] = ()  # role bindings of ``identity``
    config_map: Mapping[str, str] | None = None  # data of the ConfigMap, None if absent
    retired: tuple[Identity, ...] = ()  # ours, replaced, waiting until the ConfigMap moved on
    in_place_rejected: bool = False  # the API refused to update ``identity`` in place
    # When each retired identity may go: pods reading a mounted ConfigMap need time to see the new ID.
    retire_after: Mapping[str, datetime.datetime] = dataclasses.field(default_factory=dict)
    force_rotation: bool = False  # a new value of the rotate annotation asks for a renewal now
    # Bindings an adopted identity already had: never removed, or adopting the operator's own
    # identity would strip its owner role and lock it out.
    foreign_bindings: frozenset[str] = frozenset()


# ---------------------------------------------------------------------------------------------------
# Actions


@dataclasses.dataclass(frozen=True)
class CreateIdentity:
    parent: str
    identity: Identity
    replaces: str | None = None  # UIDP of the identity this one replaces


@dataclasses.dataclass(frozen=True)
class UpdateIdentity:
    uid: str
    identity: Identity
    mask: tuple[str, ...]
    reason: str  # "drift", "keys-changed", "renewal", "forced", "adopt"


@dataclasses.dataclass(frozen=True)
class DeleteIdentity:
    uid: str
    reason: str


@dataclasses.dataclass(frozen=True)
class BindRole:
    parent: str
    identity: str
    role: str
    role_id: str


@dataclasses.dataclass(frozen=True)
class UnbindRole:
    binding: RoleBinding


@dataclasses.dataclass(frozen=True)
class WriteConfigMap:
    data: Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class Done:
    """Nothing left to do. ``wake_at`` is when the next scheduled change (renewal) is due."""

    wake_at: datetime.datetime | None


Action = CreateIdentity | UpdateIdentity | DeleteIdentity | BindRole | UnbindRole | WriteConfigMap | Done


# ---------------------------------------------------------------------------------------------------
# Building the target


def issuer_is_public(issuer: str, settings: Settings) -> bool:
    """Whether Chainguard's STS can fetch this issuer's keys itself (so ClaimMatch works)."""
    if settings.issuer_public is not None:
        return settings.issuer_public
    host = (urllib.parse.urlsplit(issuer).hostname or "").lower()
    # Hosts the admin listed win over every heuristic below.
    if any(host == item or host.endswith("." + item) for item in settings.public_issuer_hosts):
        return True
    if not host or host == "localhost" or host.startswith("kubernetes.default.svc"):
        return False
    if host.endswith((".local", ".internal", ".svc", ".localdomain")):
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return False  # an issuer on a bare IP has no public TLS certificate the STS would trust
    return any(pattern.fullmatch(host) for pattern in PUBLIC_ISSUER_HOSTS)


def resolve_mode(spec: IdentitySpec, issuer: str, settings: Settings, adopted: Identity | None) -> Mode:
    if spec.mode is not Mode.AUTO:
        return spec.mode
    if adopted is not None and adopted.static_keys is not None:
        return Mode.STATIC
    if adopted is not None and adopted.claim_match is not None:
        return Mode.CLAIM_MATCH
    return Mode.CLAIM_MATCH if issuer_is_public(issuer, settings) else Mode.STATIC


def build_target(
    spec: IdentitySpec,
    *,
    parent: str,
    facts: ClusterFacts,
    settings: Settings,
    role_ids: Mapping[str, str],
    adopted: Identity | None = None,
) -> Target:
    """Resolve the spec against the cluster and settings. Raises ``SpecError`` when it cannot work."""
    issuer = spec.issuer or facts.issuer
    mode = resolve_mode(spec, issuer, settings, adopted)
    if adopted is not None:
        kind = Mode.STATIC if adopted.static_keys is not None else Mode.CLAIM_MATCH
        if adopted.static_keys is None and adopted.claim_match is None:
            raise SpecError(
                "spec.adopt",
                f"identity {adopted.uid} is a {adopted.other_kind or 'non-OIDC'} identity; only claimMatch "
                "and staticKeys identities can be adopted",
                reason="AdoptionRefused",
            )
        if adopted.parent != parent:
            raise SpecError(
                "spec.adopt",
                f"identity {adopted.uid} is not in the parent {parent}; adopt an identity of that organization",
                reason="AdoptionRefused",
            )
        if kind is not mode:
            raise SpecError(
                "spec.mode",
                f"spec.mode is {mode.value} but the adopted identity {adopted.uid} is {kind.value}",
                reason="AdoptionRefused",
            )
    keys = facts.keys if mode is Mode.STATIC else None
    name = (
        adopted.name
        if adopted is not None
        else naming.identity_name(settings.cluster_name, spec.namespace, spec.name)
    )
    return Target(
        parent=parent,
        name=name,
        description=naming.identity_description(
            settings.cluster_name, spec.namespace, spec.name, spec.description
        ),
        mode=mode,
        issuer=issuer,
        subject=spec.subject,
        audience=spec.audience,
        keys=keys,
        static=spec.static,
        role_ids=dict(role_ids),
        endpoints={
            "CHAINGUARD_ISSUER": settings.issuer_url,
            "CHAINGUARD_API": settings.api_url,
            "CHAINGUARD_AUDIENCE": spec.audience,
            "CHAINGUARD_REGISTRY": settings.registry,
        },
    )


def config_map_data(target: Target, identity_id: str) -> dict[str, str]:
    """What a pod needs to exchange its projected token for a Chainguard token."""
    return {"CHAINGUARD_IDENTITY": identity_id, **target.endpoints}


# ---------------------------------------------------------------------------------------------------
# Deciding


def renewal_due_at(expires_at: datetime.datetime, static: StaticSpec) -> datetime.datetime:
    return expires_at - static.renew_before


def desired_identity(
    target: Target, now: datetime.datetime, expires_at: datetime.datetime | None
) -> Identity:
    """The identity body the target asks for; ``expires_at`` keeps a static expiry that is still good."""
    claim_match = None
    static_keys = None
    if target.mode is Mode.CLAIM_MATCH:
        claim_match = ClaimMatch(issuer=target.issuer, subject=target.subject, audience=target.audience)
    else:
        if target.keys is None:
            raise ValueError("a static identity needs the cluster's keys")
        static_keys = StaticKeys(
            issuer=target.issuer,
            subject=target.subject,
            issuer_keys=target.keys.document,
            expiration_time=expires_at or (now + target.static.valid_for).replace(microsecond=0),
            audience=target.audience,
        )
    return Identity(
        uid="",
        name=target.name,
        description=target.description,
        claim_match=claim_match,
        static_keys=static_keys,
    )


def _kind(identity: Identity) -> Mode | None:
    if identity.claim_match is not None:
        return Mode.CLAIM_MATCH
    if identity.static_keys is not None:
        return Mode.STATIC
    return None


def _registered_fingerprint(keys: StaticKeys) -> str | None:
    try:
        return parse_jwks(keys.issuer_keys).fingerprint
    except JWKSError:
        return None  # unreadable keys are drift: they will be replaced


def _shape_update(
    target: Target, current: Identity, now: datetime.datetime, *, force: bool = False
) -> UpdateIdentity | None:
    """The in-place update that brings ``current`` into shape, if any."""
    mask: list[str] = []
    reason = "drift"
    expires_at = current.static_keys.expiration_time if current.static_keys is not None else None
    if target.mode is Mode.STATIC and current.static_keys is not None:
        static = current.static_keys
        assert target.keys is not None
        if (static.issuer, static.subject, static.audience) != (
            target.issuer,
            target.subject,
            target.audience,
        ):
            mask.append("static_keys")
        else:
            if _registered_fingerprint(static) != target.keys.fingerprint:
                mask.append("static_keys.issuer_keys")
                reason = "keys-changed"
            if static.expiration_time is None or now >= renewal_due_at(static.expiration_time, target.static):
                mask.append("static_keys.expiration_time")
                reason = "renewal"
            elif force:
                if "static_keys.issuer_keys" not in mask:
                    mask.append("static_keys.issuer_keys")
                mask.append("static_keys.expiration_time")
        if force:
            # Whatever else changes in the same write, it also renews: reconcile counts the request done.
            reason = "forced"
        if "static_keys" in mask or "static_keys.expiration_time" in mask:
            expires_at = None  # renew: a fresh lifetime from now
    if target.mode is Mode.CLAIM_MATCH and current.claim_match is not None:
        wanted = ClaimMatch(issuer=target.issuer, subject=target.subject, audience=target.audience)
        if current.claim_match != wanted:
            mask.append("claim_match")
    if current.description != target.description:
        mask.insert(0, "description")
        if not naming.is_managed(current.description) and reason == "drift":
            reason = "adopt"
    if not mask:
        return None
    return UpdateIdentity(
        uid=current.uid,
        identity=desired_identity(target, now, expires_at),
        mask=tuple(mask),
        reason=reason,
    )


def decide(target: Target, observed: Observed, now: datetime.datetime) -> Action:
    current = observed.identity

    # 1. A usable identity must exist.
    replaceable = current is not None and (
        _kind(current) is not target.mode or current.parent != target.parent or observed.in_place_rejected
    )
    if current is None or replaceable:
        return CreateIdentity(
            parent=target.parent,
            identity=desired_identity(target, now, None),
            replaces=current.uid if current is not None else None,
        )

    # 2. Its shape is corrected in place.
    update = _shape_update(target, current, now, force=observed.force_rotation)
    if update is not None:
        return update

    # 3. Every wanted role is bound, then unwanted bindings in the parent are removed.
    # Only bindings of this identity in the parent are ours to manage; others were made elsewhere.
    managed = [b for b in observed.bindings if b.group_uid == target.parent and b.identity_uid == current.uid]
    bound = {b.role_uid for b in managed}
    for role, role_id in target.role_ids.items():
        if role_id not in bound:
            return BindRole(parent=target.parent, identity=current.uid, role=role, role_id=role_id)
    wanted = set(target.role_ids.values())
    seen: set[str] = set()
    for binding in managed:
        if binding.uid in observed.foreign_bindings:
            continue
        if binding.role_uid not in wanted or binding.role_uid in seen:
            return UnbindRole(binding=binding)  # unwanted, or a duplicate of a wanted one
        seen.add(binding.role_uid)

    # 4. The ConfigMap names the identity; only then do replaced identities go.
    data = config_map_data(target, current.uid)
    if observed.config_map != data:
        return WriteConfigMap(data=data)
    wakes: list[datetime.datetime] = []
    for old in observed.retired:
        if old.uid == current.uid:
            continue  # never delete the identity the ConfigMap names, whatever put it on the list
        due = observed.retire_after.get(old.uid)
        if due is None or now >= due:
            return DeleteIdentity(uid=old.uid, reason="replaced")
        wakes.append(due)

    if current.static_keys is not None and current.static_keys.expiration_time is not None:
        wakes.append(renewal_due_at(current.static_keys.expiration_time, target.static))
    return Done(wake_at=min(wakes) if wakes else None)
