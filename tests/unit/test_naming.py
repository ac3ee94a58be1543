"""Deterministic identity names and the ownership marker carried in identity descriptions."""

from __future__ import annotations

import re

import pytest

from chainguard_identity_operator.chainguard.types import Identity
from chainguard_identity_operator.naming import (
    MAX_DESCRIPTION,
    Owner,
    identity_description,
    identity_name,
    is_managed,
    ownership_marker,
    parse_marker,
)
from chainguard_identity_operator.policy import Claim, claim_of

CLUSTER_ID = "3f0c5a8e-1b2d-4c6e-9f7a-0b1c2d3e4f5a"
OTHER_ID = "11111111-2222-3333-4444-555555555555"
PULLER = Owner("prod", CLUSTER_ID, "shop", "puller")


def is_owned_by(description: str, owner: Owner) -> bool:
    return claim_of(Identity(uid="x", name="n", description=description), owner) is Claim.OURS


# What the operator promises to generate (Chainguard's server accepts a superset of it).
NAME = re.compile(r"^[a-z0-9._-]{3,63}$")
HASHED = re.compile(r"^[a-z0-9._-]*[a-z0-9]-[0-9a-f]{12}$")


@pytest.mark.parametrize(
    ("cluster", "namespace", "name", "expected"),
    [
        ("prod", "shop", "puller", "prod.shop.puller"),
        ("a", "b", "c", "a.b.c"),
        ("kubernetes", "default", "my.dotted.name", "kubernetes.default.my.dotted.name"),
        ("k", "n" * 30, "x" * 30, f"k.{'n' * 30}.{'x' * 30}"),  # exactly 63: kept as is
    ],
)
def test_short_names_are_readable_and_exact(cluster: str, namespace: str, name: str, expected: str) -> None:
    assert identity_name(cluster, namespace, name) == expected
    assert NAME.match(expected)


@pytest.mark.parametrize(
    ("cluster", "namespace", "name"),
    [
        ("k", "n" * 30, "x" * 31),  # 64: one over
        ("a" * 32, "b" * 63, "c" * 253),  # every part at its Kubernetes maximum
        ("prod", "team-payments", "registry-puller-for-the-checkout-service-v2-canary"),
        ("k", "n" * 47, "t" * 20),  # the cut lands right after a dot
        ("k", "n" * 10, "x" * 36 + "-" + "y" * 20),  # the cut lands right after a dash
    ],
)
def test_long_names_are_cut_and_hashed(cluster: str, namespace: str, name: str) -> None:
    full = f"{cluster}.{namespace}.{name}"
    assert len(full) > 63
    result = identity_name(cluster, namespace, name)
    assert NAME.match(result)
    assert len(result) <= 63
    assert HASHED.match(result), "the readable prefix must not end in '.' or '-' before the hash"
    prefix = result.rsplit("-", 1)[0]
    assert full.startswith(prefix)
    assert identity_name(cluster, namespace, name) == result  # deterministic


def test_different_long_inputs_get_different_names() -> None:
    # All share the same 63-character prefix: only the hash tells them apart.
    names = {identity_name("prod", "n" * 60, f"object-{index}") for index in range(200)}
    assert len(names) == 200
    assert identity_name("prod", "n" * 60, "a") != identity_name("prod", "n" * 59, "na")


def test_marker_round_trip() -> None:
    description = identity_description(PULLER)
    assert description == ownership_marker(PULLER)
    assert description == (
        f"managed-by=chainguard-identity-operator cluster=prod cluster-id={CLUSTER_ID} object=shop/puller"
    )
    assert parse_marker(description) == PULLER
    assert is_owned_by(description, PULLER)
    assert is_managed(description)


@pytest.mark.parametrize(
    "other",
    [
        Owner("prod", OTHER_ID, "shop", "puller"),  # another cluster that shares the name
        Owner("staging", CLUSTER_ID, "shop", "puller"),  # renamed cluster: the ID still proves it ...
        Owner("prod", CLUSTER_ID, "shop2", "puller"),  # another namespace
        Owner("prod", CLUSTER_ID, "shop", "puller-2"),  # a name sharing a prefix
        Owner("prod", CLUSTER_ID, "shop", "pull"),  # a prefix of the name
        Owner("prod", CLUSTER_ID, "sho", "puller"),
    ],
)
def test_other_objects_and_clusters_do_not_own_it(other: Owner) -> None:
    for description in (identity_description(PULLER), identity_description(PULLER, "pulls images")):
        owned = is_owned_by(description, other)
        # ... so only a different cluster ID, namespace or name loses the claim.
        assert owned == (
            other.cluster_id == CLUSTER_ID and (other.namespace, other.name) == ("shop", "puller")
        )
        assert is_managed(description)


def test_two_clusters_with_the_default_name_never_share_an_identity() -> None:
    ours = Owner("kubernetes", CLUSTER_ID, "shop", "puller")
    theirs = Owner("kubernetes", OTHER_ID, "shop", "puller")
    assert identity_name("kubernetes", "shop", "puller") == "kubernetes.shop.puller"  # the same readable name
    assert is_owned_by(identity_description(ours), ours)
    assert not is_owned_by(identity_description(ours), theirs)
    assert not is_owned_by(identity_description(theirs), ours)


def test_a_legacy_marker_is_read_and_claimed_only_as_legacy() -> None:
    legacy = "managed-by=chainguard-identity-operator cluster=prod object=shop/puller; pulls images"
    assert parse_marker(legacy) == Owner("prod", None, "shop", "puller")
    identity = Identity(uid="x", name="n", description=legacy)
    assert claim_of(identity, PULLER) is Claim.LEGACY
    assert claim_of(identity, Owner("staging", CLUSTER_ID, "shop", "puller")) is Claim.FOREIGN
    assert claim_of(identity, Owner("prod", CLUSTER_ID, "shop", "other")) is Claim.FOREIGN


def test_user_text_is_appended_after_the_marker() -> None:
    description = identity_description(PULLER, "pulls the checkout images")
    assert description == f"{ownership_marker(PULLER)}; pulls the checkout images"
    assert is_owned_by(description, PULLER)


def test_user_text_cannot_claim_another_object() -> None:
    admin = Owner("prod", CLUSTER_ID, "kube-system", "admin")
    description = identity_description(PULLER, ownership_marker(admin))
    assert is_owned_by(description, PULLER)
    assert not is_owned_by(description, admin)
    assert parse_marker(description) == PULLER


@pytest.mark.parametrize(
    "description",
    [
        "",
        "created by hand for the CI pipeline",
        f"managed-by=chainguard-identity-operatorX cluster=prod cluster-id={CLUSTER_ID} object=shop/puller",
        f" managed-by=chainguard-identity-operator cluster=prod cluster-id={CLUSTER_ID} object=shop/puller",
        f"note: managed-by=chainguard-identity-operator cluster=prod cluster-id={CLUSTER_ID} object=shop/puller",
    ],
)
def test_foreign_descriptions_are_neither_owned_nor_managed(description: str) -> None:
    assert not is_owned_by(description, PULLER)
    assert parse_marker(description) is None
    assert not is_managed(description)


def test_a_marker_followed_by_more_object_text_is_not_that_object() -> None:
    # "object=shop/puller" must end the marker: "shop/puller.evil" or "shop/puller x" name other things.
    for suffix in (".evil", "x", " x"):
        forged = f"{ownership_marker(PULLER)}{suffix}"
        assert not is_owned_by(forged, PULLER)


def test_description_is_capped_and_keeps_the_marker() -> None:
    longest = Owner("c" * 32, "i" * 64, "s" * 63, "n" * 253)
    description = identity_description(longest, "x" * 600)
    assert len(description) == MAX_DESCRIPTION
    assert is_owned_by(description, longest)
    assert "\n" not in description
    assert "\t" not in description
