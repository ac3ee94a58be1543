"""The reconcile decision: pure functions from what is observed to the next thing to do, and back.

``decide`` looks at one snapshot — the desired identity (``Target``), what Chainguard and the cluster
hold now (``Observed``) and the time — and returns the single next ``Action``. The reconcile performs it
and hands the ``Result`` to ``fold``, which returns the snapshot as it now is, and asks again until the
answer is ``Done``. Taking one step at a time from observed state (not from a remembered plan) is what
makes the operator crash safe: after a restart, the same questions get the same answers from whatever
state was left behind. The tests drive the same ``decide``/``fold`` pair; there is no second copy.

Order matters and is deliberate:
1. an identity that is being taken over is marked as this resource's first (its description), so that
   nothing is ever replaced, renewed or deleted while it still carries another claim;
2. a usable identity must exist: create one, or replace one that cannot be brought into shape in place —
   another kind or parent, an in-place renewal the API refused or clamped, or a renewal that would pass
   the identity's creation time plus the maximum lifetime (replaced up front, without asking);
3. its shape is corrected in place, one concern per write: claims or static trust, then new keys, then a
   new expiry — so a refused expiry never takes the key upload down with it;
4. every wanted role is bound before any unwanted binding is removed;
5. the ConfigMap names the identity — only then are ConfigMaps under an old name and retired identities
   deleted, so a pod never reads the ID of an identity that no longer exists.

The identity the operator itself authenticates as is never deleted and never loses a binding here,
whatever else the snapshot says. Nothing in this module does I/O or reads the clock; every branch is
unit tested in ``tests/unit/test_decide.py``.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import ipaddress
import urllib.parse
from collections.abc import Mapping

from chainguard_identity_operator import naming
from chainguard_identity_operator.chainguard.types import ClaimMatch, Identity, RoleBinding, StaticKeys
from chainguard_identity_operator.config import PUBLIC_ISSUER_HOSTS, Settings
from chainguard_identity_operator.jwks import JWKSError, KeySet, parse_jwks
from chainguard_identity_operator.model import IdentitySpec, Mode, SpecError, StaticSpec
from chainguard_identity_operator.naming import Owner

# ---------------------------------------------------------------------------------------------------
# Inputs


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
    config_map_name: str = ""
    max_lifetime: datetime.timedelta = datetime.timedelta(days=365)  # from the identity's creation


@dataclasses.dataclass(frozen=True)
class Observed:
    """What Chainguard and the cluster hold now, as far as this resource is concerned."""

    identity: Identity | None = None  # the identity this resource manages now
    bindings: tuple[RoleBinding, ...] = ()  # role bindings of ``identity`` in the target parent
    config_map: Mapping[str, str] | None = None  # data of the ConfigMap, None if absent
    stale_config_maps: tuple[str, ...] = ()  # ours, under a name the spec no longer uses
    retired: tuple[Identity, ...] = ()  # ours, no longer used: replaced ones, duplicates
    # Retired identities never published (left by a create whose answer was lost, or by a crash in the
    # middle of a replacement): a replacement takes one of these before it creates another.
    spares: tuple[str, ...] = ()
    retired_bindings: Mapping[str, tuple[RoleBinding, ...]] = dataclasses.field(default_factory=dict)
    # When each retired identity may go: pods reading a mounted ConfigMap need time to see the new ID.
    retire_after: Mapping[str, datetime.datetime] = dataclasses.field(default_factory=dict)
    replace: str | None = None  # why ``identity`` must be replaced (the API refused an in-place renewal)
    force_rotation: bool = False  # a new value of the rotate annotation asks for a renewal now
    inherited_roles: tuple[str, ...] = ()  # role UIDPs kept from an adopted identity
    protected: frozenset[str] = frozenset()  # identities the operator authenticates as: never removed


# ---------------------------------------------------------------------------------------------------
# Actions


@dataclasses.dataclass(frozen=True)
class CreateIdentity:
    parent: str
    identity: Identity
    replaces: str | None = None  # UIDP of the identity this one replaces


@dataclasses.dataclass(frozen=True)
class TakeSpare:
    """Use an unpublished identity of ours (a spare) instead of creating one. No API call."""

    uid: str
    replaces: str | None = None


@dataclasses.dataclass(frozen=True)
class UpdateIdentity:
    uid: str
    identity: Identity
    mask: tuple[str, ...]
    reason: str  # "adopt", "migrate", "drift", "keys-changed", "renewal", "forced"

    @property
    def sets_expiry(self) -> bool:
        return any(path in ("static_keys", "static_keys.expiration_time") for path in self.mask)


@dataclasses.dataclass(frozen=True)
class DeleteIdentity:
    uid: str
    bindings: tuple[str, ...]  # its role bindings, removed first so none is left behind
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
    name: str
    data: Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class DeleteConfigMap:
    name: str


@dataclasses.dataclass(frozen=True)
class Done:
    """Nothing left to do. ``wake_at`` is when the next scheduled change (renewal) is due."""

    wake_at: datetime.datetime | None


Action = (
    CreateIdentity
    | TakeSpare
    | UpdateIdentity
    | DeleteIdentity
    | BindRole
    | UnbindRole
    | WriteConfigMap
    | DeleteConfigMap
    | Done
)


# ---------------------------------------------------------------------------------------------------
# Results: what performing an action came to. Failures are exceptions and end the pass instead.


@dataclasses.dataclass(frozen=True)
class Created:
    identity: Identity


@dataclasses.dataclass(frozen=True)
class Taken:
    """A spare is in use now."""


@dataclasses.dataclass(frozen=True)
class Updated:
    identity: Identity


@dataclasses.dataclass(frozen=True)
class Refused:
    """The API refused an in-place update that sets the expiry (400 InvalidArgument, FailedPrecondition,
    OutOfRange): the identity is replaced instead."""

    message: str


@dataclasses.dataclass(frozen=True)
class Bound:
    binding: RoleBinding


@dataclasses.dataclass(frozen=True)
class Written:
    """The ConfigMap holds the data asked for."""


@dataclasses.dataclass(frozen=True)
class Removed:
    """A binding, identity or ConfigMap is gone (or was already)."""


Result = Created | Taken | Updated | Refused | Bound | Written | Removed


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
    owner: Owner,
    parent: str,
    issuer: str,
    keys: KeySet | None,
    settings: Settings,
    role_ids: Mapping[str, str],
    adopted: Identity | None = None,
    name: str | None = None,
    lineage: Identity | None = None,
) -> Target:
    """Resolve the spec against the cluster and settings. Raises ``SpecError`` when it cannot work.

    ``issuer`` is the cluster's discovered issuer (the spec may override it); ``adopted`` an identity
    being taken over in this pass (checked here); ``lineage`` the identity a resource that adopted one
    uses now — its kind, not the issuer, decides ``mode: Auto`` in every later pass, or a resync would
    replace an adopted static identity with a ClaimMatch one; ``name`` the name of the identity in use
    when it is not the deterministic one (an adopted identity keeps its own).
    """
    issuer = spec.issuer or issuer
    mode = resolve_mode(spec, issuer, settings, adopted or lineage)
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
    return Target(
        parent=parent,
        name=name or naming.identity_name(owner.cluster_name, spec.namespace, spec.name),
        description=naming.identity_description(owner, spec.description),
        mode=mode,
        issuer=issuer,
        subject=spec.subject,
        audience=spec.audience,
        keys=keys if mode is Mode.STATIC else None,
        static=spec.static,
        role_ids=dict(role_ids),
        endpoints={
            "CHAINGUARD_ISSUER": settings.issuer_url,
            "CHAINGUARD_API": settings.api_url,
            "CHAINGUARD_AUDIENCE": spec.audience,
            "CHAINGUARD_REGISTRY": settings.registry,
        },
        config_map_name=spec.config_map_name,
        max_lifetime=settings.max_static_lifetime,
    )


def config_map_data(target: Target, identity_id: str) -> dict[str, str]:
    """What a pod needs to exchange its projected token for a Chainguard token."""
    return {"CHAINGUARD_IDENTITY": identity_id, **target.endpoints}


# ---------------------------------------------------------------------------------------------------
# Deciding


def renewal_due_at(expires_at: datetime.datetime, static: StaticSpec) -> datetime.datetime:
    return expires_at - static.renew_before


def fresh_expiry(target: Target, now: datetime.datetime) -> datetime.datetime:
    return (now + target.static.valid_for).replace(microsecond=0)


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
            expiration_time=expires_at or fresh_expiry(target, now),
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


def registered_fingerprint(keys: StaticKeys) -> str | None:
    try:
        return parse_jwks(keys.issuer_keys).fingerprint
    except JWKSError:
        return None  # unreadable keys are drift: they will be replaced


class Rotation(enum.Enum):
    """What the rotate annotation asks of this pass."""

    NONE = "none"  # no new value
    DUE = "due"  # a new value: renew now
    WRITTEN = "written"  # a new value whose renewal was written just before a crash: record it, no more


def forced_rotation(
    *,
    request: str | None,
    done: str | None,
    pending: tuple[str, str] | None,
    identity_updated_at: str,
) -> Rotation:
    """``request`` is the annotation's value, ``done`` the last one acted on, ``pending`` the request and
    the identity's ``updateTime`` recorded just before a forced write. An identity whose ``updateTime``
    moved on since then shows that the write happened: it is not repeated."""
    if request is None or request == done:
        return Rotation.NONE
    if pending is not None and pending[0] == request and pending[1] != identity_updated_at:
        return Rotation.WRITTEN
    return Rotation.DUE


def _renewal_wanted(target: Target, current: Identity, now: datetime.datetime, force: bool) -> bool:
    static = current.static_keys
    if static is None or target.mode is not Mode.STATIC:
        return False
    return (
        force
        or static.expiration_time is None
        or now >= renewal_due_at(static.expiration_time, target.static)
    )


def lifetime_limit(target: Target, identity: Identity) -> datetime.datetime | None:
    """The latest expiry the API allows ``identity``: its creation time plus the maximum lifetime."""
    if identity.create_time is None:
        return None
    return identity.create_time + target.max_lifetime


def _replacement_reason(target: Target, observed: Observed, now: datetime.datetime) -> str | None:
    current = observed.identity
    assert current is not None
    if observed.replace is not None:
        return observed.replace
    if _kind(current) is not target.mode:
        return f"the identity is not {target.mode.value}"
    if current.parent != target.parent:
        return f"the identity is not in {target.parent}"
    if _renewal_wanted(target, current, now, observed.force_rotation):
        limit = lifetime_limit(target, current)
        if limit is not None and fresh_expiry(target, now) > limit:
            return (
                f"renewing would pass the identity's maximum lifetime ({target.max_lifetime.days} days "
                "from its creation)"
            )
    return None


def _update(
    target: Target,
    current: Identity,
    now: datetime.datetime,
    mask: tuple[str, ...],
    reason: str,
    *,
    renew: bool = False,
) -> UpdateIdentity:
    expires = current.static_keys.expiration_time if current.static_keys is not None else None
    return UpdateIdentity(
        uid=current.uid,
        identity=desired_identity(target, now, None if renew else expires),
        mask=mask,
        reason=reason,
    )


def shape_update(target: Target, observed: Observed, now: datetime.datetime) -> UpdateIdentity | None:
    """The next in-place update that brings the identity into shape, one concern at a time."""
    current = observed.identity
    assert current is not None
    if target.mode is Mode.CLAIM_MATCH and current.claim_match is not None:
        wanted = ClaimMatch(issuer=target.issuer, subject=target.subject, audience=target.audience)
        # Patterns and extra claims read back faithfully: any of them trusts more than we asked for.
        if current.claim_match != wanted:
            return _update(target, current, now, ("claim_match",), "drift")
    static = current.static_keys
    if target.mode is Mode.STATIC and static is not None:
        assert target.keys is not None
        if (static.issuer, static.subject, static.audience) != (
            target.issuer,
            target.subject,
            target.audience,
        ):
            return _update(target, current, now, ("static_keys",), "drift")
        if registered_fingerprint(static) != target.keys.fingerprint:
            return _update(target, current, now, ("static_keys.issuer_keys",), "keys-changed")
        if _renewal_wanted(target, current, now, observed.force_rotation):
            forced = observed.force_rotation
            mask = (
                ("static_keys.issuer_keys", "static_keys.expiration_time")
                if forced
                else ("static_keys.expiration_time",)
            )
            return _update(target, current, now, mask, "forced" if forced else "renewal", renew=True)
    if current.description != target.description:
        return _update(target, current, now, ("description",), "drift")
    return None


def _marking(target: Target, current: Identity, now: datetime.datetime) -> UpdateIdentity | None:
    """Step 1: an identity that does not yet carry this resource's marker gets it, before anything else."""
    marked = naming.parse_marker(current.description)
    expected = naming.parse_marker(target.description)
    if marked == expected:
        return None
    reason = "adopt" if marked is None else "migrate"
    return _update(target, current, now, ("description",), reason)


def decide(target: Target, observed: Observed, now: datetime.datetime) -> Action:
    current = observed.identity

    # 1. An identity taken over carries our marker before anything else happens to it.
    if current is not None:
        marking = _marking(target, current, now)
        if marking is not None:
            return marking

    # 2. A usable identity must exist.
    if current is None or _replacement_reason(target, observed, now) is not None:
        replaces = current.uid if current is not None else None
        if observed.spares:
            return TakeSpare(uid=observed.spares[0], replaces=replaces)
        return CreateIdentity(
            parent=target.parent, identity=desired_identity(target, now, None), replaces=replaces
        )

    # 3. Its shape is corrected in place.
    update = shape_update(target, observed, now)
    if update is not None:
        return update

    # 4. Every wanted role is bound, then unwanted bindings in the parent are removed.
    # Only bindings of this identity in the parent are ours to manage; others were made elsewhere.
    managed = [b for b in observed.bindings if b.group_uid == target.parent and b.identity_uid == current.uid]
    bound = {b.role_uid for b in managed}
    wanted = {
        **target.role_ids,
        **{uid: uid for uid in observed.inherited_roles if uid not in target.role_ids.values()},
    }
    for role, role_id in wanted.items():
        if role_id not in bound:
            return BindRole(parent=target.parent, identity=current.uid, role=role, role_id=role_id)
    if current.uid not in observed.protected:
        seen: set[str] = set()
        for binding in managed:
            if binding.role_uid not in wanted.values() or binding.role_uid in seen:
                return UnbindRole(binding=binding)  # unwanted, or a duplicate of a wanted one
            seen.add(binding.role_uid)

    # 5. The ConfigMap names the identity; only then do old ConfigMaps and retired identities go.
    data = config_map_data(target, current.uid)
    if observed.config_map != data:
        return WriteConfigMap(name=target.config_map_name, data=data)
    for name in observed.stale_config_maps:
        return DeleteConfigMap(name=name)
    wakes: list[datetime.datetime] = []
    for old in observed.retired:
        if old.uid == current.uid or old.uid in observed.protected:
            continue  # never the identity in use, nor the one the operator authenticates as
        due = observed.retire_after.get(old.uid)
        if due is None or now >= due:
            bindings = tuple(b.uid for b in observed.retired_bindings.get(old.uid, ()))
            return DeleteIdentity(uid=old.uid, bindings=bindings, reason="retired")
        wakes.append(due)

    if current.static_keys is not None and current.static_keys.expiration_time is not None:
        wakes.append(renewal_due_at(current.static_keys.expiration_time, target.static))
    return Done(wake_at=min(wakes) if wakes else None)


# ---------------------------------------------------------------------------------------------------
# Folding a result back in


def _switch(
    observed: Observed,
    to: Identity,
    bindings: tuple[RoleBinding, ...],
    replaces: str | None,
    now: datetime.datetime,
    grace: datetime.timedelta,
) -> Observed:
    """``to`` is the identity in use now; the one it replaces is retired with a grace period."""
    retired = tuple(i for i in observed.retired if i.uid != to.uid)
    retire_after = {uid: due for uid, due in observed.retire_after.items() if uid != to.uid}
    retired_bindings = {uid: b for uid, b in observed.retired_bindings.items() if uid != to.uid}
    replaced = observed.identity
    if replaces is not None and replaced is not None and replaced.uid == replaces:
        retired = (*retired, replaced)
        retire_after[replaced.uid] = now + grace
        retired_bindings[replaced.uid] = observed.bindings
    return dataclasses.replace(
        observed,
        identity=to,
        bindings=bindings,
        retired=retired,
        retire_after=retire_after,
        retired_bindings=retired_bindings,
        spares=tuple(uid for uid in observed.spares if uid != to.uid),
        replace=None,
        force_rotation=False,
    )


def fold(
    observed: Observed, action: Action, result: Result, now: datetime.datetime, grace: datetime.timedelta
) -> Observed:
    """The snapshot after ``action`` came to ``result``."""
    match action, result:
        case CreateIdentity(), Created(identity=created):
            return _switch(observed, created, (), action.replaces, now, grace)
        case TakeSpare(), Taken():
            spare = next((i for i in observed.retired if i.uid == action.uid), None)
            if spare is None:
                raise ValueError(f"{action.uid} is not a retired identity of this resource")
            bindings = observed.retired_bindings.get(spare.uid, ())
            return _switch(observed, spare, bindings, action.replaces, now, grace)
        case UpdateIdentity(), Updated(identity=updated):
            replace = None
            if action.sets_expiry:
                asked = action.identity.static_keys.expiration_time if action.identity.static_keys else None
                got = updated.static_keys.expiration_time if updated.static_keys else None
                if asked is not None and (got is None or got < asked - datetime.timedelta(seconds=1)):
                    replace = (
                        f"the API set the expiry to {got.isoformat() if got else 'nothing'} instead of "
                        f"{asked.isoformat()}"
                    )
            renewed = action.reason in ("renewal", "forced") and replace is None
            return dataclasses.replace(
                observed,
                identity=updated,
                replace=replace,
                force_rotation=observed.force_rotation and not renewed,
            )
        case UpdateIdentity(), Refused(message=message):
            return dataclasses.replace(observed, replace=f"the API refused the new expiry: {message}")
        case BindRole(), Bound(binding=binding):
            return dataclasses.replace(observed, bindings=(*observed.bindings, binding))
        case UnbindRole(), Removed():
            uid = action.binding.uid
            return dataclasses.replace(observed, bindings=tuple(b for b in observed.bindings if b.uid != uid))
        case WriteConfigMap(), Written():
            return dataclasses.replace(observed, config_map=dict(action.data))
        case DeleteConfigMap(), Removed():
            return dataclasses.replace(
                observed, stale_config_maps=tuple(n for n in observed.stale_config_maps if n != action.name)
            )
        case DeleteIdentity(), Removed():
            gone = action.uid
            return dataclasses.replace(
                observed,
                retired=tuple(i for i in observed.retired if i.uid != gone),
                spares=tuple(uid for uid in observed.spares if uid != gone),
                retire_after={uid: due for uid, due in observed.retire_after.items() if uid != gone},
                retired_bindings={uid: b for uid, b in observed.retired_bindings.items() if uid != gone},
            )
    raise ValueError(f"{type(result).__name__} is not a result of {type(action).__name__}")
