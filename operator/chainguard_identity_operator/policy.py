"""Who may manage which identity: ownership claims and the adoption rule. Pure functions, no I/O.

A tenant who may create a ``ChainguardIdentity`` in one namespace must never gain control of an identity
it did not create: not another resource's, not another cluster's, not the operator's own. Every path by
which a resource comes to manage an identity goes through here:

- **Ownership** (``claim_of``): an identity belongs to a resource only when its description's marker
  names this cluster's ID and this resource. A legacy marker (no cluster ID, from before cluster IDs) is
  accepted only for an identity the resource's own status records — never for one found by name — and
  is then rewritten in place.
- **Selection** (``select``): of the identities a resource owns in its parent, exactly one is current
  (the one its ConfigMap names unless status retired it, else the one its status records, else the
  oldest under its name); every
  other one — a duplicate left by a create whose answer was lost, a replaced identity — is retired.
  An identity ID read from status that the resource does not own is ignored, so a forged status
  gets nothing.
- **Adoption** (``adoption_refusal``): ``spec.adopt`` is a privileged act. It is honoured only in the
  namespaces a cluster admin lists (default: the operator's own); never for an identity whose marker
  names another resource or cluster; never for the operator's own identity outside the operator's
  namespace; and never for an identity holding roles outside the allow-list unless the admin allows it.
  Because adoption rewrites the marker to name the adopter, a second resource adopting the same
  identity is refused with the first one's name: one identity is never managed by two resources.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
from collections.abc import Callable, Collection, Iterable, Mapping

from chainguard_identity_operator import naming
from chainguard_identity_operator.chainguard.types import Identity, RoleBinding
from chainguard_identity_operator.jwks import JWKSError, parse_jwks, public_keys
from chainguard_identity_operator.model import SpecError
from chainguard_identity_operator.naming import Owner


class Claim(enum.Enum):
    OURS = "ours"  # the marker names this cluster ID and this resource
    LEGACY = "legacy"  # a legacy marker naming this cluster's name and this resource
    FOREIGN = "foreign"  # the marker names another resource or another cluster
    UNMARKED = "unmarked"  # no marker of this operator at all


def claim_of(identity: Identity, owner: Owner) -> Claim:
    marked = naming.parse_marker(identity.description)
    if marked is None:
        return Claim.UNMARKED
    same_object = (marked.namespace, marked.name) == (owner.namespace, owner.name)
    if marked.cluster_id is None:
        legacy = same_object and marked.cluster_name == owner.cluster_name
        return Claim.LEGACY if legacy else Claim.FOREIGN
    return Claim.OURS if same_object and marked.cluster_id == owner.cluster_id else Claim.FOREIGN


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which of the identities a resource owns it uses, and which it retires (with when they may go)."""

    current: Identity | None
    retired: tuple[Identity, ...]
    retire_after: Mapping[str, datetime.datetime]
    spares: tuple[str, ...]  # retired, never published, of the wanted name and kind: reusable
    ignored: tuple[str, ...]  # identity IDs from status the resource does not own


def _oldest_first(identity: Identity) -> tuple[datetime.datetime, str]:
    return (identity.create_time or datetime.datetime.max.replace(tzinfo=datetime.UTC), identity.uid)


def select(
    *,
    owner: Owner,
    listed: Iterable[Identity],
    recorded: Identity | None,
    recorded_retiring: Mapping[str, datetime.datetime],
    retiring_found: Iterable[Identity],
    config_map_identity: str | None,
    names: Collection[str],
    wanted_static: bool,
    now: datetime.datetime,
    grace: datetime.timedelta,
    adopted: Identity | None = None,
    legacy_ok: Callable[[Identity], bool] = lambda _identity: False,
) -> Selection:
    """Choose the current identity and the ones to retire.

    ``listed`` are the identities of the target parent; ``recorded`` the one status names (if it still
    exists); ``retiring_found`` the ones status lists as retiring that still exist (in any parent);
    ``adopted`` an identity being taken over now (already checked by ``adoption_refusal``): it becomes
    current, and whatever the resource used before is retired. ``legacy_ok`` says whether an identity
    with a legacy marker shows this cluster's evidence (``legacy_evidence``).
    """
    ignored: list[str] = []
    recorded_ids = {recorded.uid} if recorded is not None else set()
    recorded_ids |= set(recorded_retiring)

    def owned(identity: Identity) -> bool:
        claim = claim_of(identity, owner)
        # A legacy marker proves nothing by itself (another cluster may share the name), and neither
        # does status (a tenant may write it): the record and this cluster's own evidence together do.
        return claim is Claim.OURS or (
            claim is Claim.LEGACY and identity.uid in recorded_ids and legacy_ok(identity)
        )

    def _spare(identity: Identity) -> bool:
        # Never published (not recorded anywhere), and of the name and kind the resource wants.
        return (
            identity.name in names
            and identity.uid not in recorded_ids
            and (identity.static_keys is not None) == wanted_static
        )

    candidates: dict[str, Identity] = {}
    for identity in (*listed, *retiring_found, *([recorded] if recorded else [])):
        if owned(identity):
            candidates[identity.uid] = identity
        elif identity.uid in recorded_ids:
            ignored.append(identity.uid)

    if adopted is not None:
        candidates[adopted.uid] = adopted
    current = None
    published = config_map_identity if config_map_identity not in recorded_retiring else None
    if adopted is not None:
        current = adopted
    elif published is not None and published in candidates:
        # Published after the status was last written (a crash between the two): the newest truth.
        current = candidates[published]
    elif recorded is not None and recorded.uid in candidates:
        current = recorded
    else:
        by_name = [identity for identity in candidates.values() if _spare(identity)]
        if by_name:
            current = min(by_name, key=_oldest_first)

    retired = tuple(
        sorted((i for i in candidates.values() if current is None or i.uid != current.uid), key=_oldest_first)
    )
    retire_after = {identity.uid: recorded_retiring.get(identity.uid, now + grace) for identity in retired}
    return Selection(
        current=current,
        retired=retired,
        retire_after=retire_after,
        spares=tuple(i.uid for i in retired if _spare(i) and i.uid != config_map_identity),
        ignored=tuple(dict.fromkeys(ignored)),
    )


def adoption_refusal(
    *,
    owner: Owner,
    candidate: Identity,
    candidate_roles: Collection[str],
    allowed_role_ids: Collection[str],
    adoption_allowed_here: bool,
    operator_namespace: str,
    operator_identities: Collection[str],
    privileged_allowed: bool,
    managers: Mapping[str, Owner] | None = None,
    legacy_ours: bool = False,
) -> SpecError | None:
    """Why ``owner`` may not adopt ``candidate`` (None: it may).

    ``candidate_roles`` are the role UIDPs the candidate is bound to anywhere; ``allowed_role_ids`` the
    UIDPs of the operator's allow-list; ``operator_identities`` the identities the operator
    authenticates as. ``managers`` may name a resource already managing the candidate by other means.
    ``legacy_ours``: the candidate's legacy marker names this resource and ``legacy_evidence`` holds.
    """

    def refuse(message: str) -> SpecError:
        return SpecError("spec.adopt", message, reason="AdoptionRefused")

    if not adoption_allowed_here:
        return refuse(
            f"adoption is not allowed in namespace {owner.namespace}; a cluster admin lists the namespaces "
            "where spec.adopt is honoured in CGID_ADOPTION_NAMESPACES (default: the operator's own)"
        )
    own = candidate.uid in operator_identities
    if own and owner.namespace != operator_namespace:
        return refuse(
            f"identity {candidate.uid} is the operator's own; only a resource in {operator_namespace} "
            "may adopt it"
        )
    claim = claim_of(candidate, owner)
    if claim is Claim.FOREIGN or (claim is Claim.LEGACY and not legacy_ours):
        marked = naming.parse_marker(candidate.description)
        assert marked is not None
        return refuse(f"identity {candidate.uid} is managed by {marked.describe()}")
    other = (managers or {}).get(candidate.uid)
    if other is not None and (other.namespace, other.name) != (owner.namespace, owner.name):
        return refuse(f"identity {candidate.uid} is managed by {other.describe()}")
    extra = sorted(set(candidate_roles) - set(allowed_role_ids))
    if extra and not own and not privileged_allowed:
        return refuse(
            f"identity {candidate.uid} holds roles outside the allow-list ({', '.join(extra)}); a cluster "
            "admin can allow adopting it with CGID_ADOPTION_PRIVILEGED=true"
        )
    return None


def inherited_roles(
    bindings: Iterable[RoleBinding], parent: str, *, wanted: Collection[str]
) -> tuple[str, ...]:
    """The roles an adopted identity (or one of its successors) holds in ``parent`` beyond ``wanted``:
    they are kept, and given to the identities that replace it — the operator's own keeps ``owner``
    that way. Read from Chainguard's bindings only, so nothing a tenant writes can add to them."""
    return tuple(sorted({b.role_uid for b in bindings if b.group_uid == parent} - set(wanted)))


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What only this cluster can show about an identity made for it: the issuer it trusts (when no
    other cluster can share it) and the public keys this cluster signs with."""

    issuer: str
    issuer_unique: bool  # a public issuer (GKE, EKS, ...) names one cluster; kubernetes.default.svc names any
    public_keys: frozenset[str]  # canonical JSON of each key of this cluster's last good JWKS


def legacy_evidence(identity: Identity, owner: Owner, evidence: Evidence | None) -> bool | None:
    """Whether an identity with a legacy marker (no cluster ID) was made for this cluster: its trust is
    this cluster's — a static identity holding a key this cluster signs with, for this issuer and a
    service account of the resource's namespace; a claim-match one trusting this cluster's own public
    issuer. None when it cannot be told (the cluster's keys are not known right now)."""
    subject_prefix = f"system:serviceaccount:{owner.namespace}:"
    static = identity.static_keys
    if static is not None:
        if evidence is None or not evidence.public_keys:
            return None
        try:
            registered = public_keys(parse_jwks(static.issuer_keys))
        except JWKSError:
            return False
        return (
            static.issuer == evidence.issuer
            and static.subject.startswith(subject_prefix)
            and bool(registered & evidence.public_keys)
        )
    claim = identity.claim_match
    if claim is not None:
        if evidence is None:
            return None
        return (
            evidence.issuer_unique
            and claim.issuer == evidence.issuer
            and claim.subject.startswith(subject_prefix)
        )
    return False


def parent_refusal(parent: str, allowed: Collection[str], field: str) -> SpecError | None:
    """Why identities may not be made in ``parent`` (None: they may). ``allowed`` are the groups a
    cluster admin lists in CGID_ALLOWED_PARENTS — each with its folders; empty allows any group."""
    if not allowed or any(parent == group or parent.startswith(group + "/") for group in allowed):
        return None
    return SpecError(
        field,
        f"the operator makes identities only in {', '.join(sorted(allowed))} (CGID_ALLOWED_PARENTS), not in {parent}",
        reason="ParentNotAllowed",
    )
