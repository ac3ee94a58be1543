"""The emulator decodes and validates custom resources as kube-apiserver does, and reads protobuf bodies.

A ``Widget`` CRD exercises the schema keywords and CEL features one at a time; the expected messages are
kube-apiserver's (k8s.io/apimachinery field errors over kube-openapi's messages, the CRD strategy's CEL
wording). Everything goes over HTTP to a real ``kmock.Server``, as in ``test_kube_emulator.py``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import kmock
import pytest

from cgid_testkit import kube as kube_module
from cgid_testkit.kube import KubeEmulator

GROUP, VERSION, PLURAL = "example.test", "v1", "widgets"
WIDGETS = f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}"
MERGE = {"Content-Type": "application/merge-patch+json"}
PROTOBUF = "application/vnd.kubernetes.protobuf"
# v1.37 prints the missing value as JSON null (v1.32: the string "null").
UNCHECKED = (
    "<nil>: Invalid value: null: some validation rules were not checked because the object was invalid;"
    " correct the existing errors to complete validation"
)

WIDGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "required": ["size"],
            "x-kubernetes-validations": [
                {
                    "rule": "self.size <= self.limit",
                    "message": "size must not exceed limit",
                    "fieldPath": ".size",
                },
                {
                    "rule": "!has(self.secret)",
                    "message": "secret may not be set",
                    "reason": "FieldValueForbidden",
                },
                {"rule": "self.size != 13"},
                {
                    "rule": "has(self.name) == has(oldSelf.name) && (!has(self.name) || self.name == oldSelf.name)",
                    "message": "name is immutable",
                    "fieldPath": ".name",
                },
            ],
            "properties": {
                "size": {"type": "integer", "minimum": 1, "maximum": 100},
                "limit": {"type": "integer", "default": 10},
                "name": {"type": "string", "maxLength": 5},
                "secret": {"type": "string"},
                "tags": {
                    "type": "array",
                    "maxItems": 3,
                    "items": {"type": "string"},
                    "x-kubernetes-list-type": "set",
                },
                "ports": {
                    "type": "array",
                    "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["port"],
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "integer"},
                            "name": {"type": "string", "default": "tcp"},
                        },
                    },
                },
                "window": {
                    "type": "object",
                    "properties": {
                        "start": {"type": "string", "format": "date-time"},
                        "end": {"type": "string", "format": "date-time"},
                        "every": {"type": "string", "format": "duration"},
                    },
                    "x-kubernetes-validations": [
                        {
                            "rule": "!has(self.end) || self.end > self.start",
                            "message": "end must be after start",
                        },
                        {"rule": "!has(self.every) || self.every >= duration('1m')", "message": "too often"},
                    ],
                },
                "target": {"x-kubernetes-int-or-string": True},
                "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "note": {"type": "string", "nullable": True},
                "ratio": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
                "quota": {
                    "type": "string",
                    "x-kubernetes-validations": [{"rule": "quantity(self).isGreaterThan(quantity('1'))"}],
                },
                "code": {
                    "type": "string",
                    "x-kubernetes-validations": [
                        {"rule": "self.lowerAscii().startsWith('x-')", "message": "codes start with x-"},
                        {
                            "rule": "self.size() < 3 || self.substring(0, 3) != 'x-y'",
                            "message": "no x-y codes",
                        },
                    ],
                },
            },
        },
        "status": {
            "type": "object",
            "properties": {"phase": {"type": "string", "enum": ["Up", "Down"]}, "count": {"type": "integer"}},
        },
    },
}


def widget_crd() -> dict[str, Any]:
    return {
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": PLURAL, "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": WIDGET_SCHEMA},
                    "subresources": {"status": {}},
                }
            ],
        },
    }


def widget(name: str = "w", /, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget", "metadata": {"name": name}, "spec": spec}


@pytest.fixture
async def kube() -> AsyncIterator[KubeEmulator]:
    async with KubeEmulator() as emulator, kmock.Server(emulator):
        emulator.install_crd(widget_crd())
        yield emulator


@pytest.fixture
async def api(kube: KubeEmulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=str(kube.url), timeout=10) as client:
        yield client


def causes(response: httpx.Response) -> list[str]:
    """The causes of a 422 as ``field: message`` lines (the form of the Status message)."""
    assert response.status_code == 422, response.text
    body = response.json()
    assert (body["kind"], body["status"], body["reason"], body["code"]) == (
        "Status",
        "Failure",
        "Invalid",
        422,
    )
    return [f"{cause['field']}: {cause['message']}" for cause in body["details"]["causes"]]


# -- decoding: defaults, pruning, fieldValidation ----------------------------------------------------------


async def test_create_applies_defaults_and_prunes_unknown_fields_with_a_warning(
    api: httpx.AsyncClient,
) -> None:
    body = widget(size=2, ports=[{"port": 80}], extra={"free": {"form": 1}}, note=None, bogus=True)
    body["metadata"]["color"] = "blue"
    created = await api.post(WIDGETS, json=body)
    assert created.status_code == 201, created.text
    assert created.json()["spec"] == {
        "size": 2,
        "limit": 10,  # default
        "ports": [{"port": 80, "name": "tcp"}],  # defaults inside list items
        "extra": {"free": {"form": 1}},  # x-kubernetes-preserve-unknown-fields
        "note": None,  # nullable
    }
    assert "color" not in created.json()["metadata"]
    assert (
        created.headers["Warning"]
        == '299 - "unknown field \\"metadata.color\\"", 299 - "unknown field \\"spec.bogus\\""'
    )
    again = await api.post(WIDGETS, json=widget("w2", size=2, limit=None))  # null, not nullable: defaulted
    assert again.json()["spec"]["limit"] == 10
    assert "Warning" not in again.headers  # warnings belong to the request that caused them


async def test_field_validation_strict_refuses_unknown_fields(api: httpx.AsyncClient) -> None:
    strict = {"fieldValidation": "Strict"}
    refused = await api.post(WIDGETS, json=widget(size=2, bogus=1, more=2), params=strict)
    assert refused.status_code == 400
    assert refused.json()["reason"] == "BadRequest"
    assert refused.json()["message"] == (
        'Widget in version "v1" cannot be handled as a Widget: strict decoding error: unknown field "spec.bogus",'
        ' unknown field "spec.more"'
    )
    assert (await api.post(WIDGETS, json=widget(size=2), params=strict)).status_code == 201

    patched = await api.patch(f"{WIDGETS}/w", json={"spec": {"bogus": 1}}, headers=MERGE, params=strict)
    assert patched.status_code == 422
    [cause] = patched.json()["details"]["causes"]
    assert cause["field"] == "patch"
    assert cause["message"].endswith(': strict decoding error: unknown field "spec.bogus"')
    assert patched.json()["message"].startswith(' "" is invalid: patch: Invalid value: "{\\"apiVersion\\":')

    ignored = await api.patch(
        f"{WIDGETS}/w", json={"spec": {"bogus": 1}}, headers=MERGE, params={"fieldValidation": "Ignore"}
    )
    assert ignored.status_code == 200
    assert "Warning" not in ignored.headers
    assert "bogus" not in ignored.json()["spec"]


# -- OpenAPI schema validation -------------------------------------------------------------------------------


async def test_schema_errors_are_worded_like_the_api_server(api: httpx.AsyncClient) -> None:
    response = await api.post(
        WIDGETS,
        json=widget(
            size="big",
            name="toolong",
            tags=["a", "b", "c", "d"],
            window={"start": "tomorrow"},
            target=True,
            labels={"a": 1},
            ratio=0,
        ),
    )
    assert causes(response) == [
        'spec.size: Invalid value: "string": spec.size in body must be of type integer: "string"',
        "spec.name: Too long: may not be more than 5 bytes",
        "spec.tags: Too many: 4: must have at most 3 items",
        'spec.window.start: Invalid value: "tomorrow": spec.window.start in body must be of type date-time: "tomorrow"',
        # v1.37 checks int-or-string as one type (v1.32 also reported an anyOf failure)
        'spec.target: Invalid value: "boolean": spec.target in body must be of type integer,string: "boolean"',
        'spec.labels.a: Invalid value: "integer": spec.labels.a in body must be of type string: "integer"',
        "spec.ratio: Invalid value: 0: spec.ratio in body should be greater than 0",
        UNCHECKED,
    ]
    message = response.json()["message"]
    assert message.startswith('Widget.example.test "w" is invalid: [spec.size: Invalid value: "string": ')
    assert message.endswith("correct the existing errors to complete validation]")


async def test_required_minimum_maximum_enum_and_duplicates(api: httpx.AsyncClient) -> None:
    assert causes(await api.post(WIDGETS, json=widget())) == ["spec.size: Required value", UNCHECKED]
    assert causes(await api.post(WIDGETS, json=widget(size=0))) == [
        "spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1",
    ]
    assert causes(await api.post(WIDGETS, json=widget(size=101, limit=1000))) == [
        "spec.size: Invalid value: 101: spec.size in body should be less than or equal to 100",
    ]
    duplicates = widget(size=1, tags=["a", "a"], ports=[{"port": 1}, {"port": 1, "name": "udp"}])
    assert causes(await api.post(WIDGETS, json=duplicates)) == [
        'spec.tags[1]: Duplicate value: "a"',
        'spec.ports[1]: Duplicate value: {"port":1}',  # v1.37 prints objects as JSON (v1.32: Go syntax)
    ]
    created = await api.post(WIDGETS, json=widget(size=1))
    status = await api.patch(f"{WIDGETS}/w/status", json={"status": {"phase": "Sideways"}}, headers=MERGE)
    assert created.status_code == 201
    assert causes(status) == [
        'status.phase: Unsupported value: "Sideways": supported values: "Up", "Down"',
        UNCHECKED,
    ]


async def test_custom_resource_names_must_be_dns_subdomains(api: httpx.AsyncClient) -> None:
    assert causes(await api.post(WIDGETS, json=widget("Bad_Name", size=1))) == [
        'metadata.name: Invalid value: "Bad_Name": a lowercase RFC 1123 subdomain must consist of lower case'
        " alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g."
        " 'example.com', regex used for validation is"
        " '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
    ]


# -- CEL rules ------------------------------------------------------------------------------------------------


async def test_cel_rules_with_message_reason_field_path_and_the_default_message(
    api: httpx.AsyncClient,
) -> None:
    assert causes(await api.post(WIDGETS, json=widget(size=20))) == [
        "spec.size: Invalid value: size must not exceed limit",
    ]
    assert causes(await api.post(WIDGETS, json=widget(size=1, secret="x"))) == [
        "spec: Forbidden: secret may not be set"
    ]
    assert causes(await api.post(WIDGETS, json=widget(size=13, limit=20))) == [
        "spec: Invalid value: failed rule: self.size != 13",
    ]
    window = {"start": "2030-01-02T00:00:00Z", "end": "2030-01-01T00:00:00Z", "every": "30s"}
    assert causes(await api.post(WIDGETS, json=widget(size=1, window=window))) == [
        "spec.window: Invalid value: end must be after start",  # date-time strings are timestamps
        "spec.window: Invalid value: too often",  # format duration strings are durations
    ]
    assert causes(await api.post(WIDGETS, json=widget(size=1, code="x-y1"))) == [
        # substring() of the Kubernetes library; since v1.35 the failing scalar is shown, not its type
        'spec.code: Invalid value: "x-y1": no x-y codes',
    ]
    assert (await api.post(WIDGETS, json=widget(size=1, code="X-1"))).status_code == 201


async def test_transition_rules_run_on_update_only(api: httpx.AsyncClient) -> None:
    assert (await api.post(WIDGETS, json=widget(size=1, name="one"))).status_code == 201  # no oldSelf yet
    renamed = await api.patch(f"{WIDGETS}/w", json={"spec": {"name": "two"}}, headers=MERGE)
    assert causes(renamed) == ["spec.name: Invalid value: name is immutable"]
    resized = await api.patch(f"{WIDGETS}/w", json={"spec": {"size": 2}}, headers=MERGE)
    assert resized.status_code == 200


async def test_runtime_errors_and_rules_cel_python_cannot_evaluate(
    kube: KubeEmulator, api: httpx.AsyncClient
) -> None:
    response = await api.post(WIDGETS, json=widget(size=1, quota="2Gi"))
    [cause] = causes(response)
    assert cause.startswith("spec.quota: Internal error: the emulator cannot evaluate the rule ")
    assert "cel-python" in cause
    assert "quantity" in cause

    schema = json.loads(json.dumps(WIDGET_SCHEMA))
    schema["properties"]["spec"]["x-kubernetes-validations"] = [{"rule": "self.missing == 1", "message": "m"}]
    crd = widget_crd()
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"] = schema
    kube.install_crd(crd)
    assert causes(await api.post(WIDGETS, json=widget(size=1))) == [
        'spec: Invalid value: "object": no such key: missing evaluating rule: m',
    ]


async def test_validation_ratchets_what_did_not_change(kube: KubeEmulator, api: httpx.AsyncClient) -> None:
    # Stored before the rules were tightened (seeded past validation): size 50 over the default limit.
    kube.objects[f"{GROUP}/{VERSION}/{PLURAL}", "default", "old"] = widget(
        "old", size=50, limit=10, name="toolong"
    )
    labelled = await api.patch(f"{WIDGETS}/old", json={"metadata": {"labels": {"a": "b"}}}, headers=MERGE)
    assert labelled.status_code == 200, labelled.text
    assert labelled.headers["Warning"] == '299 - "spec.size: Invalid value: size must not exceed limit"'
    status = await api.patch(f"{WIDGETS}/old/status", json={"status": {"phase": "Up"}}, headers=MERGE)
    assert status.status_code == 200, status.text
    # A change to the spec re-validates what changed: the name stays too long, the new size is checked.
    resized = await api.patch(f"{WIDGETS}/old", json={"spec": {"size": 60}}, headers=MERGE)
    assert causes(resized) == ["spec.size: Invalid value: size must not exceed limit"]


# -- protobuf request bodies -----------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def pb(number: int, value: int | str | bytes) -> bytes:
    """One protobuf field: a varint, or a length-delimited string, bytes or message."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    raw = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(raw)) + raw


def entry(number: int, key: str, value: str | bytes) -> bytes:
    return pb(number, pb(1, key) + pb(2, value))


def envelope(api_version: str, kind: str, raw: bytes) -> bytes:
    return b"k8s\x00" + pb(1, pb(1, api_version) + pb(2, kind)) + pb(2, raw) + pb(3, "") + pb(4, "")


OBJECT_META = (
    pb(1, "settings")
    + pb(2, "")  # Go's protobuf writes empty strings: they mean absent
    + entry(11, "app", "shop")
    + entry(12, "note", "from protobuf")
    + pb(13, pb(5, "v1") + pb(1, "Namespace") + pb(3, "default") + pb(4, "uid-1") + pb(6, 1))
    + pb(14, "example.test/keep")
)


async def test_protobuf_config_maps_secrets_and_events_are_decoded(api: httpx.AsyncClient) -> None:
    headers = {"Content-Type": PROTOBUF, "Accept": f"{PROTOBUF}, application/json"}
    config_map = envelope(
        "v1", "ConfigMap", pb(1, OBJECT_META) + entry(2, "a", "1") + entry(3, "bin", b"\x00\xff")
    )
    created = await api.post("/api/v1/namespaces/default/configmaps", content=config_map, headers=headers)
    assert created.status_code == 201, created.text
    assert created.headers["Content-Type"].startswith("application/json")
    body = created.json()
    assert body["data"] == {"a": "1"}
    assert body["binaryData"] == {"bin": base64.b64encode(b"\x00\xff").decode()}
    meta = body["metadata"]
    assert (meta["name"], meta["labels"], meta["annotations"]) == (
        "settings",
        {"app": "shop"},
        {"note": "from protobuf"},
    )
    assert meta["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Namespace", "name": "default", "uid": "uid-1", "controller": True}
    ]
    assert meta["finalizers"] == ["example.test/keep"]
    assert "generateName" not in meta

    secret = envelope(
        "v1",
        "Secret",
        pb(1, pb(2, "gen-")) + entry(2, "k", b"v") + entry(4, "s", "t") + pb(3, "kubernetes.io/basic-auth"),
    )
    created = await api.post("/api/v1/namespaces/default/secrets", content=secret, headers=headers)
    assert created.status_code == 201, created.text
    assert created.json()["metadata"]["name"].startswith("gen-")
    # stringData is written into data on decoding (base64), as the API server's conversion does.
    assert "stringData" not in created.json()
    assert (created.json()["data"], created.json()["type"]) == (
        {"k": "dg==", "s": base64.b64encode(b"t").decode()},
        "kubernetes.io/basic-auth",
    )

    event = envelope(
        "v1",
        "Event",
        pb(1, pb(1, "ev"))
        + pb(2, pb(1, "ConfigMap") + pb(2, "default") + pb(3, "settings"))
        + pb(3, "Made")
        + pb(4, "made it")
        + pb(5, pb(1, "test"))
        + pb(6, pb(1, 1_800_000_000))
        + pb(8, 2)
        + pb(9, "Normal")
        + pb(10, pb(1, 1_800_000_000) + pb(2, 5_000))
        + pb(12, "Making")  # an event with an eventTime must name its action and reporting instance
        + pb(14, "tester")
        + pb(15, "tester-1"),
    )
    created = await api.post("/api/v1/namespaces/default/events", content=event, headers=headers)
    assert created.status_code == 201, created.text
    assert {k: v for k, v in created.json().items() if k not in ("metadata", "apiVersion", "kind")} == {
        "involvedObject": {"kind": "ConfigMap", "namespace": "default", "name": "settings"},
        "reason": "Made",
        "message": "made it",
        "source": {"component": "test"},
        "firstTimestamp": "2027-01-15T08:00:00Z",
        "lastTimestamp": None,  # a zero metav1.Time is null: kube-apiserver always sends it
        "count": 2,
        "type": "Normal",
        "eventTime": "2027-01-15T08:00:00.000005Z",
        "action": "Making",
        "reportingComponent": "tester",
        "reportingInstance": "tester-1",
    }


async def test_protobuf_bodies_the_emulator_cannot_read_are_refused_clearly(api: httpx.AsyncClient) -> None:
    headers = {"Content-Type": PROTOBUF}
    pod = await api.post(
        "/api/v1/namespaces/default/pods", content=envelope("v1", "Pod", pb(1, pb(1, "p"))), headers=headers
    )
    assert pod.status_code == 415
    assert pod.json()["reason"] == "UnsupportedMediaType"
    assert (
        "ConfigMap, DeleteOptions, Event, Namespace, Secret, ServiceAccount, TokenRequest only, not Pod (v1)"
        in pod.json()["message"]
    )
    garbage = await api.post(
        "/api/v1/namespaces/default/configmaps", content=b"{not protobuf", headers=headers
    )
    assert garbage.status_code == 400
    truncated = await api.post(
        "/api/v1/namespaces/default/configmaps",
        content=envelope("v1", "ConfigMap", b"\x0a\x05ab"),
        headers=headers,
    )
    assert truncated.status_code == 400
    assert "cannot decode the protobuf body" in truncated.json()["message"]


async def test_a_client_that_accepts_only_protobuf_is_told_so(api: httpx.AsyncClient) -> None:
    only = await api.get("/api/v1/namespaces/default/configmaps", headers={"Accept": PROTOBUF})
    assert only.status_code == 406
    assert only.json()["reason"] == "NotAcceptable"
    both = await api.get(
        "/api/v1/namespaces/default/configmaps", headers={"Accept": f"{PROTOBUF},application/json"}
    )
    assert both.status_code == 200
    assert both.headers["Content-Type"].startswith("application/json")


# -- namespaces ---------------------------------------------------------------------------------------------------


async def test_a_namespace_terminates_until_what_it_holds_is_gone(
    kube: KubeEmulator, api: httpx.AsyncClient
) -> None:
    assert (await api.post("/api/v1/namespaces", json={"metadata": {"name": "team"}})).status_code == 201
    team = f"/apis/{GROUP}/{VERSION}/namespaces/team/{PLURAL}"
    held = widget("held", size=1)
    held["metadata"]["finalizers"] = ["example.test/hold"]
    assert (await api.post(team, json=held)).status_code == 201
    assert (
        await api.post("/api/v1/namespaces/team/configmaps", json={"metadata": {"name": "cm"}})
    ).status_code == 201

    deleted = await api.delete("/api/v1/namespaces/team")
    assert deleted.status_code == 200
    assert deleted.json()["status"] == {"phase": "Terminating"}
    assert deleted.json()["spec"] == {"finalizers": ["kubernetes"]}
    assert kube.current("v1/configmaps", "team", "cm") is None
    assert kube.current(f"{GROUP}/{VERSION}/{PLURAL}", "team", "held")["metadata"]["deletionTimestamp"]  # type: ignore[index]
    refused = await api.post("/api/v1/namespaces/team/configmaps", json={"metadata": {"name": "late"}})
    assert refused.status_code == 403
    assert refused.json()["message"] == (
        'configmaps "late" is forbidden: unable to create new content in namespace team because it is being terminated'
    )

    released = await api.patch(f"{team}/held", json={"metadata": {"finalizers": None}}, headers=MERGE)
    assert released.status_code == 200
    assert kube.current("v1/namespaces", None, "team") is None

    invalid = await api.post("/api/v1/namespaces", json={"metadata": {"name": "Team"}})
    assert invalid.status_code == 422
    assert invalid.json()["details"]["causes"][0]["field"] == "metadata.name"


# -- OpenAPI v3 ---------------------------------------------------------------------------------------------------


async def test_openapi_v3_publishes_the_crd_schemas(api: httpx.AsyncClient) -> None:
    root = (await api.get("/openapi/v3")).json()["paths"]
    document = (await api.get(root[f"apis/{GROUP}/{VERSION}"]["serverRelativeURL"])).json()
    schemas = document["components"]["schemas"]
    item = schemas["test.example.v1.Widget"]
    assert item["x-kubernetes-group-version-kind"] == [{"group": GROUP, "kind": "Widget", "version": VERSION}]
    assert item["properties"]["spec"] == WIDGET_SCHEMA["properties"]["spec"]
    assert item["properties"]["metadata"]["allOf"] == [
        {"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    ]
    assert "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta" in schemas
    listed = schemas["test.example.v1.WidgetList"]
    assert listed["properties"]["items"]["items"] == {"$ref": "#/components/schemas/test.example.v1.Widget"}
    core = (await api.get(root["api/v1"]["serverRelativeURL"])).json()
    assert core["components"]["schemas"] == {}  # built-in kinds: operations only, as before


# -- the Go-compatible pieces ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0, "0"),
        (1.5, "1.5"),
        (100.0, "100"),
        (123456.0, "123456"),
        (1e6, "1e+06"),
        (1.2345678901234568e39, "1.2345678901234568e+39"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (-2.5, "-2.5"),
    ],
)
def test_floats_print_as_go_prints_them(value: float, text: str) -> None:
    assert kube_module._go_float(value) == text


def test_strings_are_quoted_as_go_quotes_them() -> None:
    assert kube_module._go_quote('a "b"\\c\n\x01é') == '"a \\"b\\"\\\\c\\n\\x01é"'


@pytest.mark.parametrize(
    ("text", "nanoseconds"),
    [
        ("720h", 720 * 3600 * 10**9),
        ("1h30m", 5400 * 10**9),
        ("300ms", 300 * 10**6),
        ("1.5h", 5400 * 10**9),
        ("-2s", -2 * 10**9),
        ("0", 0),
    ],
)
def test_durations_parse_as_go_parses_them(text: str, nanoseconds: int) -> None:
    assert kube_module._parse_go_duration(text) == nanoseconds


@pytest.mark.parametrize("text", ["", "30days", "720h\n", "1", "h", ".h", "9999999999999h"])
def test_durations_go_refuses_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="time: "):
        kube_module._parse_go_duration(text)


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        ({"rule": "self.?limit.orValue(10) >= 1"}, "cel-python cannot parse it"),
        ({"rule": "self.size >= oldSelf.orValue(0)", "optionalOldSelf": True}, "no CEL optionals"),
        ({"rule": "url('https://x').getHost() == 'x'"}, "cel-python has no function or variable"),
        ({"rule": "self.size"}, "the rule evaluated to IntType, not bool"),
    ],
)
async def test_rules_cel_python_cannot_evaluate_are_refused_not_passed(
    kube: KubeEmulator, api: httpx.AsyncClient, rule: dict[str, Any], reason: str
) -> None:
    crd = widget_crd()
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"] = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "x-kubernetes-validations": [rule],
                "properties": {"size": {"type": "integer"}, "limit": {"type": "integer"}},
            }
        },
    }
    kube.install_crd(crd)
    [cause] = causes(await api.post(WIDGETS, json=widget(size=1)))
    assert cause.startswith(f"spec: Internal error: the emulator cannot evaluate the rule {rule['rule']!r}")
    assert reason in cause


async def test_rules_at_the_root_see_the_kind_and_the_name_only(
    kube: KubeEmulator, api: httpx.AsyncClient
) -> None:
    crd = widget_crd()
    rule = "self.kind == 'Widget' && self.metadata.name.startsWith('w') && !has(self.metadata.labels)"
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"] = {
        "type": "object",
        "x-kubernetes-validations": [{"rule": rule, "message": "names start with w"}],
        "properties": {"spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    }
    kube.install_crd(crd)
    for name in ("widget", "gadget"):
        body = widget(name, size=1)
        body["metadata"]["labels"] = {"a": "b"}  # not visible to CEL: only name and generateName are
        response = await api.post(WIDGETS, json=body)
        if name == "widget":
            assert response.status_code == 201, response.text
        else:
            assert causes(response) == ["<nil>: Invalid value: names start with w"]
