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
        "spec.issuer must be an https:// URL with a host, no query or fragment, and no whitespace",
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
    # What people get wrong besides: the fields added since, and each kind of schema check once more.
    Malformed(
        "spec-missing",
        "apiVersion: iam.chainguard.dev/v1alpha1\nkind: ChainguardIdentity\n"
        f"metadata:\n  name: spec-missing\n  namespace: {NAMESPACE}\n",
        "rejected",
        "spec",
        "spec: Required value",
    ),
    Malformed(
        "parent-upper-case",
        manifest("parent-upper-case", f"parent: {ORG.upper()}"),
        "rejected",
        "spec.parent",
        f'spec.parent: Invalid value: "{ORG.upper()}": spec.parent in body should match',
    ),
    Malformed(
        "parent-name-empty",
        manifest("parent-name-empty", 'parentName: ""'),
        "rejected",
        "spec.parentName",
        'spec.parentName: Invalid value: "": spec.parentName in body should be at least 1 chars long',
    ),
    Malformed(  # the subject, where the service account's name belongs
        "service-account-as-a-subject",
        manifest(
            "service-account-as-a-subject",
            "parentName: my-org\nserviceAccountName: system:serviceaccount:shop:default",
        ),
        "rejected",
        "spec.serviceAccountName",
        'spec.serviceAccountName: Invalid value: "system:serviceaccount:shop:default": '
        "spec.serviceAccountName in body should match",
    ),
    Malformed(
        "service-account-too-long",
        manifest("service-account-too-long", "parentName: my-org\nserviceAccountName: " + "a" * 254),
        "rejected",
        "spec.serviceAccountName",
        "spec.serviceAccountName: Too long",
    ),
    Malformed(
        "mode-lower-case",
        manifest("mode-lower-case", "parentName: my-org\nmode: static"),
        "rejected",
        "spec.mode",
        'spec.mode: Unsupported value: "static": supported values: "Auto", "ClaimMatch", "Static"',
    ),
    Malformed(
        "roles-not-a-list",
        manifest("roles-not-a-list", "parentName: my-org\nroles: registry.pull"),
        "rejected",
        "spec.roles",
        'spec.roles in body must be of type array: "string"',
    ),
    Malformed(
        "roles-duplicate",
        manifest("roles-duplicate", "parentName: my-org\nroles: [viewer, viewer]"),
        "rejected",
        "spec.roles[1]",
        'spec.roles[1]: Duplicate value: "viewer"',
    ),
    Malformed(  # a UIDP one digit short: the schema takes it for a role name; the allow-list does not
        "role-uidp-one-digit-short",
        manifest("role-uidp-one-digit-short", f"parentName: my-org\nroles: [{ORG[:-1]}]"),
        "accepted",
        "spec.roles[0]",
        "",
    ),
    Malformed(
        "renew-before-zero",
        manifest("renew-before-zero", "parentName: my-org\nstatic: {validFor: 24h, renewBefore: 0s}"),
        "rejected",
        "spec.static.renewBefore",
        "spec.static.renewBefore must be longer than 0s",
    ),
    Malformed(  # OIDC Discovery: an issuer has no query and no fragment
        "issuer-with-a-query",
        manifest("issuer-with-a-query", "parentName: my-org\nissuer: https://issuer.example/?x=1"),
        "rejected",
        "spec.issuer",
        "spec.issuer must be an https:// URL with a host, no query or fragment, and no whitespace",
    ),
    Malformed(
        "deletion-policy-keep",
        manifest("deletion-policy-keep", "parentName: my-org\ndeletionPolicy: Keep"),
        "rejected",
        "spec.deletionPolicy",
        'spec.deletionPolicy: Unsupported value: "Keep": supported values: "Delete", "Orphan"',
    ),
    Malformed(
        "description-two-lines",
        manifest("description-two-lines", 'parentName: my-org\ndescription: "line one\\nline two"'),
        "rejected",
        "spec.description",
        "spec.description in body should match '^[^\\t\\n\\r]*$'",
    ),
    Malformed(
        "description-too-long",
        manifest("description-too-long", "parentName: my-org\ndescription: " + "x" * 300),
        "rejected",
        "spec.description",
        "spec.description: Too long",
    ),
    Malformed(
        "pull-secret-without-a-name",
        manifest(
            "pull-secret-without-a-name", "parentName: my-org\npullSecret: {attachToServiceAccount: true}"
        ),
        "rejected",
        "spec.pullSecret.name",
        "spec.pullSecret.name: Required value",
    ),
    Malformed(
        "pull-secret-upper-case",
        manifest("pull-secret-upper-case", "parentName: my-org\npullSecret: {name: Pull}"),
        "rejected",
        "spec.pullSecret.name",
        'spec.pullSecret.name: Invalid value: "Pull": spec.pullSecret.name in body should match',
    ),
    Malformed(  # a registry token lives an hour
        "pull-secret-refresh-2h",
        manifest("pull-secret-refresh-2h", "parentName: my-org\npullSecret: {name: pull, refreshBefore: 2h}"),
        "rejected",
        "spec.pullSecret.refreshBefore",
        "spec.pullSecret.refreshBefore must be more than 0s and at most 50m",
    ),
    Malformed(
        "verify-exchange-yes",
        manifest("verify-exchange-yes", 'parentName: my-org\nverifyExchange: "yes"'),
        "rejected",
        "spec.verifyExchange",
        'spec.verifyExchange in body must be of type boolean: "string"',
    ),
]
