"""Who may manage which identity: selection of the current identity, and the adoption rule.

Every way a tenant could come to control an identity it did not create goes through ``policy``; these
tests try each as a hostile tenant would, without I/O.
"""

from __future__ import annotations

import dataclasses
import datetime

import pytest

from chainguard_identity_operator.chainguard.types import ClaimMatch, Identity, RoleBinding
from chainguard_identity_operator.naming import Owner, identity_description, identity_name
from chainguard_identity_operator.policy import (
    Claim,
    Evidence,
    adoption_refusal,
    claim_of,
    inherited_roles,
    legacy_evidence,
    parent_refusal,
    select,
)

UTC = datetime.UTC
NOW = datetime.datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
GRACE = datetime.timedelta(minutes=10)
ORG = "c95870ebffa72a258df087ea727ee92daf177e29"
CLUSTER = "3f0c5a8e-1b2d-4c6e-9f7a-0b1c2d3e4f5a"
OTHER_CLUSTER = "11111111-2222-3333-4444-555555555555"
ME = Owner("prod", CLUSTER, "shop", "puller")
NEIGHBOUR = Owner("prod", CLUSTER, "shop", "other")
NAME = identity_name("prod", "shop", "puller")
PULL = "1" * 40
VIEWER = "3" * 40
OWNER_ROLE = "4" * 40


def uidp(n: int) -> str:
    return f"{ORG}/{n:016x}"


def identity(
    n: int, owner: Owner | None = ME, *, name: str = NAME, age_days: int = 1, description: str = ""
) -> Identity:
    return Identity(
        uid=uidp(n),
        name=name,
        description=description or (identity_description(owner) if owner else "made by hand"),
        claim_match=ClaimMatch(issuer="https://issuer.example", subject="system:serviceaccount:shop:default"),
        create_time=NOW - datetime.timedelta(days=age_days),
    )


def choose(**kwargs: object) -> object:
    defaults: dict[str, object] = {
        "owner": ME,
        "listed": (),
        "recorded": None,
        "recorded_retiring": {},
        "retiring_found": (),
        "config_map_identity": None,
        "names": {NAME},
        "wanted_static": False,
        "now": NOW,
        "grace": GRACE,
    }
    defaults.update(kwargs)
    return select(**defaults)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# Selection


def test_the_recorded_identity_is_current_and_owned_duplicates_are_retired() -> None:
    mine, duplicate, older_duplicate = (
        identity(1, age_days=3),
        identity(2, age_days=2),
        identity(3, age_days=9),
    )
    chosen = choose(listed=(mine, duplicate, older_duplicate), recorded=mine)
    assert chosen.current == mine
    assert {i.uid for i in chosen.retired} == {duplicate.uid, older_duplicate.uid}
    assert chosen.retire_after == {duplicate.uid: NOW + GRACE, older_duplicate.uid: NOW + GRACE}
    assert set(chosen.spares) == {duplicate.uid, older_duplicate.uid}  # never published: reusable


def test_without_a_record_the_oldest_owned_identity_under_the_name_is_current() -> None:
    older, newer = identity(1, age_days=5), identity(2, age_days=1)
    chosen = choose(listed=(newer, older))
    assert chosen.current == older
    assert [i.uid for i in chosen.retired] == [newer.uid]


def test_the_published_identity_wins_over_a_status_written_before_it() -> None:
    # A crash after the ConfigMap named the replacement but before status recorded it.
    old, new = identity(1, age_days=20), identity(2, age_days=0)
    chosen = choose(listed=(old, new), recorded=old, config_map_identity=new.uid)
    assert chosen.current == new
    assert [i.uid for i in chosen.retired] == [old.uid]
    assert chosen.spares == ()  # the old one was published: never reused


def test_a_published_identity_that_status_retires_does_not_come_back() -> None:
    old, new = identity(1, age_days=20), identity(2, age_days=0)
    due = NOW + datetime.timedelta(minutes=3)
    chosen = choose(
        listed=(old, new), recorded=new, config_map_identity=old.uid, recorded_retiring={old.uid: due}
    )
    assert chosen.current == new
    assert chosen.retire_after == {old.uid: due}  # the recorded time is kept, not restarted


@pytest.mark.parametrize(
    "forged",
    [
        identity(7, NEIGHBOUR),  # another resource's identity
        identity(
            7, Owner("prod", OTHER_CLUSTER, "shop", "puller")
        ),  # another cluster's, same name and object
        identity(7, None),  # unmarked: made by hand, or the operator's own bootstrap identity
    ],
)
def test_a_forged_status_gets_nothing(forged: Identity) -> None:
    chosen = choose(listed=(forged,), recorded=forged, recorded_retiring={forged.uid: NOW})
    assert chosen.current is None  # so the resource creates its own
    assert chosen.retired == ()  # and never deletes the victim
    assert chosen.ignored == (forged.uid,)


def test_a_forged_configmap_gets_nothing() -> None:
    victim = identity(7, NEIGHBOUR)
    chosen = choose(listed=(victim,), config_map_identity=victim.uid)
    assert chosen.current is None
    assert chosen.retired == ()


def test_a_legacy_marker_counts_only_for_the_identity_status_records() -> None:
    legacy = "managed-by=chainguard-identity-operator cluster=prod object=shop/puller"
    recorded = identity(1, description=legacy)
    found_by_name = identity(2, description=legacy, age_days=9)
    # Both show this cluster's evidence (legacy_ok): only the one status records counts.
    chosen = choose(listed=(recorded, found_by_name), recorded=recorded, legacy_ok=lambda _identity: True)
    assert chosen.current == recorded
    # Another cluster sharing the name may have made the second one: it is not ours to retire.
    assert chosen.retired == ()
    unrecorded = choose(listed=(found_by_name,), legacy_ok=lambda _identity: True)
    assert unrecorded.current is None


def test_identities_of_another_kind_are_not_taken_by_name() -> None:
    claim = identity(1)
    chosen = choose(listed=(claim,), wanted_static=True)
    assert chosen.current is None
    assert [i.uid for i in chosen.retired] == [claim.uid]  # ours and unused: retired
    assert chosen.spares == ()


def test_an_adopted_identity_becomes_current_and_the_old_one_retires() -> None:
    mine, adopted = identity(1), identity(5, None, name="chainguard-identity-operator")
    chosen = choose(listed=(mine, adopted), recorded=mine, adopted=adopted)
    assert chosen.current == adopted
    assert [i.uid for i in chosen.retired] == [mine.uid]


# ---------------------------------------------------------------------------------------------------
# Adoption


def refusal(candidate: Identity, **kwargs: object) -> str | None:
    defaults: dict[str, object] = {
        "owner": Owner("prod", CLUSTER, "chainguard-system", "operator"),
        "candidate": candidate,
        "candidate_roles": (),
        "allowed_role_ids": {PULL, VIEWER},
        "adoption_allowed_here": True,
        "operator_namespace": "chainguard-system",
        "operator_identities": set(),
        "privileged_allowed": False,
    }
    defaults.update(kwargs)
    error = adoption_refusal(**defaults)  # type: ignore[arg-type]
    if error is None:
        return None
    assert error.field == "spec.adopt"
    assert error.reason == "AdoptionRefused"
    return error.message


def test_an_unmarked_identity_with_allowed_roles_may_be_adopted_where_adoption_is_allowed() -> None:
    assert refusal(identity(5, None), candidate_roles={PULL}) is None


def test_adoption_outside_the_listed_namespaces_is_refused() -> None:
    message = refusal(identity(5, None), owner=ME, adoption_allowed_here=False)
    assert message is not None
    assert "CGID_ADOPTION_NAMESPACES" in message
    assert "shop" in message


def test_the_operator_s_own_identity_is_adopted_only_from_the_operator_s_namespace() -> None:
    own = identity(5, None)
    message = refusal(own, owner=ME, operator_identities={own.uid}, candidate_roles={OWNER_ROLE})
    assert message is not None
    assert "operator's own" in message
    # From the operator's namespace it may, owner role and all (the documented bootstrap).
    assert refusal(own, operator_identities={own.uid}, candidate_roles={OWNER_ROLE}) is None


def test_another_resource_s_identity_is_refused_naming_it() -> None:
    message = refusal(identity(5, NEIGHBOUR), owner=ME)
    assert message is not None
    assert "shop/other" in message


def test_another_cluster_s_identity_is_refused_naming_the_cluster() -> None:
    theirs = Owner("kubernetes", OTHER_CLUSTER, "shop", "puller")
    message = refusal(identity(5, theirs), owner=dataclasses.replace(theirs, cluster_id=CLUSTER))
    assert message is not None
    assert OTHER_CLUSTER in message


def test_an_identity_holding_roles_beyond_the_allow_list_needs_the_admin_s_consent() -> None:
    privileged = identity(5, None)
    message = refusal(privileged, candidate_roles={PULL, OWNER_ROLE})
    assert message is not None
    assert OWNER_ROLE in message
    assert "CGID_ADOPTION_PRIVILEGED" in message
    assert refusal(privileged, candidate_roles={PULL, OWNER_ROLE}, privileged_allowed=True) is None


def test_a_second_resource_is_refused_before_the_first_has_even_marked_it() -> None:
    # Both adopt an unmarked identity at once; this process already saw the first one take it.
    candidate = identity(5, None)
    first = Owner("prod", CLUSTER, "chainguard-system", "first")
    message = refusal(candidate, managers={candidate.uid: first})
    assert message is not None
    assert "chainguard-system/first" in message
    assert refusal(candidate, owner=first, managers={candidate.uid: first}) is None


def test_re_adopting_an_identity_already_marked_as_ours_is_allowed() -> None:
    owner = Owner("prod", CLUSTER, "chainguard-system", "operator")
    assert refusal(identity(5, owner), owner=owner) is None


def test_a_legacy_marked_identity_is_never_adopted() -> None:
    legacy = "managed-by=chainguard-identity-operator cluster=prod object=chainguard-system/operator"
    message = refusal(identity(5, description=legacy))
    assert message is not None
    assert "managed by" in message


def test_claims() -> None:
    assert claim_of(identity(1), ME) is Claim.OURS
    assert claim_of(identity(1, NEIGHBOUR), ME) is Claim.FOREIGN
    assert claim_of(identity(1, None), ME) is Claim.UNMARKED


def test_inherited_roles_are_the_parent_bindings_beyond_the_spec() -> None:
    bindings = (
        RoleBinding(uid="b1", identity_uid=uidp(5), group_uid=ORG, role_uid=OWNER_ROLE),
        RoleBinding(uid="b2", identity_uid=uidp(5), group_uid=ORG, role_uid=VIEWER),
        RoleBinding(uid="b3", identity_uid=uidp(5), group_uid=f"{ORG}/{'a' * 16}", role_uid=PULL),
    )
    assert inherited_roles(bindings, ORG, wanted={VIEWER}) == (OWNER_ROLE,)


def test_parents_are_any_unless_the_admin_lists_some() -> None:
    assert parent_refusal(ORG, (), "spec.parent") is None
    folder = f"{ORG}/{'a' * 16}"
    assert parent_refusal(folder, (ORG,), "spec.parent") is None  # a folder of an allowed group
    refused = parent_refusal("0" * 40, (ORG,), "spec.parentName")
    assert refused is not None
    assert refused.field == "spec.parentName"
    assert refused.reason == "ParentNotAllowed"
    assert parent_refusal(ORG, (folder,), "spec.parent") is not None  # not the folder's parent


def test_a_legacy_identity_is_ours_only_with_this_cluster_s_evidence() -> None:
    legacy = "managed-by=chainguard-identity-operator cluster=prod object=shop/puller"
    public = Evidence(
        issuer="https://container.googleapis.com/v1/x", issuer_unique=True, public_keys=frozenset()
    )
    ours = dataclasses.replace(
        identity(1, description=legacy),
        claim_match=ClaimMatch(issuer=public.issuer, subject="system:serviceaccount:shop:default"),
    )
    assert legacy_evidence(ours, ME, public) is True
    theirs = dataclasses.replace(
        ours,
        claim_match=ClaimMatch(issuer="https://other.example", subject="system:serviceaccount:shop:default"),
    )
    assert legacy_evidence(theirs, ME, public) is False
    shared = dataclasses.replace(public, issuer_unique=False)  # kubernetes.default.svc: every cluster's
    assert legacy_evidence(ours, ME, shared) is False
    other_namespace = dataclasses.replace(
        ours,
        claim_match=ClaimMatch(issuer=public.issuer, subject="system:serviceaccount:kube-system:default"),
    )
    assert legacy_evidence(other_namespace, ME, public) is False
    assert legacy_evidence(ours, ME, None) is None


def test_a_forged_status_naming_a_legacy_identity_without_evidence_gets_nothing() -> None:
    legacy = "managed-by=chainguard-identity-operator cluster=prod object=shop/puller"
    other_cluster = identity(9, description=legacy)
    chosen = choose(listed=(other_cluster,), recorded=other_cluster, legacy_ok=lambda _identity: False)
    assert chosen.current is None
    assert chosen.retired == ()
    assert chosen.ignored == (other_cluster.uid,)
