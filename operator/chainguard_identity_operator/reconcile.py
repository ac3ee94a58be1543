"""One reconcile pass for one ``ChainguardIdentity``: observe, decide, act, then patch status once.

``reconcile`` is the only code path for create, update, resume, resync and scheduled renewal: it reads
what Chainguard and the cluster hold, asks ``decide`` for the next action, performs it, folds the result
into what it observed, and repeats until ``decide`` says ``Done``. It never raises for a bad spec or a
failing API: it returns an ``Outcome`` whose health becomes the conditions, and the caller schedules
the next pass (sooner, with backoff, after a transient failure).

``finalize`` runs on deletion: it removes the identity and its role bindings unless the policy is
``Orphan``, and only when the identity's description proves this object owns it.

Messages that reach status, events and logs are built from API error messages and our own text — never
from request headers — so no token can leak through them.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from chainguard_identity_operator import naming
from chainguard_identity_operator.chainguard.client import ChainguardClient
from chainguard_identity_operator.chainguard.errors import (
    APIError,
    ChainguardError,
    InvalidArgument,
    PermissionDenied,
)
from chainguard_identity_operator.chainguard.types import Identity, RoleBinding, format_time
from chainguard_identity_operator.cluster import (
    ClusterClient,
    ClusterError,
    ClusterFactsCache,
    ConfigMapConflict,
    ObjectRef,
)
from chainguard_identity_operator.conditions import Health, Phase, build_conditions
from chainguard_identity_operator.config import Settings
from chainguard_identity_operator.decide import (
    Action,
    BindRole,
    CreateIdentity,
    DeleteIdentity,
    Done,
    Observed,
    Target,
    UnbindRole,
    UpdateIdentity,
    WriteConfigMap,
    build_target,
    decide,
    renewal_due_at,
)
from chainguard_identity_operator.directory import Directory
from chainguard_identity_operator.model import UIDP, IdentitySpec, Mode, RecordedStatus, SpecError, parse_spec

logger = logging.getLogger(__name__)

ROTATE_ANNOTATION = "iam.chainguard.dev/rotate"
MAX_STEPS = 32  # a pass that needs more actions than this has a bug; it stops rather than spin
LOOKUP_TTL = datetime.timedelta(minutes=10)


@dataclasses.dataclass(frozen=True)
class Event:
    reason: str
    message: str
    warning: bool = False


@dataclasses.dataclass(frozen=True)
class Resource:
    """The ``ChainguardIdentity`` as the handler saw it."""

    ref: ObjectRef
    generation: int
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def rotation_request(self) -> str | None:
        return self.annotations.get(ROTATE_ANNOTATION) or None


@dataclasses.dataclass(frozen=True)
class Outcome:
    health: Health
    status: Mapping[str, Any]
    events: tuple[Event, ...]
    wake_at: datetime.datetime | None  # a scheduled change (renewal); None: the resync interval applies
    retry_after: float | None = None  # set for transient failures: run again after this many seconds
    transient: bool = False
    rotated: str | None = None  # why keys or expiry changed in this pass (renewal, keys-changed, ...)


class _Lookups:
    """Role and organization lookups change rarely; cache them so a resync costs no extra API calls."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[datetime.datetime, Any]] = {}

    def get(self, kind: str, key: str, now: datetime.datetime) -> Any:
        entry = self._entries.get((kind, key))
        if entry is None or now - entry[0] > LOOKUP_TTL:
            return None
        return entry[1]

    def put(self, kind: str, key: str, value: Any, now: datetime.datetime) -> None:
        self._entries[(kind, key)] = (now, value)


@dataclasses.dataclass
class Context:
    settings: Settings
    chainguard: ChainguardClient
    cluster: ClusterClient
    facts: ClusterFactsCache
    clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC)
    lookups: _Lookups = dataclasses.field(default_factory=_Lookups)
    directory: Directory = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        # Listings live half a resync: every resource of a parent resyncs from one listing.
        ttl = self.settings.resync_interval / 2
        self.directory = Directory(self.chainguard, ttl=ttl, clock=self.clock)


# ---------------------------------------------------------------------------------------------------
# Resolution of names to UIDPs


async def resolve_parent(ctx: Context, spec: IdentitySpec, now: datetime.datetime) -> str:
    if spec.parent is not None:
        return spec.parent
    assert spec.parent_name is not None
    cached = ctx.lookups.get("group", spec.parent_name, now)
    if isinstance(cached, str):
        return cached
    groups = [g for g in await ctx.chainguard.find_groups(spec.parent_name) if g.name == spec.parent_name]
    if not groups:
        raise SpecError(
            "spec.parentName",
            f"no organization named {spec.parent_name!r} is visible to the operator",
            reason="ParentNotFound",
        )
    # Names are not unique: a verified root group is the organization people mean.
    preferred = [g for g in groups if g.verified and "/" not in g.uid] or [
        g for g in groups if "/" not in g.uid
    ]
    if len(preferred) != 1 and len(groups) != 1:
        raise SpecError(
            "spec.parentName",
            f"{len(groups)} groups are named {spec.parent_name!r}; set spec.parent to the UIDP instead",
            reason="ParentAmbiguous",
        )
    uid = (preferred or groups)[0].uid
    ctx.lookups.put("group", spec.parent_name, uid, now)
    return uid


async def resolve_roles(
    ctx: Context, spec: IdentitySpec, parent: str, now: datetime.datetime
) -> dict[str, str]:
    resolved: dict[str, str] = {}
    for index, role in enumerate(spec.roles):
        if UIDP.fullmatch(role):
            resolved[role] = role
            continue
        cached = ctx.lookups.get("role", f"{parent}:{role}", now)
        if isinstance(cached, str):
            resolved[role] = cached
            continue
        found = [r for r in await ctx.chainguard.find_roles(role) if r.name == role]
        # Prefer the built-in role; a custom role counts only if it is defined in the parent or above.
        builtin = [r for r in found if r.builtin]
        custom = [
            r for r in found if not r.builtin and (parent + "/").startswith(r.uid.rsplit("/", 1)[0] + "/")
        ]
        candidates = builtin or custom
        if not candidates:
            raise SpecError(f"spec.roles[{index}]", f"no role named {role!r} exists", reason="RoleNotFound")
        ctx.lookups.put("role", f"{parent}:{role}", candidates[0].uid, now)
        resolved[role] = candidates[0].uid
    return resolved


# ---------------------------------------------------------------------------------------------------
# The pass


@dataclasses.dataclass
class _Pass:
    """Mutable state of one pass: the snapshot ``decide`` reads and what happened along the way."""

    observed: Observed
    now: datetime.datetime
    events: list[Event] = dataclasses.field(default_factory=list)
    rotated: str | None = None  # why the identity's keys or expiry changed in this pass


def _owns(ctx: Context, resource: Resource, identity: Identity) -> bool:
    return naming.is_owned_by(
        identity.description, ctx.settings.cluster_name, resource.ref.namespace, resource.ref.name
    )


async def _observe(
    ctx: Context, resource: Resource, spec: IdentitySpec, recorded: RecordedStatus, now: datetime.datetime
) -> tuple[Identity | None, Identity | None, tuple[Identity, ...], dict[str, datetime.datetime]]:
    """The identity this resource manages now, the adopted one (if any), ours to retire and when."""
    retire_after = dict(recorded.retiring)
    identity = None
    retired: tuple[Identity, ...] = ()
    for uid, _when in recorded.retiring:
        old = await ctx.directory.identity(uid)
        if old is not None:
            retired += (old,)
    if recorded.identity_id is not None:
        identity = await ctx.directory.identity(recorded.identity_id)
    adopted = None
    if spec.adopt is not None:
        if identity is not None and identity.uid == spec.adopt:
            adopted = identity
        else:
            adopted = await ctx.directory.identity(spec.adopt)
            if adopted is None:
                raise SpecError(
                    "spec.adopt",
                    f"identity {spec.adopt} does not exist in Chainguard",
                    reason="AdoptTargetNotFound",
                )
            if identity is not None and _owns(ctx, resource, identity):
                retired += (identity,)
                retire_after[identity.uid] = now + ctx.settings.replacement_grace
            identity = adopted
    return identity, adopted, retired, retire_after


async def _bindings(ctx: Context, identity: Identity | None) -> tuple[RoleBinding, ...]:
    if identity is None:
        return ()
    return await ctx.directory.bindings(identity)


async def _create(ctx: Context, resource: Resource, action: CreateIdentity, state: _Pass) -> None:
    """Create the identity — after looking its name up, so a crash never leaves a duplicate."""
    replaced = state.observed.identity
    found = [
        candidate
        for candidate in await ctx.chainguard.list_identities(action.parent, name=action.identity.name)
        if _owns(ctx, resource, candidate)
        and candidate.uid != action.replaces
        and candidate.uid not in {old.uid for old in state.observed.retired}
        and (candidate.static_keys is None) == (action.identity.static_keys is None)
    ]
    found.sort(
        key=lambda item: (item.create_time or datetime.datetime.max.replace(tzinfo=datetime.UTC), item.uid)
    )
    if found:
        identity, duplicates = found[0], tuple(found[1:])
        state.events.append(
            Event("Adopted", f"found identity {identity.uid} ({identity.name}) left by an earlier pass")
        )
        bindings = await _bindings(ctx, identity)
    else:
        identity = await ctx.chainguard.create_identity(action.parent, action.identity)
        ctx.directory.put_identity(identity)
        duplicates = ()
        bindings = ()
        state.events.append(
            Event("Created", f"created identity {identity.uid} ({identity.name}) in {action.parent}")
        )
    retired = state.observed.retired + duplicates
    retire_after = dict(state.observed.retire_after)
    grace_ends = state.now + ctx.settings.replacement_grace
    for duplicate in duplicates:
        retire_after[duplicate.uid] = grace_ends
    if replaced is not None:
        state.rotated = "replacement"
        if _owns(ctx, resource, replaced):
            retired += (replaced,)
            retire_after[replaced.uid] = grace_ends
        else:
            state.events.append(
                Event(
                    "LeftAlone",
                    f"identity {replaced.uid} is not marked as owned by this object; not deleting it",
                )
            )
    state.observed = dataclasses.replace(
        state.observed,
        identity=identity,
        bindings=bindings,
        retired=retired,
        retire_after=retire_after,
        in_place_rejected=False,
        force_rotation=False,
    )


async def _update(ctx: Context, action: UpdateIdentity, state: _Pass) -> None:
    try:
        identity = await ctx.chainguard.update_identity(action.uid, action.identity, action.mask)
        ctx.directory.put_identity(identity)
    except InvalidArgument as exc:
        if not any(path.startswith("static_keys") for path in action.mask):
            raise
        # The API would not extend this identity in place (e.g. past its creation time + maximum
        # lifetime): rotate by replacement instead.
        state.events.append(Event("RotatingByReplacement", f"in-place update refused: {exc.message}"))
        state.observed = dataclasses.replace(state.observed, in_place_rejected=True)
        return
    if action.reason in ("renewal", "keys-changed", "forced"):
        state.rotated = action.reason
        state.observed = dataclasses.replace(state.observed, force_rotation=False)
        expiry = identity.static_keys.expiration_time if identity.static_keys else None
        until = f" until {format_time(expiry)}" if expiry else ""
        state.events.append(
            Event("Rotated", f"updated identity {identity.uid} in place ({action.reason}){until}")
        )
    elif action.reason == "adopt":
        state.events.append(Event("Adopted", f"took over identity {identity.uid} ({identity.name})"))
    else:
        state.events.append(Event("Updated", f"corrected identity {identity.uid}: {', '.join(action.mask)}"))
    state.observed = dataclasses.replace(state.observed, identity=identity)


async def _delete_identity(ctx: Context, uid: str) -> None:
    for binding in await ctx.chainguard.list_role_bindings(identity=uid):
        await ctx.chainguard.delete_role_binding(binding.uid)
    await ctx.chainguard.delete_identity(uid)
    ctx.directory.drop_identity(uid)


async def _act(ctx: Context, resource: Resource, spec: IdentitySpec, action: Action, state: _Pass) -> None:
    observed = state.observed
    match action:
        case CreateIdentity():
            await _create(ctx, resource, action, state)
        case UpdateIdentity():
            await _update(ctx, action, state)
        case BindRole():
            binding = await ctx.chainguard.create_role_binding(
                action.parent, identity=action.identity, role=action.role_id
            )
            ctx.directory.put_binding(binding)
            state.observed = dataclasses.replace(observed, bindings=(*observed.bindings, binding))
            state.events.append(Event("RoleBound", f"bound role {action.role} in {action.parent}"))
        case UnbindRole():
            await ctx.chainguard.delete_role_binding(action.binding.uid)
            ctx.directory.drop_binding(action.binding.uid)
            remaining = tuple(b for b in observed.bindings if b.uid != action.binding.uid)
            state.observed = dataclasses.replace(observed, bindings=remaining)
            state.events.append(Event("RoleUnbound", f"removed role binding {action.binding.uid}"))
        case WriteConfigMap():
            await ctx.cluster.write_config_map(resource.ref, spec.config_map_name, action.data)
            state.observed = dataclasses.replace(observed, config_map=dict(action.data))
            state.events.append(
                Event(
                    "ConfigMapWritten",
                    f"ConfigMap {spec.config_map_name} names {action.data['CHAINGUARD_IDENTITY']}",
                )
            )
        case DeleteIdentity():
            await _delete_identity(ctx, action.uid)
            state.observed = dataclasses.replace(
                observed, retired=tuple(i for i in observed.retired if i.uid != action.uid)
            )
            state.events.append(Event("Deleted", f"deleted identity {action.uid} ({action.reason})"))
        case Done():  # pragma: no cover - the loop stops before acting on Done
            pass


def _status(
    resource: Resource,
    recorded: RecordedStatus,
    target: Target | None,
    state: _Pass | None,
    spec: IdentitySpec | None,
    health: Health,
    now: datetime.datetime,
) -> dict[str, Any]:
    """The whole status this pass writes. Fields it learned nothing about keep their recorded value."""
    previous = dict(resource.status)
    status: dict[str, Any] = {key: value for key, value in previous.items() if key not in ("kopf",)}
    identity = state.observed.identity if state is not None else None
    if target is not None and identity is not None and state is not None:
        static = identity.static_keys
        status.update(
            identityId=identity.uid,
            identityName=identity.name,
            mode=target.mode.value,
            issuer=target.issuer,
            subject=target.subject,
            audience=target.audience,
            parent=target.parent,
            roleBindings=[
                {"role": role, "roleId": role_id, "bindingId": binding.uid}
                for role, role_id in target.role_ids.items()
                for binding in state.observed.bindings
                if binding.role_uid == role_id and binding.group_uid == target.parent
            ],
        )
        if static is not None and target.keys is not None:
            status["keys"] = {"fingerprint": target.keys.fingerprint, "keyIds": list(target.keys.key_ids)}
            if static.expiration_time is not None:
                status["expiresAt"] = format_time(static.expiration_time)
                status["renewAt"] = format_time(renewal_due_at(static.expiration_time, target.static))
        else:
            for key in ("keys", "expiresAt", "renewAt"):
                status.pop(key, None)
        if state.rotated:
            status["lastRotatedAt"] = format_time(now)
        if state.observed.config_map is not None and spec is not None:
            status["configMapName"] = spec.config_map_name
        if state.observed.retired:
            status["retiring"] = [
                {
                    "identityId": old.uid,
                    "deleteAfter": format_time(state.observed.retire_after.get(old.uid, now)),
                }
                for old in state.observed.retired
            ]
        else:
            status.pop("retiring", None)
        if health.phase is Phase.READY and resource.rotation_request is not None:
            status["rotationRequest"] = resource.rotation_request
    status["observedGeneration"] = resource.generation
    status["conditions"] = build_conditions(
        recorded.conditions, health, generation=resource.generation, now_text=format_time(now)
    )
    return status


def _failure_health(exc: Exception) -> tuple[Health, bool, float | None]:
    """(health, transient, retry_after) for an exception that ended a pass."""
    if isinstance(exc, SpecError):
        return Health(Phase.STALLED, exc.reason, str(exc)), False, None
    if isinstance(exc, ConfigMapConflict):
        return Health(Phase.STALLED, "ConfigMapConflict", str(exc)), False, None
    if isinstance(exc, PermissionDenied):
        message = f"Chainguard denied the operator: {exc.message}; grant its identity a role in the parent"
        return Health(Phase.STALLED, "PermissionDenied", message), True, None
    if isinstance(exc, InvalidArgument):
        return (
            Health(Phase.STALLED, "ChainguardRejected", f"Chainguard rejected the request: {exc.message}"),
            False,
            None,
        )
    if isinstance(exc, ChainguardError):
        text = exc.message if isinstance(exc, APIError) else str(exc)
        return Health(Phase.PROGRESSING, "ChainguardUnavailable", f"retrying: {text}"), True, exc.retry_after
    if isinstance(exc, ClusterError):
        return Health(Phase.PROGRESSING, "ClusterUnavailable", f"retrying: {exc}"), True, None
    raise exc


async def reconcile(ctx: Context, resource: Resource) -> Outcome:
    now = ctx.clock()
    recorded = RecordedStatus.from_status(resource.status)
    spec: IdentitySpec | None = None
    target: Target | None = None
    state: _Pass | None = None
    wake_at = None
    transient = False
    retry_after = None
    try:
        spec = parse_spec(resource.ref.namespace, resource.ref.name, resource.spec, ctx.settings)
        facts = await ctx.facts.get()
        parent = await resolve_parent(ctx, spec, now)
        role_ids = await resolve_roles(ctx, spec, parent, now)
        identity, adopted, retired, retire_after = await _observe(ctx, resource, spec, recorded, now)
        target = build_target(
            spec, parent=parent, facts=facts, settings=ctx.settings, role_ids=role_ids, adopted=adopted
        )
        if target.mode is Mode.STATIC and target.keys is None:
            raise ClusterError(ctx.facts.keys_error or "the cluster's JWKS is not available")
        config_map = await ctx.cluster.read_config_map(resource.ref, spec.config_map_name)
        if config_map is not None and not config_map.owned:
            raise ConfigMapConflict(
                f"ConfigMap {resource.ref.namespace}/{spec.config_map_name} exists and is not owned by this "
                "ChainguardIdentity; delete it or set spec.configMap.name"
            )
        if identity is None and recorded.identity_id is not None:
            state_events = [
                Event("IdentityMissing", f"identity {recorded.identity_id} is gone; recreating", True)
            ]
        else:
            state_events = []
        bindings = await _bindings(ctx, identity)
        foreign: frozenset[str] = frozenset()
        if adopted is not None:
            recorded_ids = {b.binding_id for b in recorded.role_bindings}
            foreign = frozenset(b.uid for b in bindings if b.uid not in recorded_ids)
        state = _Pass(
            observed=Observed(
                identity=identity,
                bindings=bindings,
                foreign_bindings=foreign,
                config_map=config_map.data if config_map is not None else None,
                retired=retired,
                retire_after=retire_after,
                force_rotation=resource.rotation_request not in (None, recorded.rotation_request),
            ),
            now=now,
            events=state_events,
        )
        for _ in range(MAX_STEPS):
            action = decide(target, state.observed, now)
            if isinstance(action, Done):
                wake_at = action.wake_at
                break
            logger.debug("%s/%s: %s", resource.ref.namespace, resource.ref.name, type(action).__name__)
            await _act(ctx, resource, spec, action, state)
        else:
            raise RuntimeError(f"reconcile did not converge in {MAX_STEPS} steps")
        health = Health(Phase.READY, "IdentityReady", _ready_message(target, state.observed))
    except (SpecError, ConfigMapConflict, ChainguardError, ClusterError) as exc:
        health, transient, retry_after = _failure_health(exc)
        health = _expiry_emergency(health, recorded, spec, now)
    events = list(state.events) if state is not None else []
    previous_ready = next((c for c in recorded.conditions if c.get("type") == "Ready"), None)
    unchanged = previous_ready is not None and (
        previous_ready.get("reason"),
        previous_ready.get("message"),
    ) == (
        health.reason,
        health.message,
    )
    if health.phase is not Phase.READY and not unchanged:
        events.append(Event(health.reason, health.message, warning=True))
    status = _status(resource, recorded, target, state, spec, health, now)
    return Outcome(
        health=health,
        status=status,
        events=tuple(events),
        wake_at=wake_at,
        retry_after=retry_after,
        transient=transient,
        rotated=state.rotated if state is not None else None,
    )


def _expiry_emergency(
    health: Health, recorded: RecordedStatus, spec: IdentitySpec | None, now: datetime.datetime
) -> Health:
    """A failing pass past the renewal time is an emergency: say how long the identity has left."""
    if health.phase is Phase.READY or recorded.expires_at is None or spec is None:
        return health
    if now < recorded.expires_at - spec.static.renew_before:
        return health
    left = recorded.expires_at - now
    if left <= datetime.timedelta(0):
        message = f"the identity EXPIRED at {format_time(recorded.expires_at)} and could not be renewed: "
    else:
        hours = int(left.total_seconds() // 3600)
        message = f"renewal is failing and the identity expires in {hours // 24}d{hours % 24}h: "
    return Health(health.phase, "RenewalFailing", message + health.message)


def _ready_message(target: Target, observed: Observed) -> str:
    assert observed.identity is not None
    text = f"identity {observed.identity.uid} ({target.mode.value}) has {len(target.role_ids)} role(s) bound"
    static = observed.identity.static_keys
    if static is not None and static.expiration_time is not None:
        text += f"; keys valid until {format_time(static.expiration_time)}"
    return text


async def apply(ctx: Context, resource: Resource) -> Outcome:
    """Reconcile, then write the status and post the events: the whole pass as the handler runs it."""
    outcome = await reconcile(ctx, resource)
    # A merge patch: fields this pass dropped (retiring, keys after a switch to ClaimMatch) need null.
    dropped = {key: None for key in resource.status if key not in outcome.status and key != "kopf"}
    await ctx.cluster.patch_status(resource.ref, {**dropped, **outcome.status})
    for event in outcome.events:
        await ctx.cluster.post_event(
            resource.ref, warning=event.warning, reason=event.reason, message=event.message
        )
    return outcome


# ---------------------------------------------------------------------------------------------------
# Deletion


async def finalize(ctx: Context, resource: Resource) -> Sequence[Event]:
    """Delete the identity and its bindings unless orphaned; raises ChainguardError to be retried."""
    recorded = RecordedStatus.from_status(resource.status)
    if resource.spec.get("deletionPolicy") == "Orphan":
        if recorded.identity_id:
            return [
                Event(
                    "Orphaned", f"left identity {recorded.identity_id} in Chainguard (deletionPolicy: Orphan)"
                )
            ]
        return []
    if recorded.identity_id is None:
        return []
    identity = await ctx.chainguard.get_identity(recorded.identity_id)
    if identity is None:
        return [Event("Deleted", f"identity {recorded.identity_id} was already gone")]
    if not _owns(ctx, resource, identity):
        return [
            Event(
                "LeftAlone",
                f"identity {identity.uid} is not marked as owned by this object; not deleting it",
                warning=True,
            )
        ]
    await _delete_identity(ctx, identity.uid)
    return [Event("Deleted", f"deleted identity {identity.uid} and its role bindings")]
