"""The status record: ``IdentityStatus`` read back from whatever is there (a hand edit, an old version,
an attacker with status rights), written out, declared in the CRD schema, and patched with only what
changed. Pure functions, no I/O.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

import pytest

from chainguard_identity_operator.status import (
    BindingRecord,
    Condition,
    ExchangeRecord,
    IdentityStatus,
    PullSecretRecord,
    Retiring,
    RotationPending,
    schema,
    status_patch,
)

UTC = datetime.UTC
ORG = "c95870ebffa72a258df087ea727ee92daf177e29"
IDENTITY = f"{ORG}/0000000000000001"
OLD = f"{ORG}/0000000000000002"
BINDING = f"{ORG}/00000000000000b1"
PULL = "1" * 40
OWNER_ROLE = "4" * 40
WHEN = "2026-11-23T10:00:00Z"

FULL = IdentityStatus(
    observed_generation=3,
    identity_id=IDENTITY,
    identity_name="prod.shop.puller",
    mode="Static",
    issuer="https://kubernetes.default.svc.cluster.local",
    subject="system:serviceaccount:shop:default",
    audience="issuer.enforce.dev",
    parent=ORG,
    key_fingerprint="sha256:0123abcd",
    key_ids=("k1", "k2"),
    expires_at=datetime.datetime(2026, 12, 23, 10, 0, tzinfo=UTC),
    renew_at=datetime.datetime(2026, 12, 13, 10, 0, tzinfo=UTC),
    last_rotated_at=datetime.datetime(2026, 11, 23, 10, 0, tzinfo=UTC),
    role_bindings=(BindingRecord("registry.pull", PULL, BINDING), BindingRecord(OWNER_ROLE, OWNER_ROLE, OLD)),
    inherited_roles=(OWNER_ROLE,),
    adopted=IDENTITY,
    config_map_name="puller-chainguard-identity",
    retiring=(Retiring(OLD, datetime.datetime(2026, 11, 23, 10, 10, tzinfo=UTC)),),
    rotation_request="2026-11-01",
    rotation_pending=RotationPending("2026-11-02", "2026-11-23T09:59:00+00:00"),
    pull_secret=PullSecretRecord(
        "puller-pull", datetime.datetime(2026, 11, 23, 11, 0, tzinfo=UTC), attached_to="default"
    ),
    exchange=ExchangeRecord(
        IDENTITY, "2026-11-23T09:59:00+00:00", datetime.datetime(2026, 11, 23, 10, 0, tzinfo=UTC), True, ""
    ),
    conditions=(
        Condition("Ready", "True", "IdentityReady", "identity ready", 3, WHEN),
        Condition("Reconciling", "False", "Idle", "nothing to do", 3, WHEN),
        Condition("Stalled", "False", "NotStalled", "the spec can be satisfied", 3, WHEN),
    ),
)


def test_the_full_status_sets_every_field() -> None:
    # So that the round trip below covers every field, including ones added later.
    empty = IdentityStatus()
    unset = [
        f.name for f in dataclasses.fields(IdentityStatus) if getattr(FULL, f.name) == getattr(empty, f.name)
    ]
    assert unset == []


def test_a_full_status_round_trips() -> None:
    wire = FULL.to_dict()
    assert IdentityStatus.from_dict(wire) == FULL
    assert IdentityStatus.from_dict(wire).to_dict() == wire


def test_the_wire_form() -> None:
    wire = FULL.to_dict()
    assert wire["identityId"] == IDENTITY
    assert wire["keys"] == {"fingerprint": "sha256:0123abcd", "keyIds": ["k1", "k2"]}
    assert wire["expiresAt"] == "2026-12-23T10:00:00Z"
    assert wire["roleBindings"][0] == {"role": "registry.pull", "roleId": PULL, "bindingId": BINDING}
    assert wire["retiring"] == [{"identityId": OLD, "deleteAfter": "2026-11-23T10:10:00Z"}]
    assert wire["rotationPending"] == {
        "request": "2026-11-02",
        "identityUpdatedAt": "2026-11-23T09:59:00+00:00",
    }
    assert wire["conditions"][0] == {
        "type": "Ready",
        "status": "True",
        "reason": "IdentityReady",
        "message": "identity ready",
        "observedGeneration": 3,
        "lastTransitionTime": WHEN,
    }
    assert "kopf" not in wire


def test_an_empty_status_writes_nothing() -> None:
    assert IdentityStatus().to_dict() == {}
    assert IdentityStatus.from_dict({}) == IdentityStatus()
    assert IdentityStatus.from_dict(None) == IdentityStatus()


def test_timestamps_are_read_in_every_shape_the_wire_has() -> None:
    for text in ("2026-12-23T10:00:00Z", "2026-12-23T10:00:00.000000000Z", "2026-12-23T11:00:00+01:00"):
        assert IdentityStatus.from_dict({"expiresAt": text}).expires_at == datetime.datetime(
            2026, 12, 23, 10, 0, tzinfo=UTC
        )


# ---------------------------------------------------------------------------------------------------
# Garbage is dropped, field by field, as if it had never been written


BAD_UIDPS = ["not-a-uidp", ORG.upper(), f"{ORG}/xyz", f"{ORG}/", f" {IDENTITY}", f"{IDENTITY}\n", ""]
WRONG_TYPES: list[Any] = [5, 1.5, None, [], {}, ["x"], {"a": "b"}]
BAD_TIMES: list[Any] = ["yesterday", "2026-13-40T00:00:00Z", "2026-12-23T25:00:00Z", "", 5, [], {}, None]


def _garbage_cases() -> list[tuple[str, Any, str, Any]]:
    """(wire key, garbage, field, the field's default)."""
    cases: list[tuple[str, Any, str, Any]] = []
    for key, field in (
        ("identityId", "identity_id"),
        ("parent", "parent"),
        ("adopted", "adopted"),
    ):
        cases += [(key, value, field, None) for value in [*BAD_UIDPS, *WRONG_TYPES]]
    for key, field in (
        ("identityName", "identity_name"),
        ("issuer", "issuer"),
        ("subject", "subject"),
        ("audience", "audience"),
        ("configMapName", "config_map_name"),
        ("rotationRequest", "rotation_request"),
        ("mode", "mode"),
    ):
        cases += [(key, value, field, None) for value in [*WRONG_TYPES, ""]]
    for key, field in (
        ("expiresAt", "expires_at"),
        ("renewAt", "renew_at"),
        ("lastRotatedAt", "last_rotated_at"),
    ):
        cases += [(key, value, field, None) for value in BAD_TIMES]
    cases += [
        ("observedGeneration", value, "observed_generation", None) for value in ["3", 1.5, None, [], {}]
    ]
    cases += [("keys", value, "key_fingerprint", None) for value in ["x", 5, [], {}, {"fingerprint": 5}]]
    cases += [
        ("keys", value, "key_ids", ()) for value in ["x", 5, {"keyIds": None}, {"keyIds": [5, None, {}]}]
    ]
    for key, field in (
        ("roleBindings", "role_bindings"),
        ("inheritedRoles", "inherited_roles"),
        ("retiring", "retiring"),
        ("conditions", "conditions"),
    ):
        cases += [(key, value, field, ()) for value in ["x", 5, {}, {"a": 1}, [5, "x", None, []]]]
    cases += [("inheritedRoles", [*BAD_UIDPS, 5, None], "inherited_roles", ())]
    cases += [
        ("retiring", [{"identityId": bad, "deleteAfter": WHEN}], "retiring", ()) for bad in [*BAD_UIDPS, 5]
    ] + [("retiring", [{"identityId": OLD, "deleteAfter": bad}], "retiring", ()) for bad in BAD_TIMES]
    cases += [
        ("rotationPending", value, "rotation_pending", None)
        for value in ["x", 5, [], {}, {"request": ""}, {"request": 5}, {"identityUpdatedAt": "t"}]
    ]
    cases += [
        ("conditions", [value], "conditions", ())
        for value in [
            {"type": 5, "status": "True"},
            {"status": "True"},
            {"type": "Ready"},
            {"type": "", "status": ""},
        ]
    ]
    return cases


GARBAGE = _garbage_cases()


@pytest.mark.parametrize(
    ("key", "garbage", "field", "default"), GARBAGE, ids=[f"{c[0]}-{i}" for i, c in enumerate(GARBAGE)]
)
def test_garbage_in_a_field_is_dropped(key: str, garbage: Any, field: str, default: Any) -> None:
    status = IdentityStatus.from_dict({**FULL.to_dict(), key: garbage})
    assert getattr(status, field) == default
    # Nothing else is lost with it.
    others = {f.name for f in dataclasses.fields(IdentityStatus)} - {field}
    if key == "keys":
        others -= {"key_fingerprint", "key_ids"}
    for name in others:
        assert getattr(status, name) == getattr(FULL, name), name


@pytest.mark.parametrize("status", [None, "status", 5, [], ["identityId"]])
def test_a_status_that_is_not_an_object_reads_as_empty(status: Any) -> None:
    assert IdentityStatus.from_dict(status) == IdentityStatus()


def test_one_bad_item_in_a_list_drops_only_that_item() -> None:
    status = IdentityStatus.from_dict(
        {
            "inheritedRoles": ["bogus", OWNER_ROLE, 5],
            "retiring": [
                {"identityId": "bogus", "deleteAfter": WHEN},
                {"identityId": OLD, "deleteAfter": WHEN},
                7,
            ],
            "conditions": [
                {"status": "True"},
                {"type": "Ready", "status": "True", "reason": "IdentityReady", "lastTransitionTime": WHEN},
                "x",
            ],
            "keys": {"fingerprint": "sha256:ab", "keyIds": ["k1", 5, None, "k2"]},
        }
    )
    assert status.inherited_roles == (OWNER_ROLE,)
    assert status.retiring == (Retiring(OLD, datetime.datetime(2026, 11, 23, 10, 0, tzinfo=UTC)),)
    assert [c.type for c in status.conditions] == ["Ready"]
    assert status.key_ids == ("k1", "k2")


def test_a_condition_with_missing_parts_is_read_with_defaults() -> None:
    (condition,) = IdentityStatus.from_dict(
        {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "observedGeneration": "x",
                    "reason": "R",
                    "lastTransitionTime": WHEN,
                    "message": 5,
                }
            ]
        }
    ).conditions
    assert condition == Condition("Ready", "False", "R", "", 0, WHEN)


@pytest.mark.parametrize("missing", ["reason", "lastTransitionTime"])
def test_a_condition_the_schema_would_refuse_is_dropped(missing: str) -> None:
    # Carried on, its empty reason or time would make the next status patch fail validation.
    condition = {"type": "Ready", "status": "False", "reason": "R", "lastTransitionTime": WHEN}
    del condition[missing]
    assert IdentityStatus.from_dict({"conditions": [condition]}).conditions == ()


@pytest.mark.parametrize(
    ("key", "garbage"),
    [
        pytest.param("keys", {"fingerprint": "sha256:ab", "keyIds": 5}, id="key-ids-not-a-list"),
        pytest.param("keys", {"fingerprint": "sha256:ab", "keyIds": True}, id="key-ids-a-bool"),
        pytest.param("expiresAt", "9999-12-31T23:59:59-01:00", id="time-past-year-9999-in-utc"),
        pytest.param("renewAt", "0001-01-01T00:00:00+01:00", id="time-before-year-1-in-utc"),
        pytest.param(
            "retiring",
            [{"identityId": OLD, "deleteAfter": "9999-12-31T23:59:59-05:00"}],
            id="retiring-time-out-of-range",
        ),
    ],
)
def test_garbage_never_breaks_reading_the_status(key: str, garbage: Any) -> None:
    status = IdentityStatus.from_dict({**FULL.to_dict(), key: garbage})
    assert status.identity_id == IDENTITY


@pytest.mark.parametrize(
    ("key", "garbage", "field", "default"),
    [
        pytest.param(
            "keys", {"fingerprint": "sha256:ab", "keyIds": "k1"}, "key_ids", (), id="key-ids-a-string"
        ),
        pytest.param(
            "keys", {"fingerprint": "sha256:ab", "keyIds": {"k1": 1}}, "key_ids", (), id="key-ids-an-object"
        ),
        pytest.param(
            "roleBindings",
            [{"role": 5, "roleId": "bogus", "bindingId": None}],
            "role_bindings",
            (),
            id="binding-with-bad-uidps",
        ),
        pytest.param("roleBindings", [{}], "role_bindings", (), id="binding-with-nothing"),
        pytest.param("observedGeneration", True, "observed_generation", None, id="generation-a-bool"),
        pytest.param("mode", "Bogus", "mode", None, id="mode-not-in-the-schema-enum"),
        pytest.param(
            "rotationPending",
            {"request": "r", "identityUpdatedAt": 5},
            "rotation_pending",
            None,
            id="pending-updated-at-not-a-string",
        ),
    ],
)
def test_garbage_that_is_kept_today(key: str, garbage: Any, field: str, default: Any) -> None:
    status = IdentityStatus.from_dict({**FULL.to_dict(), key: garbage})
    assert getattr(status, field) == default


# ---------------------------------------------------------------------------------------------------
# The schema declares every key to_dict can write


def _undeclared(value: Any, node: Mapping[str, Any], path: str) -> list[str]:
    """Keys in ``value`` that the schema ``node`` does not declare (recursively)."""
    missing: list[str] = []
    if isinstance(value, Mapping):
        if node.get("x-kubernetes-preserve-unknown-fields"):
            return []
        assert node.get("type") == "object", path
        properties = node.get("properties", {})
        for key, item in value.items():
            if key not in properties:
                missing.append(f"{path}.{key}")
            else:
                missing += _undeclared(item, properties[key], f"{path}.{key}")
    elif isinstance(value, list):
        assert node.get("type") == "array", path
        for index, item in enumerate(value):
            missing += _undeclared(item, node["items"], f"{path}[{index}]")
    else:
        expected = {str: "string", int: "integer", bool: "boolean"}[type(value)]
        assert node.get("type") == expected, f"{path} is {expected} but declared {node.get('type')}"
        if "enum" in node:
            assert value in node["enum"], path
    return missing


def test_every_key_to_dict_writes_is_declared_in_the_schema() -> None:
    declared = schema()
    assert _undeclared(FULL.to_dict(), declared, "status") == []
    for mode in ("Static", "ClaimMatch"):
        assert _undeclared(dataclasses.replace(FULL, mode=mode).to_dict(), declared, "status") == []


def test_the_schema_has_room_for_kopf_and_nothing_it_does_not_use() -> None:
    properties = schema()["properties"]
    assert properties["kopf"]["x-kubernetes-preserve-unknown-fields"] is True
    written = set(FULL.to_dict())
    assert set(properties) - written == {"kopf"}


def test_conditions_are_a_map_list_keyed_by_type_with_what_kubernetes_requires() -> None:
    conditions = schema()["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["required"]) == {"type", "status", "lastTransitionTime", "reason", "message"}
    assert set(item["required"]) <= set(FULL.to_dict()["conditions"][0])


# ---------------------------------------------------------------------------------------------------
# status_patch: only what changed


def merge(before: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch at the top level, as the API server applies it (None removes)."""
    out = dict(before)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


KOPF = {"progress": {"handler": {"retries": 2}}, "dummy": "2026-11-23T10:00:00Z"}


def test_nothing_changed_writes_nothing() -> None:
    before = {**FULL.to_dict(), "kopf": KOPF}
    assert status_patch(before, FULL) == {}
    assert status_patch({}, IdentityStatus()) == {}
    assert status_patch({"kopf": KOPF}, IdentityStatus()) == {}


def test_only_changed_keys_are_patched() -> None:
    before = {**FULL.to_dict(), "kopf": KOPF}
    after = dataclasses.replace(FULL, identity_id=OLD, observed_generation=4)
    assert status_patch(before, after) == {"identityId": OLD, "observedGeneration": 4}


def test_a_change_inside_a_list_patches_that_list_whole() -> None:
    before = FULL.to_dict()
    conditions = (dataclasses.replace(FULL.conditions[0], message="changed"), *FULL.conditions[1:])
    patch = status_patch(before, dataclasses.replace(FULL, conditions=conditions))
    assert list(patch) == ["conditions"]
    assert patch["conditions"][0]["message"] == "changed"
    assert len(patch["conditions"]) == 3  # a merge patch replaces a list whole


def test_removed_keys_are_patched_to_none() -> None:
    before = {**FULL.to_dict(), "kopf": KOPF}
    after = dataclasses.replace(FULL, adopted=None, retiring=(), rotation_pending=None, key_fingerprint=None)
    assert status_patch(before, after) == {
        "adopted": None,
        "retiring": None,
        "rotationPending": None,
        "keys": None,
    }


def test_keys_an_older_version_wrote_are_removed_but_kopf_is_never_touched() -> None:
    before = {**FULL.to_dict(), "kopf": KOPF, "inPlaceRejected": True}
    patch = status_patch(before, FULL)
    assert patch == {"inPlaceRejected": None}
    assert "kopf" not in status_patch({"kopf": KOPF}, FULL)
    assert "kopf" not in status_patch({"kopf": KOPF, **FULL.to_dict()}, IdentityStatus())


@pytest.mark.parametrize(
    "after",
    [
        FULL,
        IdentityStatus(),
        dataclasses.replace(
            FULL, identity_id=OLD, retiring=(), key_ids=("k3",), conditions=FULL.conditions[:1]
        ),
        IdentityStatus(identity_id=IDENTITY, conditions=FULL.conditions),
    ],
)
@pytest.mark.parametrize(
    "before",
    [{}, {"kopf": KOPF}, {**FULL.to_dict(), "kopf": KOPF}, {"identityId": OLD, "legacy": 1, "kopf": KOPF}],
)
def test_applying_the_patch_gives_the_new_status_and_keeps_kopf(
    before: dict[str, Any], after: IdentityStatus
) -> None:
    patched = merge(before, status_patch(before, after))
    expected = after.to_dict()
    if "kopf" in before:
        expected["kopf"] = before["kopf"]
    assert patched == expected
