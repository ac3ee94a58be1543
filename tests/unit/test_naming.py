"""Deterministic identity names and the ownership marker carried in identity descriptions."""

from __future__ import annotations

import re

import pytest

from chainguard_identity_operator.naming import (
    MAX_DESCRIPTION,
    identity_description,
    identity_name,
    is_managed,
    is_owned_by,
    ownership_marker,
)

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
    description = identity_description("prod", "shop", "puller")
    assert description == ownership_marker("prod", "shop", "puller")
    assert is_owned_by(description, "prod", "shop", "puller")
    assert is_managed(description)


@pytest.mark.parametrize(
    ("cluster", "namespace", "name"),
    [
        ("staging", "shop", "puller"),  # another cluster
        ("prod", "shop2", "puller"),  # another namespace
        ("prod", "shop", "puller-2"),  # a name sharing a prefix
        ("prod", "shop", "pull"),  # a prefix of the name
        ("prod", "sho", "puller"),
        ("pro", "shop", "puller"),
    ],
)
def test_other_objects_do_not_own_it(cluster: str, namespace: str, name: str) -> None:
    for description in (
        identity_description("prod", "shop", "puller"),
        identity_description("prod", "shop", "puller", "pulls images"),
    ):
        assert not is_owned_by(description, cluster, namespace, name)
        assert is_managed(description)


def test_user_text_is_appended_after_the_marker() -> None:
    description = identity_description("prod", "shop", "puller", "pulls the checkout images")
    assert description == f"{ownership_marker('prod', 'shop', 'puller')}; pulls the checkout images"
    assert is_owned_by(description, "prod", "shop", "puller")


def test_user_text_cannot_claim_another_object() -> None:
    forged = ownership_marker("prod", "kube-system", "admin")
    description = identity_description("prod", "shop", "puller", forged)
    assert is_owned_by(description, "prod", "shop", "puller")
    assert not is_owned_by(description, "prod", "kube-system", "admin")


@pytest.mark.parametrize(
    "description",
    [
        "",
        "created by hand for the CI pipeline",
        "managed-by=chainguard-identity-operatorX cluster=prod object=shop/puller",
        " managed-by=chainguard-identity-operator cluster=prod object=shop/puller",
        "note: managed-by=chainguard-identity-operator cluster=prod object=shop/puller",
    ],
)
def test_foreign_descriptions_are_neither_owned_nor_managed(description: str) -> None:
    assert not is_owned_by(description, "prod", "shop", "puller")
    assert not is_managed(description)


def test_description_is_capped_and_keeps_the_marker() -> None:
    longest_name = "n" * 253
    description = identity_description("c" * 32, "s" * 63, longest_name, "x" * 600)
    assert len(description) == MAX_DESCRIPTION
    assert is_owned_by(description, "c" * 32, "s" * 63, longest_name)
    assert "\n" not in description
    assert "\t" not in description
