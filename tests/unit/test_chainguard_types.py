"""The wire dataclasses of the Chainguard client: read every member as the gateway sends it, write
only what is set.

The operator treats any pattern or extra claim on an identity it manages as drift, so a claim match
must be read faithfully (``issuerPattern`` is not an ``issuer``), and a role binding must be read
from its flat ``identityUid``/``roleUid`` first, as Chainguard's Terraform provider does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from chainguard_identity_operator.chainguard import ClaimMatch, Identity, RoleBinding
from chainguard_identity_operator.chainguard.types import DEFAULT_AUDIENCE

ORG = "c95870ebffa72a258df087ea727ee92daf177e29"
IDENTITY = f"{ORG}/f067a9080d45a098"
OTHER_IDENTITY = f"{ORG}/1111111111111111"
ROLE = "2d8dc5b1e4b8a7f2b4c3d2e1f0a9b8c7d6e5f4a3"
OTHER_ROLE = "3" * 40
BINDING = f"{ORG}/0123456789abcdef"
ISSUER = "https://oidc.cluster.example"
SUBJECT = "system:serviceaccount:shop:default"


# --- ClaimMatch ----------------------------------------------------------------------------------


def test_claim_match_keeps_its_keyword_and_positional_constructor() -> None:
    by_keyword = ClaimMatch(issuer=ISSUER, subject=SUBJECT, audience="sts.example")
    assert by_keyword == ClaimMatch(ISSUER, SUBJECT, "sts.example")
    assert ClaimMatch(issuer=ISSUER, subject=SUBJECT).audience == DEFAULT_AUDIENCE
    assert (by_keyword.issuer_pattern, by_keyword.subject_pattern, by_keyword.audience_pattern) == (
        "",
        "",
        "",
    )
    assert by_keyword.claims == {}
    assert by_keyword.claim_patterns == {}
    assert by_keyword.is_exact


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (
            {"issuer": ISSUER, "subject": SUBJECT},
            ClaimMatch(issuer=ISSUER, subject=SUBJECT),
        ),
        (
            {"issuer": ISSUER, "subject": SUBJECT, "audience": "", "audiencePattern": ""},
            ClaimMatch(issuer=ISSUER, subject=SUBJECT),  # the gateway's zero values: the STS default
        ),
        (
            {"issuerPattern": "https://.*", "subjectPattern": "system:serviceaccount:shop:.*"},
            ClaimMatch(issuer_pattern="https://.*", subject_pattern="system:serviceaccount:shop:.*"),
        ),
        (
            {"issuer": ISSUER, "subject": SUBJECT, "audiencePattern": "sts\\..*"},
            ClaimMatch(issuer=ISSUER, subject=SUBJECT, audience="", audience_pattern="sts\\..*"),
        ),
        (
            {
                "issuer_pattern": "https://.*",
                "subject": SUBJECT,
                "audience_pattern": "a.*",
                "claims": {"team": "shop"},
                "claim_patterns": {"ref": "refs/heads/.*"},
            },
            ClaimMatch(
                issuer_pattern="https://.*",
                subject=SUBJECT,
                audience="",
                audience_pattern="a.*",
                claims={"team": "shop"},
                claim_patterns={"ref": "refs/heads/.*"},
            ),
        ),
    ],
    ids=["exact", "zero values", "patterns", "audience pattern", "snake case"],
)
def test_claim_match_reads_every_member_as_it_is(wire: dict[str, Any], expected: ClaimMatch) -> None:
    assert ClaimMatch.from_wire(wire) == expected


def test_a_pattern_is_not_read_as_an_exact_value() -> None:
    read = ClaimMatch.from_wire({"issuerPattern": ISSUER, "subjectPattern": SUBJECT})
    assert read != ClaimMatch(issuer=ISSUER, subject=SUBJECT)
    assert (read.issuer, read.subject) == ("", "")
    assert not read.is_exact


@pytest.mark.parametrize(
    "drift",
    [
        {"issuerPattern": ISSUER, "issuer": None},
        {"subjectPattern": ".*", "subject": None},
        {"audiencePattern": ".*"},
        {"claims": {"team": "shop"}},
        {"claimPatterns": {"team": ".*"}},
    ],
    ids=["issuer pattern", "subject pattern", "audience pattern", "claims", "claim patterns"],
)
def test_anything_beyond_exact_values_is_not_exact(drift: dict[str, Any]) -> None:
    wire = {key: value for key, value in {"issuer": ISSUER, "subject": SUBJECT, **drift}.items() if value}
    read = ClaimMatch.from_wire(wire)
    assert not read.is_exact
    assert read != ClaimMatch(issuer=ISSUER, subject=SUBJECT)


@pytest.mark.parametrize(
    ("claim_match", "wire"),
    [
        (
            ClaimMatch(issuer=ISSUER, subject=SUBJECT),
            {"issuer": ISSUER, "subject": SUBJECT, "audience": DEFAULT_AUDIENCE},
        ),
        (
            ClaimMatch(issuer_pattern="https://.*", subject=SUBJECT, audience_pattern="a.*"),
            {"issuerPattern": "https://.*", "subject": SUBJECT, "audiencePattern": "a.*"},
        ),
        (
            ClaimMatch(issuer=ISSUER, subject=SUBJECT, claims={"t": "s"}, claim_patterns={"r": ".*"}),
            {
                "issuer": ISSUER,
                "subject": SUBJECT,
                "audience": DEFAULT_AUDIENCE,
                "claims": {"t": "s"},
                "claimPatterns": {"r": ".*"},
            },
        ),
    ],
    ids=["exact", "patterns", "claims"],
)
def test_claim_match_writes_only_the_members_that_are_set(
    claim_match: ClaimMatch, wire: dict[str, Any]
) -> None:
    assert claim_match.to_wire() == wire
    assert ClaimMatch.from_wire(wire) == claim_match  # and reads back the same


def test_claim_match_is_a_value() -> None:
    source = {"team": "shop"}
    first = ClaimMatch(issuer=ISSUER, subject=SUBJECT, claims=source)
    source["team"] = "changed"  # the caller's dict is not shared
    second = ClaimMatch(issuer=ISSUER, subject=SUBJECT, claims={"team": "shop"})
    assert first == second
    assert hash(first) == hash(second)
    assert len({first, second, ClaimMatch(issuer=ISSUER, subject=SUBJECT)}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.issuer = "x"  # type: ignore[misc]
    identity = Identity(uid=IDENTITY, name="n", claim_match=first)
    assert Identity.from_wire({"uid": IDENTITY, "name": "n", "claimMatch": first.to_wire()}) == identity


# --- RoleBinding ---------------------------------------------------------------------------------


def test_role_binding_reads_the_flat_fields_first() -> None:
    wire = {
        "uid": BINDING,
        "identityUid": IDENTITY,
        "roleUid": ROLE,
        # Nested copies that disagree: the flat fields are what a create or update set.
        "identity": {"uid": OTHER_IDENTITY, "name": "x"},
        "role": {"uid": OTHER_ROLE, "name": "viewer"},
        "group": {"uid": ORG, "name": "my-org.example"},
        "createTime": "2026-11-23T10:00:00Z",
    }
    assert RoleBinding.from_wire(wire) == RoleBinding(BINDING, IDENTITY, ORG, ROLE)


def test_role_binding_reads_snake_case_flat_fields() -> None:
    wire = {"uid": BINDING, "identity_uid": IDENTITY, "role_uid": ROLE, "group": {"uid": ORG}}
    assert RoleBinding.from_wire(wire) == RoleBinding(BINDING, IDENTITY, ORG, ROLE)


def test_role_binding_falls_back_to_the_nested_objects() -> None:
    wire = {
        "uid": BINDING,
        "identityUid": "",  # the gateway's zero value
        "roleUid": "",
        "identity": {"uid": IDENTITY},
        "role": {"uid": ROLE},
        "group": {"uid": ORG},
    }
    assert RoleBinding.from_wire(wire) == RoleBinding(BINDING, IDENTITY, ORG, ROLE)


def test_role_binding_group_defaults_to_the_parent_of_its_uid() -> None:
    # The protos have no flat group field; the group is always the parent of the binding's UIDP.
    wire = {"uid": BINDING, "identityUid": IDENTITY, "roleUid": ROLE, "group": None}
    assert RoleBinding.from_wire(wire).group_uid == ORG
    assert RoleBinding.from_wire({"uid": BINDING, "group": {}}).group_uid == ORG
