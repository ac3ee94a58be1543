"""One reconcile pass for one ``ChainguardIdentity``: observe, decide, act, fold; then patch what changed.

``reconcile`` is the only code path for create, update, resume, resync and scheduled renewal. It reads
what Chainguard and the cluster hold, lets ``policy`` say which identities the resource owns and which
one it uses, asks ``decide`` for the next action, performs it, hands the result to ``decide.fold``, and
repeats until ``decide`` says ``Done``. Its own ``if``s are about I/O only; every choice of what to do,
and of what the conditions say (``health``), is made by pure functions the tests reach without I/O.

A pass never raises for a bad spec or a failing API: it returns an ``Outcome`` whose health becomes the
conditions, and the caller schedules the next pass (sooner, with backoff, after a transient failure).
A write whose answer was lost (``OutcomeUnknown``) ends the pass and forgets the parent's listing, so
the next pass looks at what really happened before it writes again. The status patch carries only the
fields that changed, and a pass that changed nothing writes nothing.

``finalize`` runs on deletion: it removes every identity the resource owns — the current one, the ones
being retired, duplicates — with their role bindings, unless the policy is ``Orphan`` (which keeps the
current one), and only identities whose marker names this resource, checked on a fresh read.

Messages that reach status, events and logs are built from API error messages and our own text — never
from request headers — so no token can leak through them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from chainguard_identity_operator import health as healths
from chainguard_identity_operator import naming, policy
from chainguard_identity_operator.access import (
    AccessAction,
    AccessDone,
    AccessObserved,
    AccessResult,
    AccessTarget,
    Checked,
    DeletePullSecret,
    Listed,
    ListPullSecret,
    PullSecretFacts,
    RefreshFailed,
    SecretDeleted,
    SecretWritten,
    VerifyExchange,
    WritePullSecret,
    access_conditions,
    access_retry,
    config_json,
    decide_access,
    digest,
    fold_access,
    required_role,
    secret_annotations,
    token_expiry,
)
from chainguard_identity_operator.chainguard.auth import API_AUDIENCE
from chainguard_identity_operator.chainguard.client import ChainguardClient
from chainguard_identity_operator.chainguard.errors import (
    AlreadyExists,
    APIError,
    ChainguardError,
    InvalidArgument,
)
from chainguard_identity_operator.chainguard.sts import STSClient
from chainguard_identity_operator.chainguard.types import Identity, RoleBinding, format_time
from chainguard_identity_operator.cluster import (
    ClusterClient,
    ClusterFactsCache,
    ConfigMapState,
    ObjectRef,
    ServiceAccountState,
)
from chainguard_identity_operator.cluster_errors import ClusterError, ConfigMapConflict, SecretConflict
from chainguard_identity_operator.conditions import (
    EXCHANGE_VERIFIED,
    PULL_SECRET_READY,
    Health,
    Phase,
    build_conditions,
)
from chainguard_identity_operator.config import Settings
from chainguard_identity_operator.decide import (
    Action,
    BindRole,
    Bound,
    Created,
    CreateIdentity,
    DeleteConfigMap,
    DeleteIdentity,
    Done,
    Observed,
    Refused,
    Removed,
    Result,
    Rotation,
    Taken,
    TakeSpare,
    Target,
    UnbindRole,
    Updated,
    UpdateIdentity,
    WriteConfigMap,
    Written,
    build_target,
    decide,
    fold,
    forced_rotation,
    issuer_is_public,
    registered_fingerprint,
    renewal_due_at,
    resolve_mode,
)
from chainguard_identity_operator.directory import Directory
from chainguard_identity_operator.health import AccessNotGranted, Failure, KeysUnavailable, NoConvergence
from chainguard_identity_operator.jwks import KeySet, parse_jwks, public_keys
from chainguard_identity_operator.model import UIDP, IdentitySpec, Mode, SpecError, parse_spec
from chainguard_identity_operator.naming import Owner
from chainguard_identity_operator.status import (
    BindingRecord,
    Condition,
    ExchangeRecord,
    IdentityStatus,
    PullSecretRecord,
    Retiring,
    RotationPending,
    status_patch,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

ROTATE_ANNOTATION = "iam.chainguard.dev/rotate"
MAX_STEPS = 32  # a pass that needs more actions than this has a bug; it stops rather than spin
MAX_RETIRING = 20  # of the identities status lists as retiring, at most this many are looked at
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
    status: IdentityStatus
    patch: Mapping[str, Any]  # what changed in status; empty when nothing did
    events: tuple[Event, ...]
    wake_at: datetime.datetime | None  # a scheduled change (renewal); None: the resync interval applies
    retry_after: float | None = None  # set for transient failures: run again after this many seconds
    transient: bool = False
    rotated: str | None = None  # why keys, expiry or ID changed in this pass (renewal, keys-changed, ...)


class _Lookups:
    """Role and organization lookups change rarely: each answer is cached for ``LOOKUP_TTL``, and a
    lookup already under way is shared (single flight) — a thousand resources starting at once ask
    for ``registry.pull`` once, not a thousand times."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[datetime.datetime, Any]] = {}
        self._flights: dict[tuple[str, str], asyncio.Task[tuple[bool, Any]]] = {}

    async def once(self, kind: str, key: str, now: datetime.datetime, fetch: Callable[[], Awaitable[T]]) -> T:
        entry = self._entries.get((kind, key))
        if entry is not None and now - entry[0] <= LOOKUP_TTL:
            value: T = entry[1]
            return value
        flight = self._flights.get((kind, key))
        if flight is None:
            # A task of its own, not the first caller's: that caller's pass may be cancelled (its resource
            # deleted) while others wait on the answer, and they must get the answer, not its cancellation.
            flight = asyncio.ensure_future(self._fly(kind, key, now, fetch))
            self._flights[(kind, key)] = flight
        ok, result = await asyncio.shield(flight)  # one caller's cancellation is its own
        if not ok:
            failure, traceback = result
            # Each waiter raises the one exception: from its original traceback, so that the frames of
            # every waiter before it do not pile up on it.
            raise failure.with_traceback(traceback)
        answer: T = result
        return answer

    async def _fly(
        self, kind: str, key: str, now: datetime.datetime, fetch: Callable[[], Awaitable[T]]
    ) -> tuple[bool, Any]:
        """The fetch, with its failure as the result: a task ending in an exception nobody awaits any more
        is one kopf re-raises at exit."""
        try:
            result = await fetch()
        except Exception as exc:
            return False, (exc, exc.__traceback__)
        else:
            self._entries[(kind, key)] = (now, result)
            return True, result
        finally:
            del self._flights[(kind, key)]


@dataclasses.dataclass
class Context:
    settings: Settings
    chainguard: ChainguardClient
    cluster: ClusterClient
    facts: ClusterFactsCache
    clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC)
    # The cluster ID ownership markers carry (the kube-system namespace UID unless set); read at start.
    cluster_id: str | None = None
    # The identities the operator authenticates as now: never deleted, never stripped of a binding.
    own_identities: Callable[[], frozenset[str]] = frozenset
    # The STS, for the exchanges of the resources' service accounts (pull secrets, checks).
    sts: STSClient | None = None
    # Told when a ConfigMap in the operator's namespace names an identity (its own may have moved on).
    on_published: Callable[[str, str, str], None] = lambda _namespace, _name, _identity: None
    lookups: _Lookups = dataclasses.field(default_factory=_Lookups)
    directory: Directory = dataclasses.field(init=False)
    # Which resource manages which identity, as this process saw it last: closes the window in which two
    # resources could both adopt an identity before either has marked it.
    managers: dict[str, Owner] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # Listings live half a resync: every resource of a parent resyncs from one listing.
        ttl = self.settings.resync_interval / 2
        self.directory = Directory(self.chainguard, ttl=ttl, clock=self.clock)

    def owner(self, ref: ObjectRef) -> Owner:
        if self.cluster_id is None:
            raise RuntimeError("the cluster ID was not read at start")
        return Owner(self.settings.cluster_name, self.cluster_id, ref.namespace, ref.name)


# ---------------------------------------------------------------------------------------------------
# Resolution of names to UIDPs


async def resolve_parent(ctx: Context, spec: IdentitySpec, now: datetime.datetime) -> str:
    if spec.parent is not None:
        return spec.parent
    name = spec.parent_name
    assert name is not None
    answer = await ctx.lookups.once("groups", name, now, lambda: ctx.chainguard.find_groups(name))
    groups = [g for g in answer if g.name == name]
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
    return (preferred or groups)[0].uid


async def _groups_named(ctx: Context, name: str) -> set[str]:
    answer = await ctx.lookups.once("groups", name, ctx.clock(), lambda: ctx.chainguard.find_groups(name))
    return {group.uid for group in answer if group.name == name}


async def resolve_role(ctx: Context, role: str, parent: str, now: datetime.datetime) -> str | None:
    """A role name (or UIDP) as the UIDP bound in ``parent``; None when no such role exists."""
    if UIDP.fullmatch(role):
        return role
    answer = await ctx.lookups.once("roles", role, now, lambda: ctx.chainguard.find_roles(role))
    found = [r for r in answer if r.name == role]
    # Prefer the built-in role; a custom role counts only if it is defined in the parent or above.
    builtin = [r for r in found if r.builtin]
    custom = [r for r in found if not r.builtin and (parent + "/").startswith(r.uid.rsplit("/", 1)[0] + "/")]
    candidates = builtin or custom
    return candidates[0].uid if candidates else None


async def resolve_roles(
    ctx: Context, spec: IdentitySpec, parent: str, now: datetime.datetime
) -> dict[str, str]:
    resolved: dict[str, str] = {}
    for index, role in enumerate(spec.roles):
        uid = await resolve_role(ctx, role, parent, now)
        if uid is None:
            raise SpecError(f"spec.roles[{index}]", f"no role named {role!r} exists", reason="RoleNotFound")
        resolved[role] = uid
    return resolved


async def _allowed_role_ids(ctx: Context, parent: str, now: datetime.datetime) -> set[str]:
    found = [await resolve_role(ctx, role, parent, now) for role in ctx.settings.allowed_roles]
    return {uid for uid in found if uid is not None}


# ---------------------------------------------------------------------------------------------------
# Observing


@dataclasses.dataclass
class _Snapshot:
    """What a pass observed, before any action."""

    observed: Observed
    config_map: ConfigMapState | None
    adopted: str | None  # the spec.adopt value acted on (what status records)
    adopting: Identity | None  # an identity taken over in this pass
    rotation: Rotation  # what the rotate annotation asks of this pass
    ignored: tuple[str, ...]  # identity IDs status named that this resource does not own
    name: str  # the identity's name (the deterministic one, or an adopted identity's)
    account: ServiceAccountState | None = None  # the resource's service account; None when it is missing


async def _existing(ctx: Context, uids: Iterable[str]) -> list[Identity]:
    """The identities of these IDs that exist. The listing answers first; one it does not show is looked
    up, because a listing is no proof of absence — one paged while others delete skips live objects —
    and an identity known by ID must not be forgotten (leaked) or made again on a listing's word."""
    found = []
    for uid in uids:
        identity = await ctx.directory.identity(uid)
        if identity is None:
            identity = await ctx.chainguard.get_identity(uid)
            if identity is not None:
                ctx.directory.put_identity(identity)  # the listing missed it: it holds it from now on
        if identity is not None:
            found.append(identity)
    return found


async def _observe(
    ctx: Context,
    resource: Resource,
    spec: IdentitySpec,
    previous: IdentityStatus,
    owner: Owner,
    parent: str,
    issuer: str,
    role_ids: Mapping[str, str],
    now: datetime.datetime,
    evidence: policy.Evidence | None,
) -> _Snapshot:
    settings = ctx.settings
    listed = await ctx.directory.marked(parent, owner.namespace, owner.name)
    # Status is the tenant's to write: only identities under this resource's parents are looked at, and
    # only a few, so a forged list costs the API nothing worth mentioning.
    parents = {parent, *([previous.parent] if previous.parent else [])}

    def plausible(uid: str | None) -> bool:
        return uid is not None and uid.rsplit("/", 1)[0] in parents

    recorded_id = previous.identity_id if plausible(previous.identity_id) else None
    recorded = (await _existing(ctx, [recorded_id]))[0:1] if recorded_id else []
    recorded_retiring = {
        r.identity_id: r.delete_after for r in previous.retiring[:MAX_RETIRING] if plausible(r.identity_id)
    }
    retiring_found = await _existing(ctx, recorded_retiring)

    def legacy_ok(identity: Identity) -> bool:
        verdict = policy.legacy_evidence(identity, owner, evidence)
        if verdict is None:
            raise KeysUnavailable(
                f"identity {identity.uid} carries a marker from before cluster IDs; telling whether it is "
                "this cluster's needs the cluster's keys, which cannot be read right now"
            )
        return verdict

    config_map = await ctx.cluster.read_config_map(resource.ref, spec.config_map_name)
    if config_map is not None and not config_map.owned:
        raise ConfigMapConflict(
            f"ConfigMap {resource.ref.namespace}/{spec.config_map_name} exists and is not owned by this "
            "ChainguardIdentity; delete it or set spec.configMap.name"
        )
    published = config_map.data.get("CHAINGUARD_IDENTITY") if config_map is not None else None
    candidate = (await _existing(ctx, [spec.adopt]))[0:1] if spec.adopt else []
    deterministic = naming.identity_name(settings.cluster_name, spec.namespace, spec.name)
    names = {deterministic, *(i.name for i in candidate), *(i.name for i in recorded)}
    # An adopting resource's kind follows what it adopted (and, once that is gone, its successor).
    lineage = (candidate or recorded)[0] if spec.adopt and (candidate or recorded) else None
    mode = resolve_mode(spec, spec.issuer or issuer, settings, lineage)

    def choose(adopted: Identity | None) -> policy.Selection:
        return policy.select(
            owner=owner,
            listed=listed,
            recorded=recorded[0] if recorded else None,
            recorded_retiring=recorded_retiring,
            retiring_found=retiring_found,
            config_map_identity=published,
            names=names,
            wanted_static=mode is Mode.STATIC,
            now=now,
            grace=settings.replacement_grace,
            adopted=adopted,
            legacy_ok=legacy_ok,
        )

    selection = choose(None)
    adopted_value, adopting = previous.adopted, None
    candidate_bindings: list[RoleBinding] = []
    # status.adopted is only a record: an identity it names that is not (or no longer) ours is adopted
    # afresh — through the refusal check — so a forged record buys nothing.
    recorded_adoption = spec.adopt == previous.adopted and (
        not candidate or policy.claim_of(candidate[0], owner) is policy.Claim.OURS
    )
    # Adopted before ``status.adopted`` existed: status records the identity, which carries this
    # resource's legacy marker and this cluster's evidence (``select`` checked both). It goes through the
    # adoption rule again — where it may be adopted, what roles it may hold — with that marker as ours.
    adopted_before = (
        spec.adopt is not None
        and spec.adopt == previous.identity_id
        and previous.adopted is None
        and selection.current is not None
        and selection.current.uid == spec.adopt
    )
    if spec.adopt is not None and not recorded_adoption:
        current = selection.current
        if not candidate:
            if current is None:
                raise SpecError(
                    "spec.adopt",
                    f"identity {spec.adopt} does not exist in Chainguard",
                    reason="AdoptTargetNotFound",
                )
            adopted_value = spec.adopt  # taken over and since replaced: the status recording it was lost
        elif (
            current is not None
            and current.uid != spec.adopt
            and policy.claim_of(candidate[0], owner) is policy.Claim.OURS
        ):
            adopted_value = spec.adopt  # ours already, and superseded by ``current``
        else:
            adopting = candidate[0]
            candidate_bindings = await ctx.chainguard.list_role_bindings(identity=adopting.uid)
            refusal = policy.adoption_refusal(
                owner=owner,
                candidate=adopting,
                candidate_roles={b.role_uid for b in candidate_bindings},
                allowed_role_ids=await _allowed_role_ids(ctx, parent, now),
                adoption_allowed_here=settings.adoption_allowed_in(owner.namespace),
                operator_namespace=settings.operator_namespace,
                operator_identities={
                    *ctx.own_identities(),
                    *([settings.identity] if settings.identity else []),
                },
                privileged_allowed=settings.adoption_privileged,
                managers=ctx.managers,
                legacy_ours=adopted_before,
            )
            if refusal is not None:
                raise refusal
            # Claimed before any await, so a second resource's pass in this process sees the claim
            # even before the marker is written.
            ctx.managers[adopting.uid] = owner
            adopted_value = spec.adopt
            selection = choose(adopting)
    current = selection.current
    bindings = await ctx.directory.bindings(current) if current is not None else ()
    retired_bindings = {old.uid: await ctx.directory.bindings(old) for old in selection.retired}
    inherited: tuple[str, ...] = ()
    if spec.adopt is not None and adopted_value == spec.adopt:
        # Roles an adopted identity held are kept and handed to its successors. They are read from
        # Chainguard — the identities of the lineage and what they are bound to — never from status,
        # which a tenant may write: status only takes away (a role the operator bound for a spec role
        # the spec no longer names is not inherited, it is unbound).
        held = [*candidate_bindings, *bindings, *(b for bs in retired_bindings.values() for b in bs)]
        made = {record.role_id for record in previous.role_bindings}
        inherited = policy.inherited_roles(held, parent, wanted={*role_ids.values(), *made})
    own = ctx.own_identities()
    stale: tuple[str, ...] = ()
    if previous.config_map_name and previous.config_map_name != spec.config_map_name:
        stale = (previous.config_map_name,)
    rotation = forced_rotation(
        request=resource.rotation_request,
        done=previous.rotation_request,
        pending=(previous.rotation_pending.request, previous.rotation_pending.identity_updated_at)
        if previous.rotation_pending is not None
        else None,
        identity_updated_at=_updated_at(current),
    )
    account = await ctx.cluster.read_service_account(spec.namespace, spec.service_account_name)
    return _Snapshot(
        observed=Observed(
            identity=current,
            bindings=bindings,
            config_map=config_map.data if config_map is not None else None,
            stale_config_maps=stale,
            retired=selection.retired,
            spares=selection.spares,
            retired_bindings=retired_bindings,
            retire_after=selection.retire_after,
            force_rotation=rotation is Rotation.DUE and mode is Mode.STATIC,
            inherited_roles=inherited,
            protected=own,
        ),
        config_map=config_map,
        adopted=adopted_value,
        adopting=adopting,
        rotation=rotation,
        ignored=selection.ignored,
        name=(adopting.name if adopting else current.name if current is not None else deterministic),
        account=account,
    )


def _evidence(issuer: str, keys: KeySet | None, settings: Settings) -> policy.Evidence:
    """This cluster's evidence for identities with a legacy marker (without keys while they are unknown)."""
    return policy.Evidence(
        issuer=issuer,
        issuer_unique=issuer_is_public(issuer, settings),
        public_keys=public_keys(keys) if keys is not None else frozenset(),
    )


def _observation_events(previous: IdentityStatus, snapshot: _Snapshot) -> list[Event]:
    """What a person should hear about what a pass found before it did anything."""
    events = [
        Event("LeftAlone", f"status names identity {uid}, which this resource does not own; left alone", True)
        for uid in snapshot.ignored
    ]
    current = snapshot.observed.identity
    if current is not None and current.uid != previous.identity_id and snapshot.adopting is None:
        found = f"found identity {current.uid} ({current.name}), made by this resource earlier"
        events.append(Event("Adopted", found))
    known = {r.identity_id for r in previous.retiring}
    events.extend(
        Event("Retiring", f"identity {old.uid} ({old.name}) is this resource's but unused: deleting it")
        for old in snapshot.observed.retired
        if old.uid not in known
    )
    return events


def _updated_at(identity: Identity | None) -> str:
    if identity is None or identity.update_time is None:
        return ""
    return identity.update_time.isoformat()


# ---------------------------------------------------------------------------------------------------
# Acting


@dataclasses.dataclass
class _Pass:
    """Mutable state of one pass: the snapshot ``decide`` reads and what happened along the way."""

    resource: Resource
    spec: IdentitySpec
    observed: Observed
    config_map: ConfigMapState | None
    now: datetime.datetime
    events: list[Event] = dataclasses.field(default_factory=list)
    rotated: str | None = None  # why the identity's keys, expiry or ID changed in this pass
    rotation_done: bool = False
    checkpoint: dict[str, Any] = dataclasses.field(default_factory=dict)  # status written mid-pass
    access: AccessObserved | None = None  # the pull secret and exchange check, once the identity is done
    access_target: AccessTarget | None = None


async def _perform(ctx: Context, state: _Pass, action: Action) -> Result:
    """Perform one action against Chainguard or the cluster; what it came to. Failures raise."""
    ref = state.resource.ref
    match action:
        case CreateIdentity():
            created = await ctx.chainguard.create_identity(action.parent, action.identity)
            ctx.directory.put_identity(created)
            return Created(created)
        case TakeSpare():
            return Taken()
        case UpdateIdentity():
            if action.reason == "forced":
                # The checkpoint needs the identity's updateTime as it is now, not as a listing of
                # minutes ago has it: an edit since then would pass for this write after a crash.
                fresh = await ctx.chainguard.get_identity(action.uid)
                if fresh is None:
                    raise ChainguardError(f"identity {action.uid} is gone; it is made again next")
                state.observed = dataclasses.replace(state.observed, identity=fresh)
                await _checkpoint_rotation(ctx, state, action)
            try:
                updated = await ctx.chainguard.update_identity(action.uid, action.identity, action.mask)
            except InvalidArgument as exc:
                if not action.sets_expiry:
                    raise
                return Refused(exc.message)
            ctx.directory.put_identity(updated)
            return Updated(updated)
        case BindRole():
            try:
                binding = await ctx.chainguard.create_role_binding(
                    action.parent, identity=action.identity, role=action.role_id
                )
            except AlreadyExists:
                # What we meant to create exists (an earlier answer was lost): it is ours to use.
                found = await ctx.chainguard.find_role_binding(
                    action.parent, identity=action.identity, role=action.role_id
                )
                if found is None:
                    raise
                binding = found
            ctx.directory.put_binding(binding)
            return Bound(binding)
        case UnbindRole():
            await ctx.chainguard.delete_role_binding(action.binding.uid)
            ctx.directory.drop_binding(action.binding.uid)
            return Removed()
        case WriteConfigMap():
            await ctx.cluster.write_config_map(ref, action.name, action.data, state.config_map)
            state.config_map = ConfigMapState(data=dict(action.data), owned=True)
            return Written()
        case DeleteConfigMap():
            await ctx.cluster.delete_config_map(ref, action.name)
            return Removed()
        case DeleteIdentity():
            await _delete_identity(ctx, action.uid, action.bindings)
            return Removed()
    raise AssertionError(f"{type(action).__name__} is not performed")


async def _delete_identity(ctx: Context, uid: str, bindings: Iterable[str]) -> None:
    for binding in bindings:
        await ctx.chainguard.delete_role_binding(binding)
        ctx.directory.drop_binding(binding)
    await ctx.chainguard.delete_identity(uid)
    ctx.directory.drop_identity(uid)


async def _checkpoint_rotation(ctx: Context, state: _Pass, action: UpdateIdentity) -> None:
    """Record a forced rotation before writing it, with the identity's updateTime: after a crash, the
    next pass can tell whether the write happened (see ``decide.forced_rotation``)."""
    request = state.resource.rotation_request
    assert request is not None
    pending = RotationPending(request=request, identity_updated_at=_updated_at(state.observed.identity))
    patch = {
        "rotationPending": {"request": pending.request, "identityUpdatedAt": pending.identity_updated_at}
    }
    await ctx.cluster.patch_status(state.resource.ref, patch)
    state.checkpoint.update(patch)  # the end-of-pass patch is computed against the status as it now is


def _event(action: Action, result: Result) -> Event | None:
    """The event an action's result is worth (None: nothing a person needs to see)."""
    match action, result:
        case CreateIdentity(), Created(identity=created):
            verb = f"replacing {action.replaces}" if action.replaces else f"in {action.parent}"
            return Event("Created", f"created identity {created.uid} ({created.name}) {verb}")
        case TakeSpare(), Taken():
            what = f"to replace {action.replaces}" if action.replaces else "left by an earlier pass"
            return Event("Adopted", f"using identity {action.uid} {what}")
        case UpdateIdentity(), Updated(identity=updated):
            if action.reason == "adopt":
                return Event("Adopted", f"took over identity {updated.uid} ({updated.name})")
            if action.reason == "migrate":
                return Event(
                    "Migrated", f"identity {updated.uid} now carries this cluster's ownership marker"
                )
            if action.reason in ("renewal", "keys-changed", "forced"):
                expiry = updated.static_keys.expiration_time if updated.static_keys else None
                until = f" until {format_time(expiry)}" if expiry else ""
                return Event("Rotated", f"updated identity {updated.uid} in place ({action.reason}){until}")
            return Event("Updated", f"corrected identity {updated.uid}: {', '.join(action.mask)}")
        case UpdateIdentity(), Refused(message=message):
            return Event("RotatingByReplacement", f"in-place renewal refused: {message}")
        case BindRole(), Bound():
            return Event("RoleBound", f"bound role {action.role} in {action.parent}")
        case UnbindRole(), Removed():
            return Event("RoleUnbound", f"removed role binding {action.binding.uid}")
        case WriteConfigMap(), Written():
            return Event(
                "ConfigMapWritten", f"ConfigMap {action.name} names {action.data['CHAINGUARD_IDENTITY']}"
            )
        case DeleteConfigMap(), Removed():
            return Event(
                "ConfigMapDeleted", f"deleted ConfigMap {action.name}, no longer in spec.configMap.name"
            )
        case DeleteIdentity(), Removed():
            return Event("Deleted", f"deleted identity {action.uid} ({action.reason})")
    return None


def _rotation_reason(action: Action, result: Result) -> str | None:
    if isinstance(action, CreateIdentity | TakeSpare) and action.replaces is not None:
        return "replacement"
    rotating = isinstance(action, UpdateIdentity) and action.reason in ("renewal", "keys-changed", "forced")
    if rotating and isinstance(result, Updated):
        assert isinstance(action, UpdateIdentity)
        return action.reason
    return None


# ---------------------------------------------------------------------------------------------------
# Access: the pull secret and the exchange check (access.py decides)


def _needs_access(ctx: Context, spec: IdentitySpec, previous: IdentityStatus) -> bool:
    """Whether a resource turned a feature on, or has something of one left to undo."""
    verify = spec.verify_exchange if spec.verify_exchange is not None else ctx.settings.verify_exchange
    return spec.pull_secret is not None or verify or previous.pull_secret is not None


def _access_retry(state: _Pass | None) -> bool:
    if state is None or state.access is None or state.access_target is None:
        return False
    return access_retry(state.access_target, state.access)


def access_health(target: AccessTarget, observed: AccessObserved, now: datetime.datetime) -> Health | None:
    """What keeps a resource whose identity is in shape from Ready (None: nothing)."""
    record = observed.exchange
    if target.verify and record is not None and not record.ok:
        message = (
            f"a token of {target.namespace}/{target.service_account} does not exchange: {record.message}"
        )
        return Health(Phase.PROGRESSING, "ExchangeFailed", message)
    if target.pull_secret is not None and observed.refresh_failed is not None:
        expires = token_expiry(observed.secret)
        if expires is None or expires <= now:
            message = f"Secret {target.pull_secret.name} holds no valid token: {observed.refresh_failed}"
            return Health(Phase.PROGRESSING, "PullSecretExpired", message)
    return None


async def _access(
    ctx: Context,
    state: _Pass,
    spec: IdentitySpec,
    account: ServiceAccountState,
    previous: IdentityStatus,
    now: datetime.datetime,
) -> datetime.datetime | None:
    """The access phase of a pass: observe, decide, act, fold, like the identity's. Its wake-up time."""
    identity = state.observed.identity
    assert identity is not None
    ref = state.resource.ref
    target = AccessTarget(
        namespace=spec.namespace,
        service_account=spec.service_account_name,
        registry=ctx.settings.registry,
        pull_secret=spec.pull_secret,
        verify=spec.verify_exchange if spec.verify_exchange is not None else ctx.settings.verify_exchange,
        verify_interval=ctx.settings.verify_interval,
    )
    state.access_target = target
    try:
        secret = None
        if spec.pull_secret is not None:
            found = await ctx.cluster.read_secret(ref, spec.pull_secret.name)
            if found is not None and not found.owned:
                raise SecretConflict(
                    f"Secret {ref.namespace}/{spec.pull_secret.name} exists and is not owned by this "
                    "ChainguardIdentity; delete it or set spec.pullSecret.name"
                )
            if found is not None:
                secret = PullSecretFacts(annotations=found.annotations, config_digest=digest(found.config))
        recorded = previous.pull_secret
        stale = (
            ()
            if recorded is None or (spec.pull_secret and recorded.name == spec.pull_secret.name)
            else (recorded.name,)
        )
        observed = AccessObserved(
            identity_id=identity.uid,
            identity_updated_at=_updated_at(identity),
            secret=secret,
            stale_secrets=stale,
            account_pull_secrets=account.pull_secrets,
            attached_to=recorded.attached_to if recorded is not None else None,
            exchange=previous.exchange,
        )
        state.access = observed
        for _ in range(MAX_STEPS):
            action = decide_access(target, observed, now)
            if isinstance(action, AccessDone):
                return action.wake_at
            result = await _perform_access(ctx, state, target, action, now)
            observed = state.access = fold_access(observed, result)
            event = _access_event(action, result)
            if event is not None:
                state.events.append(event)
        raise NoConvergence(f"the pull secret and exchange check did not settle in {MAX_STEPS} steps")
    except ClusterError as exc:
        if exc.status != 403:
            raise
        role = required_role(
            namespace=spec.namespace,
            service_account=spec.service_account_name,
            pull_secret=spec.pull_secret,
            operator_namespace=ctx.settings.operator_namespace,
            operator_service_account=ctx.settings.operator_service_account,
            resource=ref.name,
        )
        raise AccessNotGranted(
            f"{exc}; spec.pullSecret and spec.verifyExchange need this Role in {spec.namespace} (apply it with "
            f"kubectl apply -f -): {json.dumps({'apiVersion': 'v1', 'kind': 'List', 'items': role})}"
        ) from None


async def _perform_access(
    ctx: Context, state: _Pass, target: AccessTarget, action: AccessAction, now: datetime.datetime
) -> AccessResult:
    ref = state.resource.ref
    spec = state.spec
    identity = state.observed.identity
    assert identity is not None
    match action:
        case WritePullSecret():
            try:
                subject = await ctx.cluster.request_token(
                    spec.namespace, spec.service_account_name, audience=spec.audience
                )
                exchanged = await _sts(ctx).exchange(subject, audience=target.registry, identity=identity.uid)
            except ChainguardError as exc:
                # The old token (if any) keeps serving; the condition and a Warning event say why.
                return RefreshFailed(exc.message if isinstance(exc, APIError) else str(exc))
            config = config_json(target.registry, exchanged.token)
            notes = secret_annotations(
                registry=target.registry,
                identity_id=identity.uid,
                identity_updated_at=_updated_at(identity),
                expires_at=exchanged.expiry,
                config=config,
            )
            current = await ctx.cluster.read_secret(ref, action.name)
            await ctx.cluster.write_secret(ref, action.name, config, notes, current)
            return SecretWritten(name=action.name, annotations=notes)
        case DeletePullSecret():
            await ctx.cluster.delete_secret(ref, action.name)
            return SecretDeleted(name=action.name)
        case ListPullSecret():
            await ctx.cluster.set_image_pull_secret(
                spec.namespace, action.account, action.name, listed=action.listed
            )
            return Listed(account=action.account, name=action.name, listed=action.listed)
        case VerifyExchange():
            subject = await ctx.cluster.request_token(
                spec.namespace, spec.service_account_name, audience=spec.audience
            )
            try:
                await _sts(ctx).exchange(subject, audience=API_AUDIENCE, identity=identity.uid)
            except APIError as exc:
                if exc.transient:
                    raise  # the STS is down or busy: that says nothing about the identity
                record = ExchangeRecord(
                    identity.uid, _updated_at(identity), now, ok=False, message=exc.message
                )
            else:
                record = ExchangeRecord(identity.uid, _updated_at(identity), now, ok=True, message="")
            return Checked(record)
    raise AssertionError(f"{type(action).__name__} is not performed")


def _sts(ctx: Context) -> STSClient:
    if ctx.sts is None:
        raise ChainguardError("the operator has no STS client for the service accounts' exchanges")
    return ctx.sts


def _access_event(action: AccessAction, result: AccessResult) -> Event | None:
    match action, result:
        case WritePullSecret(), SecretWritten(annotations=notes):
            until = notes.get("iam.chainguard.dev/token-expires-at", "")
            return Event(
                "PullSecretWritten", f"Secret {action.name} holds a new token until {until} ({action.reason})"
            )
        case WritePullSecret(), RefreshFailed(message=message):
            return Event(
                "PullSecretRefreshFailing", f"refreshing Secret {action.name} failed: {message}", True
            )
        case DeletePullSecret(), SecretDeleted():
            return Event("PullSecretDeleted", f"deleted Secret {action.name}, no longer in spec.pullSecret")
        case ListPullSecret(), Listed():
            verb = "added to" if action.listed else "removed from"
            return Event(
                "PullSecretListed", f"Secret {action.name} {verb} the imagePullSecrets of {action.account}"
            )
        case VerifyExchange(), Checked(record=record):
            if record.ok:
                return Event(
                    "ExchangeVerified", f"a token of the service account exchanged for {record.identity_id}"
                )
            return Event(
                "ExchangeFailed", f"a token of the service account does not exchange: {record.message}", True
            )
    return None


# ---------------------------------------------------------------------------------------------------
# The pass


async def reconcile(ctx: Context, resource: Resource) -> Outcome:
    now = ctx.clock()
    previous = IdentityStatus.from_dict(resource.status)
    owner = ctx.owner(resource.ref)
    spec: IdentitySpec | None = None
    target: Target | None = None
    state: _Pass | None = None
    snapshot: _Snapshot | None = None
    parent: str | None = None
    failure: Failure | None = None
    wake_at = None
    notes: list[Event] = []
    try:
        spec = parse_spec(resource.ref.namespace, resource.ref.name, resource.spec, ctx.settings)
        facts = await ctx.facts.get()
        parent = await resolve_parent(ctx, spec, now)
        refusal = policy.parent_refusal(
            parent, ctx.settings.allowed_parents, "spec.parent" if spec.parent else "spec.parentName"
        )
        if refusal is not None:
            raise refusal
        role_ids = await resolve_roles(ctx, spec, parent, now)
        keys = facts.usable_keys(now, ctx.settings.jwks_max_staleness)
        evidence = _evidence(spec.issuer or facts.issuer, keys, ctx.settings)
        snapshot = await _observe(
            ctx, resource, spec, previous, owner, parent, facts.issuer, role_ids, now, evidence
        )
        notes.extend(_observation_events(previous, snapshot))
        adopted = snapshot.adopting or (snapshot.observed.identity if snapshot.adopted else None)
        target = build_target(
            spec,
            owner=owner,
            parent=parent,
            issuer=facts.issuer,
            keys=keys,
            settings=ctx.settings,
            role_ids=role_ids,
            adopted=snapshot.adopting,
            lineage=snapshot.observed.identity if spec.adopt is not None else None,
            name=snapshot.name if adopted is not None else None,
        )
        if target.mode is Mode.STATIC and target.keys is None:
            raise KeysUnavailable(facts.keys_problem(now, ctx.settings.jwks_max_staleness))
        if snapshot.rotation is Rotation.DUE and target.mode is Mode.CLAIM_MATCH:
            notes.append(
                Event(
                    "RotationIgnored",
                    f"{ROTATE_ANNOTATION}={resource.rotation_request}: a ClaimMatch identity has no keys or "
                    "expiry to rotate; nothing was done",
                )
            )
        state = _Pass(
            resource=resource, spec=spec, observed=snapshot.observed, config_map=snapshot.config_map, now=now
        )
        await _run(ctx, target, state)
        published = (state.observed.config_map or {}).get("CHAINGUARD_IDENTITY")
        if published and resource.ref.namespace == ctx.settings.operator_namespace:
            # Every pass, not only when written: if the answer to that write was lost, the operator
            # must still follow its own identity to where the ConfigMap says it went.
            ctx.on_published(resource.ref.namespace, target.config_map_name, published)
        wake_at = _wake_at(target, state.observed, now)
        if snapshot.account is None:
            failure = healths.service_account_missing(spec.namespace, spec.service_account_name)
        elif _needs_access(ctx, spec, previous):
            access_wake = await _access(ctx, state, spec, snapshot.account, previous, now)
            wake_at = min((w for w in (wake_at, access_wake) if w is not None), default=None)
    except healths.FAILURES as exc:
        failure = healths.classify(exc, operator_identity=ctx.settings.identity)
    if state is not None and state.observed.identity is not None:
        ctx.managers[state.observed.identity.uid] = owner
    health = _health(failure, target, state, previous, spec, now)
    status = next_status(
        previous,
        resource=resource,
        spec=spec,
        target=target,
        state=state,
        snapshot=snapshot,
        health=health,
        now=now,
    )
    events = [*notes, *(state.events if state is not None else [])]
    before = previous.condition("Ready")
    changed = before is None or (before.reason, before.message) != (health.reason, health.message)
    if health.phase is not Phase.READY and changed:
        events.append(Event(health.reason, health.message, warning=True))
    if changed:
        logger.info(
            "%s/%s: %s %s: %s",
            resource.ref.namespace,
            resource.ref.name,
            health.phase.value,
            health.reason,
            health.message,
        )
    return Outcome(
        health=health,
        status=status,
        patch=status_patch({**resource.status, **(state.checkpoint if state is not None else {})}, status),
        events=tuple(events),
        wake_at=wake_at,
        retry_after=failure.retry_after if failure is not None else None,
        transient=failure.transient if failure is not None else _access_retry(state),
        rotated=state.rotated if state is not None else None,
    )


async def _run(ctx: Context, target: Target, state: _Pass) -> None:
    for _ in range(MAX_STEPS):
        action = decide(target, state.observed, state.now)
        if isinstance(action, Done):
            return
        logger.debug(
            "%s/%s: %s", state.resource.ref.namespace, state.resource.ref.name, type(action).__name__
        )
        was_forced = state.observed.force_rotation
        try:
            result = await _perform(ctx, state, action)
        except BaseException as exc:
            # Its outcome unknown, or cancelled in flight (kopf stops a worker when its object is
            # deleted): the write may have committed, so nothing may trust the listing of before it —
            # not the next pass, not the finalizer about to run. An API's error answer proves nothing
            # happened.
            if not isinstance(exc, APIError):
                ctx.directory.invalidate(target.parent)
            raise
        state.observed = fold(state.observed, action, result, state.now, ctx.settings.replacement_grace)
        if was_forced and not state.observed.force_rotation:
            state.rotation_done = True
        state.rotated = _rotation_reason(action, result) or state.rotated
        event = _event(action, result)
        if event is not None:
            state.events.append(event)
    raise NoConvergence(f"the reconcile did not converge in {MAX_STEPS} steps; please report this")


def _wake_at(target: Target, observed: Observed, now: datetime.datetime) -> datetime.datetime | None:
    done = decide(target, observed, now)
    return done.wake_at if isinstance(done, Done) else None


def _health(
    failure: Failure | None,
    target: Target | None,
    state: _Pass | None,
    previous: IdentityStatus,
    spec: IdentitySpec | None,
    now: datetime.datetime,
) -> Health:
    if failure is None:
        assert target is not None
        assert state is not None
        assert state.observed.identity is not None
        identity = state.observed.identity
        expires = identity.static_keys.expiration_time if identity.static_keys is not None else None
        if state.access is not None and state.access_target is not None:
            blocked = access_health(state.access_target, state.access, now)
            if blocked is not None:
                return blocked
        return healths.ready(identity.uid, target.mode.value, len(target.role_ids), expires)
    expires = previous.expires_at
    if state is not None and state.observed.identity is not None and state.observed.identity.static_keys:
        expires = state.observed.identity.static_keys.expiration_time or expires
    renew_before = spec.static.renew_before if spec is not None else None
    return healths.expiry_emergency(failure.health, expires, renew_before, now)


# ---------------------------------------------------------------------------------------------------
# The status a pass leaves


def next_status(
    previous: IdentityStatus,
    *,
    resource: Resource,
    spec: IdentitySpec | None,
    target: Target | None,
    state: _Pass | None,
    snapshot: _Snapshot | None,
    health: Health,
    now: datetime.datetime,
) -> IdentityStatus:
    """The status a pass leaves. Fields it learned nothing about keep their recorded value."""
    status = previous
    identity = state.observed.identity if state is not None else None
    if target is not None and state is not None and snapshot is not None and identity is not None:
        observed = state.observed
        static = identity.static_keys
        fingerprint = registered_fingerprint(static) if static is not None else None
        key_ids = parse_jwks(static.issuer_keys).key_ids if static is not None and fingerprint else ()
        marked = policy.claim_of(identity, _owner_of(target)) is policy.Claim.OURS
        status = dataclasses.replace(
            status,
            identity_id=identity.uid,
            identity_name=identity.name,
            mode=target.mode.value,
            issuer=target.issuer,
            subject=target.subject,
            audience=target.audience,
            parent=target.parent,
            key_fingerprint=fingerprint,
            key_ids=key_ids,
            expires_at=static.expiration_time if static is not None else None,
            renew_at=renewal_due_at(static.expiration_time, target.static)
            if static is not None and static.expiration_time is not None
            else None,
            last_rotated_at=now if state.rotated else previous.last_rotated_at,
            role_bindings=tuple(
                BindingRecord(role=role, role_id=role_id, binding_id=binding.uid)
                for role, role_id in target.role_ids.items()
                for binding in observed.bindings
                if binding.role_uid == role_id and binding.group_uid == target.parent
            ),
            inherited_roles=observed.inherited_roles,
            # Adoption is on record only once the identity carries our marker: until then, the next
            # pass must take it over again, not forget it.
            adopted=snapshot.adopted if marked else previous.adopted,
            # The old name is forgotten only once its ConfigMap is gone: if deleting it fails, the
            # next pass must still know to try again.
            config_map_name=target.config_map_name
            if observed.config_map is not None and not observed.stale_config_maps
            else previous.config_map_name,
            retiring=tuple(
                Retiring(old.uid, observed.retire_after.get(old.uid, now)) for old in observed.retired
            ),
        )
    elif snapshot is not None and identity is None and previous.identity_id in snapshot.ignored:
        status = dataclasses.replace(status, identity_id=None)  # never keep pointing at another's identity
    if snapshot is not None and target is not None:
        acted = (
            snapshot.rotation is Rotation.WRITTEN
            or (state is not None and state.rotation_done)
            or (snapshot.rotation is Rotation.DUE and target.mode is Mode.CLAIM_MATCH)  # nothing to rotate
        )
        if acted:
            status = dataclasses.replace(
                status, rotation_request=resource.rotation_request, rotation_pending=None
            )
    if health.reason == "AdoptionRefused":
        status = dataclasses.replace(status, adopted=None)  # a refused adoption is never on record
    extra: dict[str, tuple[str, str, str]] = {}
    if state is not None and state.access is not None and state.access_target is not None:
        access, access_target = state.access, state.access_target
        extra = access_conditions(access_target, access, now)
        spec_secret = access_target.pull_secret
        status = dataclasses.replace(
            status,
            pull_secret=PullSecretRecord(
                name=spec_secret.name, expires_at=token_expiry(access.secret), attached_to=access.attached_to
            )
            if spec_secret is not None
            else None
            if not access.stale_secrets and access.attached_to is None
            else status.pull_secret,
            exchange=access.exchange if access_target.verify else None,
        )
    elif status.pull_secret is not None or status.exchange is not None:
        # Kept while the pass could not look (it failed earlier): what was written still stands.
        extra = {
            c.type: (c.status, c.reason, c.message)
            for c in previous.conditions
            if c.type in (PULL_SECRET_READY, EXCHANGE_VERIFIED)
        }
    conditions = build_conditions(
        [c.to_dict() for c in previous.conditions],
        health,
        generation=resource.generation,
        now_text=format_time(now),
        extra=extra,
    )
    return dataclasses.replace(
        status,
        observed_generation=resource.generation,
        conditions=tuple(c for c in (Condition.from_dict(item) for item in conditions) if c),
    )


def _owner_of(target: Target) -> Owner:
    owner = naming.parse_marker(target.description)
    assert owner is not None
    return owner


async def apply(ctx: Context, resource: Resource) -> Outcome:
    """Reconcile, then post the events and patch what changed in status: the whole pass as the handler
    runs it. Events first: whoever waits for the status (``kubectl wait --for=condition=Ready``, a GitOps
    health check, the bench) then finds the pass's story already told, not still being posted."""
    outcome = await reconcile(ctx, resource)
    for event in outcome.events:
        await ctx.cluster.post_event(
            resource.ref, warning=event.warning, reason=event.reason, message=event.message
        )
    if outcome.patch:
        await ctx.cluster.patch_status(resource.ref, outcome.patch)
    return outcome


# ---------------------------------------------------------------------------------------------------
# Deletion


class DeletionBlocked(Exception):
    """The finalizer cannot finish; the message says what a person can do. Retried with backoff."""

    def __init__(self, message: str, *, transient: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after


async def finalize(ctx: Context, resource: Resource) -> Sequence[Event]:
    """Delete what the resource owns (keeping the current identity under ``Orphan``).

    Raises ``DeletionBlocked`` (after nothing or part was deleted) to be retried.
    """
    previous = IdentityStatus.from_dict(resource.status)
    owner = ctx.owner(resource.ref)
    orphan = resource.spec.get("deletionPolicy") == "Orphan"
    parents = {
        uid
        for uid in (previous.parent, resource.spec.get("parent"))
        if isinstance(uid, str) and UIDP.fullmatch(uid)
    }
    parent_name = resource.spec.get("parentName")
    recorded = {
        uid
        for uid in (previous.identity_id, *(r.identity_id for r in previous.retiring[:MAX_RETIRING]))
        if uid and uid.rsplit("/", 1)[0] in parents
    }
    events: list[Event] = []
    try:
        if (
            isinstance(parent_name, str)
            and parent_name
            and not resource.spec.get("parent")
            and not previous.parent
        ):
            # status.parent is written at the end of a pass: a resource deleted during its first pass
            # (or after a crash between the create and the status patch) names its parent only here. Every
            # group of that name is looked under; the markers decide what is this resource's.
            parents |= await _groups_named(ctx, parent_name)
        listed = [
            identity
            for parent in sorted(parents)
            for identity in await ctx.directory.marked(parent, owner.namespace, owner.name)
        ]
        owned: dict[str, Identity] = {}
        evidence: policy.Evidence | None = None
        for identity in [*listed, *await _existing(ctx, recorded)]:
            claim = policy.claim_of(identity, owner)
            if claim is policy.Claim.LEGACY and identity.uid in recorded:
                if evidence is None:
                    facts = await ctx.facts.get()
                    keys = facts.usable_keys(ctx.clock(), ctx.settings.jwks_max_staleness)
                    issuer = resource.spec.get("issuer") or facts.issuer
                    evidence = _evidence(str(issuer), keys, ctx.settings)
                verdict = policy.legacy_evidence(identity, owner, evidence)
                if verdict is None:
                    raise KeysUnavailable(
                        "the cluster's keys are needed to tell whether a legacy identity is ours"
                    )
                if verdict:
                    owned[identity.uid] = identity
            elif claim is policy.Claim.OURS:
                owned[identity.uid] = identity
        keep = {previous.identity_id} if orphan and previous.identity_id else set()
        protected = ctx.own_identities() | ({ctx.settings.identity} if ctx.settings.identity else set())
        for uid in sorted(owned):
            if uid in keep:
                events.append(
                    Event("Orphaned", f"left identity {uid} in Chainguard (deletionPolicy: Orphan)")
                )
                continue
            if uid in protected:
                events.append(
                    Event(
                        "LeftAlone",
                        f"identity {uid} is the one the operator authenticates as; not deleting it",
                        True,
                    )
                )
                continue
            # Decide on a fresh read: the listing may be minutes old, and ownership must be certain.
            fresh = await ctx.chainguard.get_identity(uid)
            if fresh is None:
                ctx.directory.drop_identity(uid)
                continue
            claim = policy.claim_of(fresh, owner)
            legacy = claim is policy.Claim.LEGACY and policy.legacy_evidence(fresh, owner, evidence) is True
            if not (claim is policy.Claim.OURS or legacy):
                events.append(
                    Event(
                        "LeftAlone", f"identity {uid} is not marked as this resource's; not deleting it", True
                    )
                )
                continue
            bindings = await ctx.chainguard.list_role_bindings(identity=uid)
            await _delete_identity(ctx, uid, [b.uid for b in bindings])
            events.append(Event("Deleted", f"deleted identity {uid} and its role bindings"))
    except healths.FAILURES as exc:
        failure = healths.classify(exc, operator_identity=ctx.settings.identity)
        for parent in parents:
            ctx.directory.invalidate(parent)
        if orphan:
            # Orphan lets the resource go whatever happens: what could not be cleaned up stays, said once.
            left = f"could not delete this resource's retired identities: {failure.health.message}"
            return [*events, Event("Orphaned", f"{left}; they are left in Chainguard", True)]
        message = (
            f"cannot delete the Chainguard identities of this resource: {failure.health.message}; it is "
            "retried with backoff (set spec.deletionPolicy: Orphan to let it go without them)"
        )
        raise DeletionBlocked(message, transient=failure.transient, retry_after=failure.retry_after) from None
    for uid in [uid for uid, manager in ctx.managers.items() if manager == owner]:
        del ctx.managers[uid]
    events.extend(await _detach_on_delete(ctx, resource, previous))
    return events


async def _detach_on_delete(ctx: Context, resource: Resource, previous: IdentityStatus) -> list[Event]:
    """The imagePullSecrets entry the operator added goes with the resource (the Secret itself is
    garbage-collected through its owner reference). Best effort: a dangling entry only makes the kubelet
    warn, so it never holds up the deletion."""
    record = previous.pull_secret
    account = resource.spec.get("serviceAccountName") or "default"
    if record is None or record.attached_to is None or not isinstance(account, str):
        return []
    try:
        await ctx.cluster.set_image_pull_secret(
            resource.ref.namespace, account, record.attached_to, listed=False
        )
    except ClusterError as exc:
        return [
            Event("PullSecretListed", f"could not remove {record.attached_to} from {account}: {exc}", True)
        ]
    return [
        Event(
            "PullSecretListed", f"Secret {record.attached_to} removed from the imagePullSecrets of {account}"
        )
    ]


def deletion_blocked_status(resource: Resource, message: str, now: datetime.datetime) -> Mapping[str, Any]:
    """The status patch that says why a deletion cannot finish (empty when it says so already)."""
    previous = IdentityStatus.from_dict(resource.status)
    health = Health(Phase.STALLED, "DeletionBlocked", message)
    conditions = build_conditions(
        [c.to_dict() for c in previous.conditions],
        health,
        generation=resource.generation,
        now_text=format_time(now),
    )
    before = [c.to_dict() for c in previous.conditions]
    return {} if before == conditions else {"conditions": conditions}
