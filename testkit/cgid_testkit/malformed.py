"""Malformed ChainguardIdentity manifests, as data: what a cluster's API server does with each.

For each manifest: whether the API server rejects it (schema or CEL) or accepts it (then the operator,
not the API server, has to refuse it and stall), the field the answer names, and a piece of the
message. The same table runs against the Kubernetes emulator (tests/unit/test_kube_emulator_kubectl.py)
and against the run's real kube-apiserver (tests/integration/test_malformed.py): where they disagree,
the emulator is wrong. The emulator words errors as v1.37 does (the suite's own control plane); the
message pieces are the words every version from 1.28 on shares (docs/ADMIN.md: older servers print
``"null"`` for ``null``, and before v1.35 a failed CEL rule shows the schema type ``"object"`` where
newer ones show the offending scalar, or no value for an object).
"""

from __future__ import annotations

import textwrap
from typing import Literal, NamedTuple

GROUP, VERSION = "iam.chainguard.dev", "v1alpha1"
ORG = "c95870ebffa72a258df087ea727ee92daf177e29"
NAMESPACE = "shop"


def manifest(name: str, spec: str) -> str:
    """A ChainguardIdentity in namespace ``shop`` as a user writes it: YAML, so ``spec`` stays verbatim."""
    head = (
        f"apiVersion: {GROUP}/{VERSION}\nkind: ChainguardIdentity\n"
        f"metadata:\n  name: {name}\n  namespace: {NAMESPACE}\n"
    )
    return head + "spec:\n" + textwrap.indent(textwrap.dedent(spec).strip() + "\n", "  ")


class Malformed(NamedTuple):
    name: str
    manifest: str
    expected: Literal["rejected", "accepted"]
    field: str | None  # the field the API server names; for "accepted", the one the operator stalls on
    message: str  # a piece of the API server's message (empty for "accepted"), the same in v1.32 and v1.37


MALFORMED = [
    Malformed(
        "no-parent",
        manifest("no-parent", "roles: [viewer]"),
        "rejected",
        "spec",
        "exactly one of spec.parent and spec.parentName must be set",
    ),
    Malformed(
        "parent-and-parent-name",
        manifest("parent-and-parent-name", f"parent: {ORG}\nparentName: my-org"),
        "rejected",
        "spec",
        "exactly one of spec.parent and spec.parentName must be set",
    ),
    Malformed(
        "service-account-default-sa",
        manifest("service-account-default-sa", "parentName: my-org\nserviceAccountName: Default_SA"),
        "rejected",
        "spec.serviceAccountName",
        'spec.serviceAccountName: Invalid value: "Default_SA": spec.serviceAccountName in body should match',
    ),
    Malformed(  # the schema allows any role name; the operator's allow-list refuses it (RoleNotAllowed)
        "role-owner",
        manifest("role-owner", "parentName: my-org\nroles: [owner]"),
        "accepted",
        "spec.roles",
        "",
    ),
    Malformed(
        "mode-fancy",
        manifest("mode-fancy", "parentName: my-org\nmode: Fancy"),
        "rejected",
        "spec.mode",
        'spec.mode: Unsupported value: "Fancy": supported values: "Auto", "ClaimMatch", "Static"',
    ),
    Malformed(
        "valid-for-30days",
        manifest("valid-for-30days", "parentName: my-org\nstatic: {validFor: 30days}"),
        "rejected",
        "spec.static.validFor",
        'spec.static.validFor: Invalid value: "30days": spec.static.validFor in body should match',
    ),
    Malformed(
        "renew-before-longer-than-valid-for",
        manifest(
            "renew-before-longer-than-valid-for",
            "parentName: my-org\nstatic: {validFor: 24h, renewBefore: 48h}",
        ),
        "rejected",
        "spec.static.renewBefore",
        "spec.static.renewBefore must be shorter than spec.static.validFor",
    ),
    Malformed(
        "issuer-http",
        manifest("issuer-http", "parentName: my-org\nissuer: http://x"),
        "rejected",
        "spec.issuer",
        "spec.issuer must be an https:// URL with a host and no whitespace",
    ),
    Malformed(
        "config-map-upper-case",
        manifest("config-map-upper-case", "parentName: my-org\nconfigMap: {name: Identity}"),
        "rejected",
        "spec.configMap.name",
        'spec.configMap.name: Invalid value: "Identity": spec.configMap.name in body should match',
    ),
    Malformed(
        "adopt-not-an-identity-uidp",
        manifest("adopt-not-an-identity-uidp", f"parentName: my-org\nadopt: {ORG}"),
        "rejected",
        "spec.adopt",
        f'spec.adopt: Invalid value: "{ORG}": spec.adopt in body should match',
    ),
    Malformed(
        "empty-roles",
        manifest("empty-roles", "parentName: my-org\nroles: []"),
        "rejected",
        "spec.roles",
        "spec.roles: Invalid value: 0: spec.roles in body should have at least 1 items",
    ),
    Malformed(  # kubectl asks for fieldValidation=Strict; with Warn or Ignore the field is pruned
        "unknown-field",
        manifest("unknown-field", "parentName: my-org\nserviceAccount: builder"),
        "rejected",
        "spec.serviceAccount",
        'ChainguardIdentity in version "v1alpha1" cannot be handled as a ChainguardIdentity: strict decoding'
        ' error: unknown field "spec.serviceAccount"',
    ),
    Malformed(
        "valid-for-9000h",
        manifest("valid-for-9000h", "parentName: my-org\nstatic: {validFor: 9000h}"),
        "rejected",
        "spec.static.validFor",
        "spec.static.validFor 9000h is longer than the API maximum of 8760h",  # the messageExpression
    ),
    Malformed(
        "valid-for-30m",
        manifest("valid-for-30m", "parentName: my-org\nstatic: {validFor: 30m}"),
        "rejected",
        "spec.static.validFor",
        "spec.static.validFor must be at least 1h",
    ),
    Malformed(
        "role-registry-pull-with-a-space",
        manifest("role-registry-pull-with-a-space", "parentName: my-org\nroles: [Registry Pull]"),
        "rejected",
        "spec.roles[0]",
        'spec.roles[0]: Invalid value: "Registry Pull": spec.roles[0] in body should match',
    ),
    Malformed(  # valid; the operator resolves the name through Chainguard (and stalls if there is none)
        "parent-name-my-org",
        manifest("parent-name-my-org", "parentName: my-org"),
        "accepted",
        None,
        "",
    ),
    Malformed(  # unquoted, YAML reads a number: kubectl sends 1.2345678901234568e+39
        "parent-unquoted-number",
        manifest("parent-unquoted-number", "parent: 1234567890123456789012345678901234567890"),
        "rejected",
        "spec.parent",
        'spec.parent: Invalid value: "number": spec.parent in body must be of type string: "number"',
    ),
]
