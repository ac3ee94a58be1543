"""The CRD: generated file is current, schema is structural, examples validate, CEL rules hold.

Kubernetes is not available here, so the test carries two small stand-ins for the API server: an
OpenAPI validator for the subset of keywords the CRD uses (it applies defaults first, as the server
does) and ``CelRules``, which evaluates every ``x-kubernetes-validations`` rule with cel-python on the
value at its node. Sample specs that should be accepted and rejected go through both, and the last
test checks that every rule was seen both passing and failing, so a new rule cannot go untested.
"""

from __future__ import annotations

import copy
import datetime
import pathlib
import re
from collections.abc import Iterator
from typing import Any, cast

import celpy
import pytest
import re2  # type: ignore[import-untyped]  # RE2 (Go's regexp syntax), installed with cel-python
import yaml
from celpy.adapter import json_to_cel
from celpy.celtypes import BoolType
from celpy.evaluation import CELEvalError

from chainguard_identity_operator import crd
from chainguard_identity_operator.access import required_role
from chainguard_identity_operator.config import Settings
from chainguard_identity_operator.durations import parse_duration
from chainguard_identity_operator.model import SpecError, default_config_map_name, parse_spec

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "chainguardidentity.yaml"
EXAMPLES = ROOT / "examples"
CR_EXAMPLES = ("claimmatch.yaml", "static.yaml", "auto.yaml", "operator-identity.yaml", "pull-secret.yaml")

ORG = "c95870ebffa72a258df087ea727ee92daf177e29"
IDENTITY = f"{ORG}/f067a9080d45a098"

# Keywords this CRD may use; anything else is a typo or something the validator below ignores.
KNOWN_KEYWORDS = {
    "type",
    "description",
    "properties",
    "required",
    "items",
    "enum",
    "pattern",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minimum",
    "format",
    "default",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-preserve-unknown-fields",
}
SCALAR_TYPES = {"string", "integer", "boolean", "number"}


# --------------------------------------------------------------------------- schema helpers


def root_schema() -> dict[str, Any]:
    version: dict[str, Any] = crd.build_crd()["spec"]["versions"][0]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its dotted path (``[]`` for array items)."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")


def go_pattern_matches(pattern: str, value: str) -> bool:
    """OpenAPI ``pattern`` as the API server applies it: RE2 (Go) syntax and semantics, unanchored.

    Python's ``re`` would differ: its ``$`` also matches before a trailing newline."""
    return re2.search(pattern, value) is not None


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Return a copy of ``value`` with schema defaults filled in top-down, like the API server."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and "properties" in schema:
        for name, child in schema["properties"].items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                value[name] = apply_defaults(child, value[name])
    elif isinstance(value, list) and "items" in schema:
        value = [apply_defaults(schema["items"], item) for item in value]
    return value


def validate(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """OpenAPI errors for ``value`` (already defaulted), for the keywords in ``KNOWN_KEYWORDS``."""
    kind = schema.get("type")
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
    }
    if kind not in checks:
        return [f"{path}: schema type {kind!r} is not supported by this validator"]
    if not checks[kind](value):
        return [f"{path}: must be of type {kind}"]
    errors: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if kind == "string":
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: shorter than {schema['minLength']}")
        if len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{path}: longer than {schema['maxLength']}")
        if "pattern" in schema and not go_pattern_matches(schema["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
        if schema.get("format") == "date-time":
            try:
                datetime.datetime.fromisoformat(value)
            except ValueError:
                errors.append(f"{path}: {value!r} is not a date-time")
    elif kind == "integer" and value < schema.get("minimum", value):
        errors.append(f"{path}: less than {schema['minimum']}")
    elif kind == "array":
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if len(value) > schema.get("maxItems", len(value)):
            errors.append(f"{path}: more than {schema['maxItems']} items")
        list_type = schema.get("x-kubernetes-list-type")
        keys = (
            [tuple(item.get(k) for k in schema["x-kubernetes-list-map-keys"]) for item in value]
            if list_type == "map"
            else value
        )
        if list_type in ("set", "map") and len(set(keys)) != len(keys):
            errors.append(f"{path}: duplicate entries in a list of type {list_type}")
        for index, item in enumerate(value):
            errors += validate(schema["items"], item, f"{path}[{index}]")
    elif kind == "object" and "properties" in schema:  # without properties: opaque (root metadata, kopf)
        properties = schema["properties"]
        errors += [f"{path}.{name}: required" for name in schema.get("required", []) if name not in value]
        for name, item in value.items():
            if name in properties:
                errors += validate(properties[name], item, f"{path}.{name}")
            else:  # the server would prune it; `kubectl apply` (strict field validation) refuses it
                errors.append(f"{path}.{name}: unknown field")
    return errors


class CelRules:
    """Evaluates a schema's ``x-kubernetes-validations`` with cel-python, as the API server would.

    ``check`` returns the messages of the rules that rejected the object and records each rule's
    outcome in ``seen`` (rule text → set of True/False) for the coverage test. A rule that cannot be
    evaluated raises: on the API server that is an error too, and here it means the rule is wrong.
    """

    def __init__(self) -> None:
        self.env = celpy.Environment()
        self.programs: dict[str, Any] = {}
        self.seen: dict[str, set[bool]] = {}

    def evaluate(self, expression: str, value: Any) -> Any:
        if expression not in self.programs:
            self.programs[expression] = self.env.program(self.env.compile(expression))
        return self.programs[expression].evaluate({"self": json_to_cel(value)})

    def check(self, schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
        messages: list[str] = []
        for rule in schema.get("x-kubernetes-validations", []):
            try:
                passed = self.evaluate(rule["rule"], value)
            except CELEvalError as exc:
                raise AssertionError(f"rule {rule['rule']!r} failed to evaluate at {path}: {exc}") from None
            assert isinstance(passed, BoolType), f"rule {rule['rule']!r} returned {passed!r}"
            self.seen.setdefault(rule["rule"], set()).add(bool(passed))
            if not passed:
                message = rule["message"]
                if "messageExpression" in rule:
                    message = str(self.evaluate(rule["messageExpression"], value))
                messages.append(message)
        if isinstance(value, dict):
            for name, child in schema.get("properties", {}).items():
                if name in value:
                    messages += self.check(child, value[name], f"{path}.{name}")
        elif isinstance(value, list) and "items" in schema:
            for index, item in enumerate(value):
                messages += self.check(schema["items"], item, f"{path}[{index}]")
        return messages


CEL = CelRules()  # one environment and program cache for the module


def admit(obj: dict[str, Any], cel: CelRules = CEL) -> tuple[dict[str, Any], list[str]]:
    """What ``kubectl apply`` would get: the defaulted object and its schema or else its CEL errors.

    Simplified: the API server skips CEL only after "blocking" schema errors (type, enum, size) and
    reports both otherwise; every sample here breaks one rule, so the difference never shows."""
    schema = root_schema()
    defaulted = apply_defaults(schema, obj)
    errors = validate(schema, defaulted)
    if not errors:
        errors = cel.check(schema, defaulted)
    return defaulted, errors


def cr(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{crd.GROUP}/{crd.VERSION}",
        "kind": crd.KIND,
        "metadata": {"name": "puller", "namespace": "shop"},
        "spec": spec,
    }


def load_example(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text(encoding="utf-8"))
    return document


def operator_settings() -> Settings:
    return Settings(token_file=pathlib.Path("unused-token"))


# --------------------------------------------------------------------------- the generated file


def test_generated_file_is_current() -> None:
    assert CRD_FILE.read_text(encoding="utf-8") == crd.render_yaml(), (
        "crds/chainguardidentity.yaml is stale; regenerate it with "
        "`python -m chainguard_identity_operator.crd > crds/chainguardidentity.yaml` (or `make crd`)"
    )


def test_rendering_starts_with_the_header_and_round_trips() -> None:
    text = crd.render_yaml()
    assert text.startswith("# Generated by python -m chainguard_identity_operator.crd — do not edit.\n")
    assert yaml.safe_load(text) == crd.build_crd()


def test_check_flag_reports_a_stale_file(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    current = tmp_path / "current.yaml"
    current.write_text(crd.render_yaml(), encoding="utf-8")
    stale = tmp_path / "stale.yaml"
    stale.write_text(crd.render_yaml().replace("cgids", "cgidz"), encoding="utf-8")

    assert crd.main(["--check", str(current)]) == 0
    assert crd.main(["--check", str(stale)]) == 1
    assert "regenerate" in capsys.readouterr().err
    assert crd.main(["--check", str(tmp_path / "missing.yaml")]) == 1
    assert crd.main(["--bogus"]) == 2


# --------------------------------------------------------------------------- identity of the CRD


def test_names_scope_and_version() -> None:
    body = crd.build_crd()
    assert body["apiVersion"] == "apiextensions.k8s.io/v1"
    assert body["metadata"]["name"] == "chainguardidentities.iam.chainguard.dev"
    spec = body["spec"]
    assert spec["group"] == crd.GROUP == "iam.chainguard.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "ChainguardIdentity",
        "listKind": "ChainguardIdentityList",
        "plural": "chainguardidentities",
        "singular": "chainguardidentity",
        "shortNames": ["cgid", "cgids"],
        "categories": ["chainguard"],
    }
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == (crd.VERSION, True, True)
    assert version["subresources"] == {"status": {}}


def test_printer_columns_point_at_schema_fields() -> None:
    columns = crd.build_crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [(c["name"], c["type"], c["jsonPath"]) for c in columns] == [
        ("Identity ID", "string", ".status.identityId"),
        ("Mode", "string", ".status.mode"),
        ("Ready", "string", '.status.conditions[?(@.type=="Ready")].status'),
        ("Expires", "string", ".status.expiresAt"),  # a date column shows "<invalid>" for the future
        ("Age", "date", ".metadata.creationTimestamp"),
    ]
    status = root_schema()["properties"]["status"]["properties"]
    assert status["identityId"]["type"] == status["mode"]["type"] == "string"
    assert status["expiresAt"]["format"] == "date-time"
    assert {"type", "status"} <= set(status["conditions"]["items"]["properties"])


# --------------------------------------------------------------------------- structural schema


def test_schema_is_structural() -> None:
    schema = root_schema()
    assert set(schema["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}
    assert schema["required"] == ["spec"]
    # At the root, metadata may only be typed (the API server owns its schema).
    assert schema["properties"]["metadata"] == {"type": "object"}
    for path, node in walk(schema):
        assert set(node) <= KNOWN_KEYWORDS, f"{path}: unexpected keywords {set(node) - KNOWN_KEYWORDS}"
        assert node.get("type") in SCALAR_TYPES | {"object", "array"}, f"{path}: every node needs a type"
        if node["type"] == "object":
            assert "additionalProperties" not in node
            opaque = path == ".metadata" or node.get("x-kubernetes-preserve-unknown-fields")
            assert "properties" in node or opaque, f"{path}: an object needs properties"
            assert set(node.get("required", [])) <= set(node.get("properties", {})), path
        if node["type"] == "array":
            assert isinstance(node["items"], dict), f"{path}: arrays need one items schema"
        list_type = node.get("x-kubernetes-list-type")
        if list_type == "set":
            assert node["items"]["type"] in SCALAR_TYPES, f"{path}: a set holds scalars"
        if list_type == "map":
            assert set(node["x-kubernetes-list-map-keys"]) <= set(node["items"]["required"]), path
        if "pattern" in node:
            re2.compile(node["pattern"])  # valid RE2, as Go's regexp requires


def test_every_field_is_described() -> None:
    undocumented = [
        path
        for path, node in walk(root_schema())
        if path not in ("", ".metadata") and not path.endswith("[]") and not node.get("description")
    ]
    assert undocumented == []


def test_unknown_fields_are_kept_only_for_kopf() -> None:
    kept = [path for path, node in walk(root_schema()) if node.get("x-kubernetes-preserve-unknown-fields")]
    assert kept == [".status.kopf"]


def test_spec_sizes_are_bounded_for_cel_cost() -> None:
    # The API server rejects CEL rules whose worst-case cost it cannot bound; bounded inputs keep it low.
    for path, node in walk(root_schema()["properties"]["spec"], ".spec"):
        if node["type"] == "string":
            assert "maxLength" in node or "enum" in node, f"{path}: unbounded string"
        if node["type"] == "array":
            assert "maxItems" in node, f"{path}: unbounded list"


def test_defaults_are_valid_and_only_in_spec() -> None:
    schema = root_schema()
    defaulted = [path for path, node in walk(schema) if "default" in node]
    assert defaulted, "the spec has defaults"
    for path, node in walk(schema):
        if "default" in node:
            assert path.startswith(".spec."), f"{path}: defaults belong in spec"
            assert validate(node, apply_defaults(node, node["default"]), path) == []


def test_defaults_fill_a_minimal_spec() -> None:
    defaulted, errors = admit(cr(parentName="my-org.example"))
    assert errors == []
    assert defaulted["spec"] == {
        "parentName": "my-org.example",
        "serviceAccountName": "default",
        "roles": ["registry.pull"],
        "mode": "Auto",
        "audience": "issuer.enforce.dev",
        "static": {"validFor": "720h"},
        "deletionPolicy": "Delete",
    }


def test_status_written_by_the_operator_validates() -> None:
    status: dict[str, Any] = {
        "observedGeneration": 4,
        "identityId": IDENTITY,
        "identityName": "kubernetes.shop.puller",
        "mode": "Static",
        "issuer": "https://kubernetes.default.svc.cluster.local",
        "subject": "system:serviceaccount:shop:default",
        "audience": "issuer.enforce.dev",
        "parent": ORG,
        "keys": {"fingerprint": "sha256:abc", "keyIds": ["abc", "def"]},
        "expiresAt": "2026-12-23T10:00:00Z",
        "renewAt": "2026-12-13T10:00:00Z",
        "lastRotatedAt": "2026-11-23T10:00:00Z",
        "roleBindings": [{"role": "registry.pull", "roleId": "1" * 40, "bindingId": f"{ORG}/{'2' * 16}"}],
        "configMapName": "puller-chainguard-identity",
        "retiring": [{"identityId": f"{ORG}/{'3' * 16}", "deleteAfter": "2026-11-23T10:10:00Z"}],
        "rotationRequest": "2026-11-23",
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "IdentityReady",
                "message": "",
                "observedGeneration": 4,
                "lastTransitionTime": "2026-11-23T10:00:00Z",
            }
        ],
        "kopf": {"progress": {"anything": {"goes": True}}},
    }
    schema = root_schema()["properties"]["status"]
    assert validate(schema, status, ".status") == []

    duplicate = {**status, "conditions": status["conditions"] * 2}
    assert validate(schema, duplicate, ".status") == [
        ".status.conditions: duplicate entries in a list of type map"
    ]
    unresolved = {**status, "mode": "Auto"}  # status says what Auto resolved to, never Auto
    assert validate(schema, unresolved, ".status") == [
        ".status.mode: 'Auto' is not one of ['Static', 'ClaimMatch']"
    ]
    bad_reason = {**status, "conditions": [{**status["conditions"][0], "reason": "not camel"}]}
    assert len(validate(schema, bad_reason, ".status")) == 1


# --------------------------------------------------------------------------- schema rules on samples


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"parent": "C95870EBFFA72A258DF087EA727EE92DAF177E29"}, ".spec.parent: 'C95870"),
        ({"parent": ORG[:39]}, ".spec.parent:"),
        ({"parentName": ""}, ".spec.parentName: shorter than 1"),
        ({"parentName": "o", "serviceAccountName": "Default"}, ".spec.serviceAccountName:"),
        ({"parentName": "o", "serviceAccountName": "x" * 254}, ".spec.serviceAccountName: longer than 253"),
        ({"parentName": "o", "roles": []}, ".spec.roles: fewer than 1 items"),
        ({"parentName": "o", "roles": [f"r{i}" for i in range(21)]}, ".spec.roles: more than 20 items"),
        ({"parentName": "o", "roles": ["viewer", "viewer"]}, ".spec.roles: duplicate entries"),
        ({"parentName": "o", "roles": ["Registry.Pull"]}, ".spec.roles[0]:"),
        ({"parentName": "o", "roles": [f"{ORG}/x"]}, ".spec.roles[0]:"),
        ({"parentName": "o", "mode": "auto"}, ".spec.mode: 'auto' is not one of"),
        ({"parentName": "o", "audience": "issuer enforce"}, ".spec.audience:"),
        ({"parentName": "o", "static": {"validFor": "1.5h"}}, ".spec.static.validFor:"),
        ({"parentName": "o", "static": {"validFor": "30d"}}, ".spec.static.validFor:"),
        ({"parentName": "o", "static": {"validFor": "720h\n"}}, ".spec.static.validFor:"),
        ({"parentName": "o", "static": {"validFor": "999999h"}}, ".spec.static.validFor:"),
        ({"parentName": "o", "static": {"renewBefore": ""}}, ".spec.static.renewBefore: shorter than 2"),
        ({"parentName": "o", "configMap": {"name": "Bad_Name"}}, ".spec.configMap.name:"),
        ({"parentName": "o", "deletionPolicy": "Retain"}, ".spec.deletionPolicy:"),
        ({"parentName": "o", "description": "two\nlines"}, ".spec.description:"),
        ({"parentName": "o", "description": "trailing newline\n"}, ".spec.description:"),
        ({"parentName": "o", "description": "x" * 257}, ".spec.description: longer than 256"),
        ({"parentName": "o", "adopt": ORG}, ".spec.adopt:"),
        ({"parentName": "o", "issuer": "https://" + "x" * 2041}, ".spec.issuer: longer than 2048"),
        ({"parentName": "o", "serviceAccount": "default"}, ".spec.serviceAccount: unknown field"),
    ],
)
def test_schema_rejects(spec: dict[str, Any], error: str) -> None:
    _, errors = admit(cr(**spec))
    assert len(errors) == 1, errors
    assert errors[0].startswith(error), errors


def test_schema_requires_spec() -> None:
    body = cr()
    del body["spec"]
    assert admit(body)[1] == [".spec: required"]


# --------------------------------------------------------------------------- CEL rules on samples

GOOD_SPECS = [
    pytest.param({"parent": ORG}, id="parent"),
    pytest.param({"parentName": "my-org.example"}, id="parentName"),
    pytest.param(
        {"parent": ORG, "issuer": "https://kubernetes.default.svc.cluster.local"}, id="https-issuer"
    ),
    pytest.param({"parent": ORG, "issuer": "https://oidc.eks.example/id/ABC"}, id="https-issuer-with-path"),
    pytest.param({"parent": ORG, "issuer": ""}, id="empty-issuer-means-discover"),
    pytest.param({"parent": ORG, "static": {"validFor": "8760h"}}, id="validFor-max"),
    pytest.param({"parent": ORG, "static": {"validFor": "1h"}}, id="validFor-min"),
    pytest.param({"parent": ORG, "static": {"validFor": "1h30m", "renewBefore": "89m"}}, id="minutes"),
    pytest.param({"parent": ORG, "static": {"validFor": "720h", "renewBefore": "240h"}}, id="renewBefore"),
    pytest.param({"parent": ORG, "static": {"renewBefore": "719h59m59s"}}, id="renewBefore-default-validFor"),
    pytest.param({"parent": ORG, "roles": ["registry.pull", "viewer"], "adopt": IDENTITY}, id="adopt"),
    pytest.param({"parent": ORG, "pullSecret": {"name": "pull", "refreshBefore": "50m"}}, id="refresh-max"),
    pytest.param(
        {
            "parent": ORG,
            "pullSecret": {"name": "pull", "attachToServiceAccount": True},
            "verifyExchange": True,
        },
        id="pull-secret-attached",
    ),
]

XOR = "exactly one of spec.parent and spec.parentName must be set"
HTTPS = "spec.issuer must be an https:// URL with a host, no query or fragment, and no whitespace"
BAD_SPECS = [
    pytest.param({"parent": ORG, "parentName": "my-org.example"}, XOR, id="both"),
    pytest.param({"roles": ["viewer"]}, XOR, id="neither"),
    pytest.param({"parent": ORG, "issuer": "http://example.com"}, HTTPS, id="http"),
    pytest.param({"parent": ORG, "issuer": "https://"}, HTTPS, id="no-host"),
    pytest.param({"parent": ORG, "issuer": "https:///path"}, HTTPS, id="empty-host"),
    pytest.param({"parent": ORG, "issuer": "https://a b"}, HTTPS, id="space"),
    pytest.param({"parent": ORG, "issuer": "https://issuer.example/?x=1"}, HTTPS, id="query"),
    pytest.param({"parent": ORG, "issuer": "https://issuer.example#top"}, HTTPS, id="fragment"),
    pytest.param(
        {"parent": ORG, "static": {"validFor": "8761h"}},
        "spec.static.validFor 8761h is longer than the API maximum of 8760h",
        id="validFor-too-long",
    ),
    pytest.param(
        {"parent": ORG, "static": {"validFor": "525601m"}},
        "spec.static.validFor 525601m is longer than the API maximum of 8760h",
        id="validFor-too-long-in-minutes",
    ),
    pytest.param(
        {"parent": ORG, "static": {"validFor": "59m59s"}},
        "spec.static.validFor must be at least 1h",
        id="short",
    ),
    pytest.param(
        {"parent": ORG, "static": {"validFor": "24h", "renewBefore": "0s"}},
        "spec.static.renewBefore must be longer than 0s",
        id="renewBefore-zero",
    ),
    pytest.param(
        {"parent": ORG, "static": {"validFor": "24h", "renewBefore": "24h"}},
        "spec.static.renewBefore must be shorter than spec.static.validFor",
        id="renewBefore-equal",
    ),
    pytest.param(
        {"parent": ORG, "static": {"validFor": "1h", "renewBefore": "61m"}},
        "spec.static.renewBefore must be shorter than spec.static.validFor",
        id="renewBefore-longer",
    ),
    pytest.param(
        {"parent": ORG, "static": {"renewBefore": "721h"}},
        "spec.static.renewBefore must be shorter than spec.static.validFor",
        id="renewBefore-vs-default-validFor",
    ),
    pytest.param(
        {"parent": ORG, "pullSecret": {"name": "pull", "refreshBefore": "51m"}},
        "spec.pullSecret.refreshBefore must be more than 0s and at most 50m",
        id="refresh-longer-than-a-token-lives",
    ),
    pytest.param(
        {"parent": ORG, "pullSecret": {"name": "pull", "refreshBefore": "0s"}},
        "spec.pullSecret.refreshBefore must be more than 0s and at most 50m",
        id="refresh-zero",
    ),
]


# The API server refuses these but the operator's own check does not: model.HTTPS_URL is applied with
# Python's `re.match`, whose `$` also matches before a trailing newline (RE2's and Go's do not).
SERVER_ONLY_BAD_SPECS = [
    pytest.param({"parent": ORG, "issuer": "https://a/\n"}, HTTPS, id="trailing-newline"),
]


@pytest.mark.parametrize("spec", GOOD_SPECS)
def test_cel_accepts(spec: dict[str, Any]) -> None:
    defaulted, errors = admit(cr(**spec))
    assert errors == []
    # The operator's own validation agrees with the API server's.
    parse_spec("shop", "puller", defaulted["spec"], operator_settings())


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS + SERVER_ONLY_BAD_SPECS)
def test_cel_rejects(spec: dict[str, Any], message: str) -> None:
    _, errors = admit(cr(**spec))
    assert errors == [message]


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS)
def test_operator_rejects_what_cel_rejects(spec: dict[str, Any], message: str) -> None:
    # The operator refuses the same spec when the CRD was not installed to stop it.
    defaulted = apply_defaults(root_schema(), cr(**spec))
    with pytest.raises(SpecError):
        parse_spec("shop", "puller", defaulted["spec"], operator_settings())


@pytest.mark.parametrize(
    "text", ["720h", "90m", "1h30m", "45s", "1h0m1s", "99999h", "9999999m", "999999999s"]
)
def test_cel_durations_mean_what_the_operator_reads(text: str) -> None:
    # Everything DURATION_PATTERN admits is read the same by CEL's duration() and by the operator.
    assert go_pattern_matches(crd.DURATION_PATTERN, text)
    seconds = int(parse_duration(text).total_seconds())
    assert bool(CEL.evaluate(f"duration('{text}') == duration('{seconds}s')", {})) is True
    assert bool(CEL.evaluate(f"duration('{text}') == duration('{seconds + 1}s')", {})) is False


def test_cel_rules_are_all_exercised_both_ways() -> None:
    for spec in GOOD_SPECS:
        admit(cr(**cast("dict[str, Any]", spec.values[0])))
    for spec in BAD_SPECS + SERVER_ONLY_BAD_SPECS:
        admit(cr(**cast("dict[str, Any]", spec.values[0])))
    rules = [
        rule["rule"] for _, node in walk(root_schema()) for rule in node.get("x-kubernetes-validations", [])
    ]
    assert len(rules) == 7
    assert {rule: CEL.seen.get(rule, set()) for rule in rules} == {rule: {True, False} for rule in rules}


def test_cel_rule_entries_are_complete() -> None:
    for path, node in walk(root_schema()):
        for rule in node.get("x-kubernetes-validations", []):
            assert rule["message"].startswith(("spec.", "exactly one of spec.")), (path, rule)
            assert rule["reason"] in {"FieldValueInvalid", "FieldValueRequired", "FieldValueForbidden"}
            if "fieldPath" in rule:
                assert rule["fieldPath"].lstrip(".") in node["properties"], (path, rule["fieldPath"])


# --------------------------------------------------------------------------- examples


@pytest.mark.parametrize("name", CR_EXAMPLES)
def test_example_is_admitted(name: str) -> None:
    example = load_example(name)
    assert (example["apiVersion"], example["kind"]) == (f"{crd.GROUP}/{crd.VERSION}", crd.KIND)
    defaulted, errors = admit(example)
    assert errors == []
    metadata = example["metadata"]
    parse_spec(metadata["namespace"], metadata["name"], defaulted["spec"], operator_settings())


def test_examples_say_what_they_are_named_for() -> None:
    claim = admit(load_example("claimmatch.yaml"))[0]
    assert claim["metadata"] == {"name": "puller", "namespace": "shop"}
    assert claim["spec"]["mode"] == "ClaimMatch"
    assert claim["spec"]["parentName"] == "my-org.example"
    assert claim["spec"]["roles"] == ["registry.pull"]

    static_text = (EXAMPLES / "static.yaml").read_text(encoding="utf-8")
    static = admit(load_example("static.yaml"))[0]
    assert static["metadata"] == {"name": "ci-runner", "namespace": "default"}
    assert static["spec"]["mode"] == "Static"
    assert re.fullmatch(r"[0-9a-f]{40}", static["spec"]["parent"])
    assert "Replace" in static_text  # the placeholder UIDP says so
    assert static["spec"]["roles"] == ["registry.pull", "viewer"]
    assert static["spec"]["static"] == {"validFor": "720h", "renewBefore": "240h"}

    auto = admit(load_example("auto.yaml"))[0]
    assert auto["spec"]["mode"] == "Auto"
    assert "mode" not in load_example("auto.yaml")["spec"]  # minimal: Auto comes from the default


def test_pod_example_reads_the_claimmatch_config_map() -> None:
    identity = admit(load_example("claimmatch.yaml"))[0]
    pod = load_example("pod.yaml")
    assert pod["kind"] == "Pod"
    assert pod["metadata"]["namespace"] == identity["metadata"]["namespace"]
    assert pod["spec"]["serviceAccountName"] == identity["spec"]["serviceAccountName"]

    [container] = pod["spec"]["containers"]
    assert container["envFrom"] == [
        {"configMapRef": {"name": default_config_map_name(identity["metadata"]["name"])}}
    ]
    script = container["command"][-1]
    for variable in ("$CHAINGUARD_IDENTITY", "$CHAINGUARD_ISSUER", "$CHAINGUARD_API"):
        assert variable in script
    # Nothing pasted by hand: no identity placeholder, no hard-coded Chainguard host.
    assert "<identity-id>" not in script
    assert "enforce.dev" not in script

    [mount] = container["volumeMounts"]
    [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    [source] = volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["audience"] == identity["spec"]["audience"] == "issuer.enforce.dev"
    assert f"{mount['mountPath']}/{token['path']}" in script


def test_the_pull_secret_role_example_is_what_the_operator_asks_for() -> None:
    """AccessNotGranted quotes access.required_role; the shipped Role must be the same, so a tenant who
    applies either gets the same grant (the e2e suite proves the real RBAC lets it work)."""
    identity = admit(load_example("pull-secret.yaml"))[0]
    spec = parse_spec(
        identity["metadata"]["namespace"], identity["metadata"]["name"], identity["spec"], operator_settings()
    )
    settings = operator_settings()
    wanted = required_role(
        namespace=spec.namespace,
        service_account=spec.service_account_name,
        pull_secret=spec.pull_secret,
        operator_namespace=settings.operator_namespace,
        operator_service_account=settings.operator_service_account,
        resource=identity["metadata"]["name"],
    )
    shipped = [doc for doc in yaml.safe_load_all((EXAMPLES / "pull-secret-role.yaml").read_text()) if doc]
    assert shipped == wanted
