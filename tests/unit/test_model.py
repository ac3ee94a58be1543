"""``parse_spec`` re-checks every rule of the CRD (the schema may be missing or stale) and names the
field of the first violation; ``RecordedStatus.from_status`` reads back what earlier passes wrote."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import pytest

from chainguard_identity_operator.config import Settings
from chainguard_identity_operator.model import (
    DeletionPolicy,
    Mode,
    RecordedBinding,
    RecordedStatus,
    SpecError,
    StaticSpec,
    parse_spec,
)

ORG = "c95870ebffa72a258df087ea727ee92daf177e29"
OTHER_ORG = "0123456789abcdef0123456789abcdef01234567"
IDENTITY = f"{ORG}/f067a9080d45a098"
ROLE_UIDP = "2d8dc5b1e4b8a7f2b4c3d2e1f0a9b8c7d6e5f4a3"

td = datetime.timedelta


def parse(spec: dict[str, Any], settings: Settings, *, namespace: str = "shop", name: str = "puller") -> Any:
    return parse_spec(namespace, name, spec, settings)


def test_minimal_spec_gets_the_documented_defaults(settings: Settings) -> None:
    spec = parse({"parent": ORG}, settings)
    assert spec.namespace == "shop"
    assert spec.name == "puller"
    assert spec.parent == ORG
    assert spec.parent_name is None
    assert spec.service_account_name == "default"
    assert spec.subject == "system:serviceaccount:shop:default"
    assert spec.roles == ("registry.pull",)
    assert spec.mode is Mode.AUTO
    assert spec.issuer is None
    assert spec.audience == "issuer.enforce.dev"
    assert spec.static == StaticSpec(valid_for=td(hours=720), renew_before=td(hours=240))
    assert spec.config_map_name == "puller-chainguard-identity"
    assert spec.deletion_policy is DeletionPolicy.DELETE
    assert spec.description == ""
    assert spec.adopt is None


def test_full_spec_is_read_as_written(settings: Settings) -> None:
    raw = {
        "parentName": "my-org.example",
        "serviceAccountName": "image-puller",
        "roles": ["registry.pull", "apk.pull", "registry.pull", "viewer"],
        "mode": "Static",
        "issuer": "https://oidc.example.test/cluster-1",
        "audience": "sts.example.test",
        "static": {"validFor": "48h", "renewBefore": "12h"},
        "configMap": {"name": "shop.identity"},
        "deletionPolicy": "Orphan",
        "description": "pulls the checkout images",
        "adopt": IDENTITY,
    }
    spec = parse(raw, settings, namespace="payments", name="checkout")
    assert spec.parent is None
    assert spec.parent_name == "my-org.example"
    assert spec.subject == "system:serviceaccount:payments:image-puller"
    assert spec.roles == ("registry.pull", "apk.pull", "viewer")  # spec order, duplicates dropped
    assert spec.mode is Mode.STATIC
    assert spec.issuer == "https://oidc.example.test/cluster-1"
    assert spec.audience == "sts.example.test"
    assert spec.static == StaticSpec(valid_for=td(hours=48), renew_before=td(hours=12))
    assert spec.config_map_name == "shop.identity"
    assert spec.deletion_policy is DeletionPolicy.ORPHAN
    assert spec.description == "pulls the checkout images"
    assert spec.adopt == IDENTITY


@pytest.mark.parametrize(
    ("static", "expected"),
    [
        ({"validFor": "72h"}, StaticSpec(td(hours=72), td(hours=24))),  # renewBefore: one third
        ({"validFor": "8760h"}, StaticSpec(td(hours=8760), td(hours=8760) / 3)),
        ({"validFor": "1h"}, StaticSpec(td(hours=1), td(minutes=20))),
        ({"renewBefore": "24h"}, StaticSpec(td(hours=720), td(hours=24))),
        ({"validFor": "", "renewBefore": ""}, StaticSpec()),
        ({}, StaticSpec()),
        (None, StaticSpec()),
    ],
)
def test_static_defaults(settings: Settings, static: Any, expected: StaticSpec) -> None:
    assert parse({"parent": ORG, "static": static}, settings).static == expected


@pytest.mark.parametrize(
    ("namespace", "service_account"),
    [("shop", "default"), ("payments", "builder"), ("kube-system", "ci.runner")],
)
def test_subject_is_always_in_the_objects_namespace(
    settings: Settings, namespace: str, service_account: str
) -> None:
    raw = {"parent": ORG, "serviceAccountName": service_account, "namespace": "kube-system"}
    spec = parse(raw, settings, namespace=namespace)
    assert spec.subject == f"system:serviceaccount:{namespace}:{service_account}"


# Each bad spec: (spec fields on top of a valid one, field named, reason).
BAD_SPECS: list[tuple[str, dict[str, Any], str, str]] = [
    ("no parent", {"parent": None}, "spec.parent", "InvalidSpec"),
    ("both parents", {"parentName": "my-org"}, "spec.parent", "InvalidSpec"),
    ("parent not a UIDP", {"parent": "my-org"}, "spec.parent", "InvalidSpec"),
    ("parent upper case", {"parent": ORG.upper()}, "spec.parent", "InvalidSpec"),
    ("parent not a string", {"parent": 42}, "spec.parent", "InvalidSpec"),
    ("parent newline", {"parent": ORG + "\n"}, "spec.parent", "InvalidSpec"),
    ("sa with namespace", {"serviceAccountName": "other:default"}, "spec.serviceAccountName", "InvalidSpec"),
    (
        "sa as subject",
        {"serviceAccountName": "system:serviceaccount:kube-system:admin"},
        "spec.serviceAccountName",
        "InvalidSpec",
    ),
    ("sa upper case", {"serviceAccountName": "Default"}, "spec.serviceAccountName", "InvalidSpec"),
    ("sa too long", {"serviceAccountName": "a" * 254}, "spec.serviceAccountName", "InvalidSpec"),
    ("sa newline", {"serviceAccountName": "default\n"}, "spec.serviceAccountName", "InvalidSpec"),
    ("roles empty", {"roles": []}, "spec.roles", "InvalidSpec"),
    ("roles a string", {"roles": "registry.pull"}, "spec.roles", "InvalidSpec"),
    ("roles a map", {"roles": {"registry.pull": True}}, "spec.roles", "InvalidSpec"),
    ("owner", {"roles": ["registry.pull", "owner"]}, "spec.roles[1]", "RoleNotAllowed"),
    ("editor", {"roles": ["editor"]}, "spec.roles[0]", "RoleNotAllowed"),
    ("push", {"roles": ["viewer", "apk.pull", "registry.push"]}, "spec.roles[2]", "RoleNotAllowed"),
    ("role UIDP not allowed", {"roles": [ROLE_UIDP]}, "spec.roles[0]", "RoleNotAllowed"),
    ("role with space", {"roles": ["registry.pull", "registry pull"]}, "spec.roles[1]", "InvalidSpec"),
    ("role not a string", {"roles": ["viewer", 7]}, "spec.roles[1]", "InvalidSpec"),
    ("role newline", {"roles": ["viewer\n"]}, "spec.roles[0]", "InvalidSpec"),
    ("mode lower case", {"mode": "auto"}, "spec.mode", "InvalidSpec"),
    ("mode unknown", {"mode": "Dynamic"}, "spec.mode", "InvalidSpec"),
    ("issuer http", {"issuer": "http://kubernetes.default.svc"}, "spec.issuer", "InvalidSpec"),
    ("issuer no host", {"issuer": "https://"}, "spec.issuer", "InvalidSpec"),
    ("issuer with space", {"issuer": "https://a b"}, "spec.issuer", "InvalidSpec"),
    ("issuer newline", {"issuer": "https://oidc.example.test\n"}, "spec.issuer", "InvalidSpec"),
    ("audience with space", {"audience": "issuer enforce dev"}, "spec.audience", "InvalidSpec"),
    ("audience too long", {"audience": "a" * 254}, "spec.audience", "InvalidSpec"),
    ("static a string", {"static": "720h"}, "spec.static", "InvalidSpec"),
    ("validFor no unit", {"static": {"validFor": "720"}}, "spec.static.validFor", "InvalidSpec"),
    ("validFor a number", {"static": {"validFor": 720}}, "spec.static.validFor", "InvalidSpec"),
    ("validFor zero", {"static": {"validFor": "0s"}}, "spec.static.validFor", "InvalidSpec"),
    ("validFor too long", {"static": {"validFor": "8761h"}}, "spec.static.validFor", "InvalidSpec"),
    ("validFor too short", {"static": {"validFor": "59m"}}, "spec.static.validFor", "InvalidSpec"),
    (
        "renewBefore = validFor",
        {"static": {"validFor": "48h", "renewBefore": "48h"}},
        "spec.static.renewBefore",
        "InvalidSpec",
    ),
    (
        "renewBefore > default validFor",
        {"static": {"renewBefore": "721h"}},
        "spec.static.renewBefore",
        "InvalidSpec",
    ),
    ("renewBefore negative", {"static": {"renewBefore": "-1h"}}, "spec.static.renewBefore", "InvalidSpec"),
    ("renewBefore zero", {"static": {"renewBefore": "0s"}}, "spec.static.renewBefore", "InvalidSpec"),
    ("configMap a string", {"configMap": "cm"}, "spec.configMap", "InvalidSpec"),
    ("configMap bad name", {"configMap": {"name": "Bad_Name"}}, "spec.configMap.name", "InvalidSpec"),
    ("configMap name a number", {"configMap": {"name": 5}}, "spec.configMap.name", "InvalidSpec"),
    ("configMap name newline", {"configMap": {"name": "cm\n"}}, "spec.configMap.name", "InvalidSpec"),
    ("deletionPolicy unknown", {"deletionPolicy": "Retain"}, "spec.deletionPolicy", "InvalidSpec"),
    ("description too long", {"description": "d" * 257}, "spec.description", "InvalidSpec"),
    ("description newline", {"description": "two\nlines"}, "spec.description", "InvalidSpec"),
    ("description tab", {"description": "a\tb"}, "spec.description", "InvalidSpec"),
    ("adopt not a UIDP", {"adopt": "puller"}, "spec.adopt", "InvalidSpec"),
    ("adopt a root", {"adopt": ORG}, "spec.adopt", "InvalidSpec"),
    ("adopt newline", {"adopt": IDENTITY + "\n"}, "spec.adopt", "InvalidSpec"),
    ("adopt elsewhere", {"adopt": f"{OTHER_ORG}/f067a9080d45a098"}, "spec.adopt", "InvalidSpec"),
    ("adopt grandchild", {"adopt": f"{IDENTITY}/0123456789abcdef"}, "spec.adopt", "InvalidSpec"),
]


@pytest.mark.parametrize(
    ("overrides", "field", "reason"),
    [case[1:] for case in BAD_SPECS],
    ids=[case[0] for case in BAD_SPECS],
)
def test_bad_specs_name_the_field(
    settings: Settings, overrides: dict[str, Any], field: str, reason: str
) -> None:
    raw = {"parent": ORG, **overrides}
    with pytest.raises(SpecError) as caught:
        parse(raw, settings)
    assert caught.value.field == field
    assert caught.value.reason == reason
    assert str(caught.value).startswith(f"{field}: ")


def test_owner_message_tells_the_admin_how_to_allow_it(settings: Settings) -> None:
    with pytest.raises(SpecError, match=r"CGID_ALLOWED_ROLES") as caught:
        parse({"parent": ORG, "roles": ["owner"]}, settings)
    assert "registry.pull, apk.pull, viewer" in caught.value.message


def test_allow_list_is_a_setting(settings: Settings) -> None:
    extended = dataclasses.replace(settings, allowed_roles=("registry.pull", "owner", ROLE_UIDP))
    spec = parse({"parent": ORG, "roles": ["owner", ROLE_UIDP]}, extended)
    assert spec.roles == ("owner", ROLE_UIDP)
    with pytest.raises(SpecError) as caught:
        parse({"parent": ORG, "roles": ["viewer"]}, extended)
    assert (caught.value.field, caught.value.reason) == ("spec.roles[0]", "RoleNotAllowed")


def test_adopt_under_parent_name_is_left_to_the_reconcile(settings: Settings) -> None:
    # With parentName the parent UIDP is only known after a lookup; parse_spec cannot check it.
    spec = parse({"parentName": "my-org", "adopt": f"{OTHER_ORG}/f067a9080d45a098"}, settings)
    assert spec.adopt == f"{OTHER_ORG}/f067a9080d45a098"


def test_empty_strings_mean_defaults(settings: Settings) -> None:
    raw = {
        "parent": ORG,
        "parentName": "",
        "serviceAccountName": "",
        "mode": "",
        "issuer": "",
        "audience": "",
        "deletionPolicy": "",
        "configMap": {"name": ""},
        "adopt": "",
    }
    spec = parse(raw, settings)
    assert (spec.parent_name, spec.service_account_name, spec.mode, spec.issuer, spec.audience) == (
        None,
        "default",
        Mode.AUTO,
        None,
        "issuer.enforce.dev",
    )
    assert (spec.deletion_policy, spec.config_map_name, spec.adopt) == (
        DeletionPolicy.DELETE,
        "puller-chainguard-identity",
        None,
    )


# ---------------------------------------------------------------------------------------------------
# RecordedStatus


def test_recorded_status_reads_what_a_pass_wrote() -> None:
    status = {
        "observedGeneration": 4,
        "identityId": IDENTITY,
        "parent": ORG,
        "mode": "Static",
        "keys": {"fingerprint": "sha256:abc", "keyIds": ["k1"]},
        "expiresAt": "2026-12-23T10:00:00Z",
        "renewAt": "2026-12-13T10:00:00Z",
        "lastRotatedAt": "2026-11-23T10:00:00.123456789Z",
        "roleBindings": [
            {"role": "registry.pull", "roleId": ROLE_UIDP, "bindingId": f"{ORG}/0000000000000001"}
        ],
        "configMapName": "puller-chainguard-identity",
        "rotationRequest": "2026-11-20",
        "retiring": [{"identityId": f"{ORG}/0000000000000002", "deleteAfter": "2026-11-23T10:10:00Z"}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }
    recorded = RecordedStatus.from_status(status)
    utc = datetime.UTC
    assert recorded == RecordedStatus(
        identity_id=IDENTITY,
        parent=ORG,
        expires_at=datetime.datetime(2026, 12, 23, 10, 0, tzinfo=utc),
        last_rotated_at=datetime.datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=utc),
        key_fingerprint="sha256:abc",
        config_map_name="puller-chainguard-identity",
        rotation_request="2026-11-20",
        retiring=((f"{ORG}/0000000000000002", datetime.datetime(2026, 11, 23, 10, 10, tzinfo=utc)),),
        role_bindings=(RecordedBinding("registry.pull", ROLE_UIDP, f"{ORG}/0000000000000001"),),
        conditions=({"type": "Ready", "status": "True"},),
    )


@pytest.mark.parametrize("status", [None, {}, {"kopf": {"progress": {}}}])
def test_recorded_status_of_a_new_object_is_empty(status: Any) -> None:
    assert RecordedStatus.from_status(status) == RecordedStatus()


@pytest.mark.parametrize(
    "status",
    [
        {"keys": "sha256:abc"},
        {"keys": None},
        {"identityId": ""},
        {"roleBindings": ["not-an-object", None, 3]},
        {"roleBindings": "registry.pull"},
        {"conditions": ["Ready", None]},
        {"retiring": [{"identityId": ""}, {"deleteAfter": "2026-11-23T10:10:00Z"}, "x"]},
        {"retiring": [{"identityId": IDENTITY}]},  # no deleteAfter: not trusted
        {"expiresAt": 12345, "lastRotatedAt": None},
    ],
)
def test_recorded_status_tolerates_missing_and_odd_fields(status: dict[str, Any]) -> None:
    recorded = RecordedStatus.from_status(status)
    assert recorded == RecordedStatus()


@pytest.mark.parametrize(
    "status",
    [
        pytest.param({"expiresAt": "garbage"}, id="expiresAt"),
        pytest.param({"lastRotatedAt": "yesterday"}, id="lastRotatedAt"),
        pytest.param(
            {"retiring": [{"identityId": IDENTITY, "deleteAfter": "soon"}]}, id="retiring.deleteAfter"
        ),
        pytest.param({"roleBindings": 5}, id="roleBindings"),
        pytest.param({"conditions": True}, id="conditions"),
        pytest.param({"retiring": 1}, id="retiring"),
    ],
)
def test_recorded_status_ignores_garbage_fields(status: dict[str, Any]) -> None:
    # Status can be hand-edited; from_status runs before reconcile's error handling, so it must not raise.
    assert RecordedStatus.from_status(status) == RecordedStatus()


@pytest.mark.parametrize(
    "status",
    [
        {"identityId": 5, "parent": ["x"], "configMapName": {"a": 1}, "rotationRequest": 3},
        {"identityId": "../../groups/x", "parent": "my-org"},  # not UIDPs: never used in an API path
        {"retiring": [{"identityId": "not-a-uidp", "deleteAfter": "2026-11-23T10:10:00Z"}]},
    ],
)
def test_recorded_status_ignores_ids_of_the_wrong_shape(status: dict[str, Any]) -> None:
    assert RecordedStatus.from_status(status) == RecordedStatus()


def test_recorded_status_of_a_non_mapping_is_empty() -> None:
    assert RecordedStatus.from_status(["not", "a", "status"]) == RecordedStatus()  # type: ignore[arg-type]
