"""A Kubernetes API server emulator on kmock, faithful enough for kopf, the ``kubernetes`` client and kubectl.

kmock's ``KubernetesEmulator`` keeps objects in memory and serves lists, watches and discovery, but it
does not behave like an API server on writes: no ``resourceVersion``/``generation``, no status subresource,
no optimistic concurrency, and its URL parser cannot read ``/api/v1/namespaces``. ``KubeEmulator`` keeps
kmock's storage (``kube.objects[...]`` with full histories), its reaction DSL (tests may still override any
request, e.g. ``kube['post', kmock.resource('v1/configmaps')] << 500``: an overridden request changes
nothing) and its discovery, and replaces the rest: every request is parsed with Kubernetes' own URL rules;
every write (create, merge/JSON/strategic/apply patch, replace, delete, status subresource) goes through
one synchronous commit step that stamps metadata, bumps a global ``resourceVersion``, emits a watch event
and completes deletions when the last finalizer goes. Being synchronous in a single event loop, a commit is
atomic without locks, which also lets tests seed state with plain method calls (``add_namespace``,
``install_crd``). Watches are served from a bounded event log (so a client can resume from a
``resourceVersion``, or get ``410 Gone``) plus one queue per open watch, with periodic bookmarks. On top,
it issues service-account tokens like a real cluster: RS256 JWTs from ``TokenRequest`` with the configured
issuer, the OIDC discovery document and the JWKS, and signing-key rotation with a grace period in which
the previous key is still published.

What else it emulates, as kube-apiserver v1.37 does it (tests/integration/test_differential.py runs one
scenario on it and on a real v1.37 server and compares what a user sees; /version says v1.37.2):

- Custom resources are decoded and validated with their CRD's ``openAPIV3Schema``: unknown fields are
  pruned (``fieldValidation`` Warn, the default, answers with ``Warning`` headers; Strict, what kubectl
  sends, refuses them; Ignore is silent), ``x-kubernetes-preserve-unknown-fields`` keeps them, ``default``s
  are applied, then type, enum, pattern (RE2), min/max length, items, properties, minimum/maximum,
  multipleOf, required, the date-time/date/byte/uuid/ip/cidr/mac formats, int-or-string, nullable,
  allOf/anyOf/oneOf/not, list-type set/map duplicates and the DNS-subdomain name are checked, and the
  ``x-kubernetes-validations`` CEL rules run (``message``, ``messageExpression``, ``reason``,
  ``fieldPath``; ``oldSelf`` transition rules on update only) unless a blocking schema error stops them.
  Updates ratchet: a value unchanged from the stored object is not failed again (a CEL failure on it
  becomes a warning). The answer is the 422 ``Status`` kube-apiserver sends, its messages worded the same
  (v1.37's: a value that is not a string or a number is printed as JSON, ``null`` included; a failed CEL
  rule shows the scalar it failed on, and no value for an object or a list). The order of the schema's
  errors is the schema's (a real server's follows Go's map iteration, which varies from call to call).
- Encoding: a custom resource is a map, so its keys come back sorted (kopf's last-handled annotation
  shows it); the built-in kinds come back in their Go structs' field order, with Go's zero values (an
  Event's ``eventTime: null``, ``reportingInstance: ""``, ``source: {}``), their timestamps parsed and
  re-encoded as kube-apiserver does (a Time in UTC to the second, ``...Z``; a MicroTime must carry six
  fractional digits; what Go cannot parse is a 400 with Go's message), a Secret's ``stringData`` folded
  into ``data``, a Namespace's ``kubernetes.io/metadata.name`` label; typed lists do not repeat
  ``apiVersion``/``kind`` on their items; empty labels, annotations, finalizers... are dropped (ObjectMeta's
  omitempty). ``metadata.generation`` is kept only by kinds with spec/status semantics (custom resources,
  CRDs, pods), not by ConfigMaps, Secrets, ServiceAccounts, Namespaces or Events. Core Events are validated
  (their involved object's namespace, and what an ``eventTime`` event must name).
- Managed fields, as structured-merge-diff records them: every write by a client (create, update, merge,
  JSON and strategic patches as Update, server-side apply as Apply, the status subresource) is attributed
  to its manager (``?fieldManager=``, else the User-Agent's first word) with the request's version, and the
  FieldsV1 sets follow the type (the CRD's schema: list-type set and map, map-type atomic; for built-ins the
  shapes of ObjectMeta, ConfigMap, Secret, ServiceAccount, Namespace and Event; other kinds as deduced
  types). Server-side apply merges by the schema, removes what the manager applied before and applies no
  more (unless someone else owns it), refuses to take another manager's field without ``force`` (the 409
  Conflict, worded the same), and needs a ``fieldManager`` and the resource's apiVersion/kind. Writes by the
  emulator's own methods (``add_namespace``, ``install_crd``...) and by its controllers (deletion, garbage
  collection) are attributed to no one.
- Tables (``kubectl get``): a CRD's printer columns (Age only when it declares none), the columns and cells
  kube-apiserver's printers give ConfigMaps, Secrets, ServiceAccounts, Namespaces, Events (both APIs), Pods
  and CRDs, Name and Created At for other kinds; ages as ``HumanDuration`` prints them (``2m15s``).
- OIDC discovery: ``jwks_uri`` is this server's own ``/openid/v1/jwks`` (kube-apiserver's default without
  ``--service-account-jwks-uri``), or ``jwks_uri=`` when given.
- CEL runs in cel-python (imported lazily), not cel-go: a rule it cannot parse or evaluate (CEL optionals
  and ``optionalOldSelf``, ``quantity``/``url``/``ip``/``format`` and other library functions beyond the
  string and list helpers provided here) is refused with an ``Internal error`` cause naming the rule, never
  passed; ``duration()``/``timestamp()`` follow Go's parsers. There is no CEL cost budget.
- Watches answer ``application/json``; ``as=Table`` watches (``kubectl get -w``) stream one-row Tables.
- Protobuf request bodies (kubectl's typed clients) are decoded for Namespace, ServiceAccount, ConfigMap,
  Secret, Event, TokenRequest and DeleteOptions (others get 415); answers are always JSON (406 for a client
  that accepts protobuf only).
- ``/openapi/v3`` documents carry each CRD's schema for ``kubectl explain``, and one PATCH operation per
  kind that tells kubectl the server validates fields.
- Namespaces: deleting one makes it Terminating, deletes what it holds and removes it once empty; nothing
  new may be created in it meanwhile. Namespace names must be DNS labels.

What it does not emulate: schemas of built-in kinds beyond the above (bodies are otherwise stored as
sent: no defaulting or validation of pod specs, no pruning of unknown fields), the events.k8s.io/v1 view
of core events (the two Event APIs are stored apart), admission webhooks and policies, CRD conversion
(only the storage version is served), the cap of ten Update managers and ``before-first-apply``,
authentication and RBAC (every request is allowed), the CRD cost estimator, field selectors beyond exact
matches, and protobuf or CBOR responses.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import dataclasses
import datetime
import decimal
import hashlib
import ipaddress
import itertools
import json
import os
import pathlib
import re
import secrets
import string
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jwt
import kmock
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

# kmock 0.8 (pinned) exports these without listing them in __all__, or not at all.
from kmock._internal.apps import KMockError
from kmock._internal.rendering import Response, StreamingError

from chainguard_identity_operator.chainguard.types import format_time

__all__ = ["DEFAULT_ISSUER", "KubeEmulator", "write_kubeconfig"]

DEFAULT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# What /version answers: the kube-apiserver release this emulator is checked against (tests/integration/
# test_differential.py compares the two), with the fields v1.37 adds.
SERVER_VERSION = {
    "major": "1",
    "minor": "37",
    "emulationMajor": "1",
    "emulationMinor": "37",
    "minCompatibilityMajor": "1",
    "minCompatibilityMinor": "36",
    "gitVersion": "v1.37.2",
    "gitCommit": "",
    "gitTreeState": "clean",
    "buildDate": "2026-10-27T12:01:04Z",
    "goVersion": "go1.26.8",
    "compiler": "gc",
    "platform": "linux/amd64",
}
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
MIN_TOKEN_SECONDS = 600  # the real TokenRequest API refuses less than 10 minutes
DEFAULT_TOKEN_SECONDS = 3600
EVENT_LOG_SIZE = 10_000  # how far back a watch may resume before it gets 410 Gone
DISCONNECT_POLL_SECONDS = 0.2  # how soon a watch notices that its client went away

_VERBS = ("create", "delete", "get", "list", "patch", "update", "watch")
_CRD_RESOURCE = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
_NAMESPACES = kmock.resource("", "v1", "namespaces")
_SERVICE_ACCOUNTS = kmock.resource("", "v1", "serviceaccounts")
_SECRETS = kmock.resource("", "v1", "secrets")
_PODS = kmock.resource("", "v1", "pods")
_EVENTS = kmock.resource("", "v1", "events")


def _info(
    kind: str,
    namespaced: bool,
    *,
    short: set[str] | None = None,
    categories: set[str] | None = None,
    subresources: set[str] | None = None,
) -> kmock.ResourceInfo:
    return kmock.ResourceInfo(
        kind=kind,
        singular=kind.lower(),
        namespaced=namespaced,
        verbs=set(_VERBS),
        shortnames=short or set(),
        categories=categories or set(),
        subresources=subresources or set(),
    )


# The built-in resources the operator, kopf and kubectl touch, as a real v1.37 server describes them.
_CORE_RESOURCES: tuple[tuple[kmock.resource, kmock.ResourceInfo], ...] = (
    (_NAMESPACES, _info("Namespace", False, short={"ns"})),
    (kmock.resource("", "v1", "configmaps"), _info("ConfigMap", True, short={"cm"})),
    (_SERVICE_ACCOUNTS, _info("ServiceAccount", True, short={"sa"}, subresources={"token"})),
    (_SECRETS, _info("Secret", True)),
    (_EVENTS, _info("Event", True, short={"ev"})),
    (
        _PODS,
        _info("Pod", True, short={"po"}, categories={"all"}, subresources={"status"}),
    ),
    (kmock.resource("events.k8s.io", "v1", "events"), _info("Event", True, short={"ev"})),
    (
        _CRD_RESOURCE,
        _info(
            "CustomResourceDefinition",
            False,
            short={"crd", "crds"},
            categories={"api-extensions"},
            subresources={"status"},
        ),
    ),
)

_PRESERVE_EVERYTHING: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
_PATCH_TYPES = (
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/apply-patch+yaml",
)


# -- errors -----------------------------------------------------------------------------------------


class ApiError(Exception):
    """A failure the API server reports as a ``Status`` object (never an emulator bug)."""

    def __init__(
        self, code: int, reason: str, message: str, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = dict(details) if details else None

    def status(self) -> dict[str, Any]:
        # metav1.Status's field order: details (when there are any) before code.
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        }
        if self.details:
            body["details"] = self.details
        body["code"] = self.code
        return body


def _qualified(resource: kmock.resource) -> str:
    """``configmaps`` or ``ktests.example.test``: how the API server names a resource in messages."""
    return f"{resource.plural}.{resource.group}" if resource.group else str(resource.plural)


def _details(resource: kmock.resource, name: str) -> dict[str, Any]:
    details: dict[str, Any] = {"name": name, "kind": resource.plural}
    if resource.group:
        details["group"] = resource.group
    return details


def _not_found(resource: kmock.resource, name: str) -> ApiError:
    msg = f'{_qualified(resource)} "{name}" not found'
    return ApiError(404, "NotFound", msg, _details(resource, name))


def _no_such_resource() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource")


def _conflict(resource: kmock.resource, name: str) -> ApiError:
    msg = (
        f'Operation cannot be fulfilled on {_qualified(resource)} "{name}": the object has been modified;'
        " please apply your changes to the latest version and try again"
    )
    return ApiError(409, "Conflict", msg, _details(resource, name))


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def _invalid(resource: kmock.resource, name: str, message: str) -> ApiError:
    return ApiError(
        422, "Invalid", f'{_qualified(resource)} "{name}" is invalid: {message}', _details(resource, name)
    )


# -- pure helpers -----------------------------------------------------------------------------------


def _api_version(resource: kmock.resource) -> str:
    return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, ``null`` deletes, anything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _is_named_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, Mapping) and "name" in item for item in value)


def _strategic_merge(target: Any, patch: Any) -> Any:
    """A strategic merge patch, approximated: a merge patch whose lists of named objects merge by ``name``.

    Directives (``$setElementOrder/...``, ``$retainKeys``, ``$deleteFromPrimitiveList/...``) are dropped,
    ``$patch: replace`` replaces an object and ``$patch: delete`` removes a named list item. Real servers
    pick merge keys per field from the schema; ``name`` is the key of every list the operator writes.
    """
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if not k.startswith("$")}
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        current = result.get(key)
        if value is None:
            result.pop(key, None)
        elif value and isinstance(current, list) and _is_named_list(value) and _is_named_list(current):
            merged = {item["name"]: item for item in current}
            for item in value:
                if item.get("$patch") == "delete":
                    merged.pop(item["name"], None)
                else:
                    merged[item["name"]] = _strategic_merge(merged.get(item["name"]), item)
            result[key] = list(merged.values())
        else:
            result[key] = _strategic_merge(current, value)
    return result


def _split_selector(text: str) -> list[str]:
    """Split a selector on commas that are not inside ``in (a, b)`` parentheses."""
    terms, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            terms.append(text[start:index])
            start = index + 1
    terms.append(text[start:])
    return [term.strip() for term in terms if term.strip()]


_SET_TERM = re.compile(r"^([\w./-]+)\s+(in|notin)\s*\(([^)]*)\)$")
_EQ_TERM = re.compile(r"^([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)$")
_EXISTS_TERM = re.compile(r"^(!?)\s*([\w./-]+)$")

Predicate = Callable[[Mapping[str, Any]], bool]


def _label_predicate(key: str, op: str, values: frozenset[str]) -> Predicate:
    def check(obj: Mapping[str, Any]) -> bool:
        labels = _labels(obj)
        match op:
            case "exists":
                return key in labels
            case "!exists":
                return key not in labels
            case "in" | "=" | "==":
                return labels.get(key) in values
            case _:  # "notin" and "!=" also match objects without the label, as on a real server
                return labels.get(key) not in values

    return check


def _label_selector(text: str) -> list[Predicate]:
    """Parse a label selector (``a=b,c!=d,e,!f,g in (x,y),h notin (z)``) into predicates on an object."""
    predicates: list[Predicate] = []
    for term in _split_selector(text):
        if m := _SET_TERM.match(term):
            values = frozenset(v.strip() for v in m[3].split(",") if v.strip())
            predicates.append(_label_predicate(m[1], m[2], values))
        elif m := _EQ_TERM.match(term):
            predicates.append(_label_predicate(m[1], m[2], frozenset([m[3]])))
        elif m := _EXISTS_TERM.match(term):
            predicates.append(_label_predicate(m[2], "!exists" if m[1] else "exists", frozenset()))
        else:
            raise _bad_request(f"unable to parse requirement: {term!r}")
    return predicates


def _labels(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    labels = _meta(obj).get("labels")
    return labels if isinstance(labels, Mapping) else {}


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return "" if value is None else str(value)


def _field_predicate(path: str, value: str, *, negated: bool) -> Predicate:
    def check(obj: Mapping[str, Any]) -> bool:
        return (_field_value(obj, path) == value) != negated

    return check


def _field_selector(text: str) -> list[Predicate]:
    """Parse a field selector (``metadata.name=x,involvedObject.uid!=y``); any dotted path is accepted."""
    predicates: list[Predicate] = []
    for term in _split_selector(text):
        m = re.match(r"^([\w.]+)\s*(==|=|!=)\s*(.*)$", term)
        if not m:
            raise _bad_request(f"invalid field selector: {term!r}")
        predicates.append(_field_predicate(m[1], m[3], negated=m[2] == "!="))
    return predicates


# -- field errors, worded as k8s.io/apimachinery/pkg/util/validation/field words them ------------------


class _Omit:
    """The value of a field error that prints none (Required, Forbidden, Too long, Internal error)."""

    def __repr__(self) -> str:
        return "<omitted>"


_OMIT = _Omit()
_ERROR_WORDS = {
    "FieldValueNotFound": "Not found",
    "FieldValueRequired": "Required value",
    "FieldValueDuplicate": "Duplicate value",
    "FieldValueInvalid": "Invalid value",
    "FieldValueNotSupported": "Unsupported value",
    "FieldValueForbidden": "Forbidden",
    "FieldValueTooLong": "Too long",
    "FieldValueTooMany": "Too many",
    "InternalError": "Internal error",
    "FieldValueTypeInvalid": "Invalid value",
}
_VALUELESS = frozenset({"FieldValueRequired", "FieldValueForbidden", "FieldValueTooLong", "InternalError"})
# Schema errors after which kube-apiserver does not run CEL rules (hasBlockingErr in the CR strategy).
_BLOCKING = frozenset(
    {
        "FieldValueNotSupported",
        "FieldValueRequired",
        "FieldValueTooLong",
        "FieldValueTooMany",
        "FieldValueTypeInvalid",
    }
)
_NOT_CHECKED = (
    "some validation rules were not checked because the object was invalid; correct the existing errors"
    " to complete validation"
)


@dataclasses.dataclass(frozen=True)
class _FieldError:
    """One ``field.Error``: a type (the cause's reason), the field path, the bad value and a detail."""

    type: str
    field: str
    value: Any = _OMIT
    detail: str = ""

    def body(self) -> str:
        """``ErrorBody()``: ``Invalid value: "x": detail``, the message of a Status cause."""
        text = _ERROR_WORDS[self.type]
        if self.type not in _VALUELESS and self.value is not _OMIT:
            text += ": " + _go_value(self.value)
        return f"{text}: {self.detail}" if self.detail else text

    def __str__(self) -> str:
        return f"{self.field or '<nil>'}: {self.body()}"

    def cause(self) -> dict[str, str]:
        return {"reason": self.type, "message": self.body(), "field": self.field or "<nil>"}


_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def _go_quote(text: str) -> str:
    """Go's ``%q`` (strconv.Quote) of a string."""
    out = ['"']
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif char in _GO_ESCAPES:
            out.append(_GO_ESCAPES[char])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif not char.isprintable() and char != " ":
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _go_float(value: float) -> str:
    """Go's ``%v`` of a float64 (strconv 'g' with the shortest digits; exponent from 1e+06 on)."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    sign, digits, exponent = decimal.Decimal(repr(value)).normalize().as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits)) or "0"
    if text == "0":
        return "-0" if sign else "0"
    point = len(text) + exponent  # position of the decimal point in the digit string
    exp = point - 1
    if exp < -4 or exp >= 6:  # shortest-digit %g switches to an exponent at 1e+06
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        result = f"{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    elif point <= 0:
        result = "0." + "0" * -point + text
    elif point >= len(text):
        result = text + "0" * (point - len(text))
    else:
        result = text[:point] + "." + text[point:]
    return ("-" if sign else "") + result


def _go_json_float(value: float) -> str:
    """encoding/json's float64: the shortest digits, in an exponent only below 1e-6 or from 1e21 on."""
    if value != value or value in (float("inf"), float("-inf")):
        return _go_float(value)  # unreachable for decoded JSON; json.Marshal would fail
    magnitude = abs(value)
    if magnitude == 0 or 1e-6 <= magnitude < 1e21:
        text = format(decimal.Decimal(repr(value)), "f")
        return text[:-2] if text.endswith(".0") else text
    mantissa, exponent = repr(value).split("e") if "e" in repr(value) else (repr(value), "0")
    mantissa = mantissa[:-2] if mantissa.endswith(".0") else mantissa
    return f"{mantissa}e{'-' if exponent.startswith('-') else '+'}{int(exponent.lstrip('+-'))}"


def _go_json(value: Any) -> str:
    """Go's ``json.Marshal`` of a decoded JSON value: compact, keys sorted, ``<``, ``>``, ``&`` escaped."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return _go_json_float(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
            text = text.replace(char, escaped)
        return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{_go_json(str(k))}:{_go_json(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_go_json(item) for item in value) + "]"
    return _go_json(str(value))


def _go_value(value: Any) -> str:
    """How ``ErrorBody`` (v1.37) prints a bad value: ``%q`` for strings, ``%v`` for numbers and booleans,
    JSON for anything else (``null``, objects, lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, str):
        return _go_quote(value)
    return _go_json(value)


def _aggregate(errors: Sequence[_FieldError]) -> str:
    """``ErrorList.ToAggregate().Error()``: one message, or ``[a, b]`` without duplicates."""
    messages = list(dict.fromkeys(str(error) for error in errors))
    return messages[0] if len(messages) == 1 else "[" + ", ".join(messages) + "]"


def _invalid_object(
    resource: kmock.resource, kind: str | None, name: str, errors: Sequence[_FieldError]
) -> ApiError:
    """``errors.NewInvalid``: 422 Invalid, ``Kind.group "name" is invalid: ...`` with one cause per error."""
    qualified = f"{kind}.{resource.group}" if resource.group else str(kind)
    details: dict[str, Any] = {"name": name}
    if resource.group:
        details["group"] = resource.group
    details["kind"] = kind
    details["causes"] = [error.cause() for error in errors]
    return ApiError(
        422, "Invalid", f"{qualified} {_go_quote(name)} is invalid: {_aggregate(errors)}", details
    )


# -- structural schemas: pruning, defaulting and OpenAPI validation, as kube-apiserver applies them -------

_ABSENT: Any = _Omit()  # no correlatable old value: a create, a new key, a list item without a match
_DNS1123_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must"
    f" start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is"
    f" '{_DNS1123_SUBDOMAIN}')"
)
_DNS1123_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and"
    f" end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is"
    f" '{_DNS1123_LABEL}')"
)
_INT64 = range(-(2**63), 2**63)


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _json_type(value: Any) -> str:
    """The JSON type kube-openapi infers from a decoded value (an int beyond int64 decodes as float64)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer" if value in _INT64 else "number"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _json_equal(a: Any, b: Any) -> bool:
    """Deep equality of decoded JSON that, like Go's DeepEqual, does not take ``true`` for ``1``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (Mapping, list)) or isinstance(b, (Mapping, list)):
        return False
    return bool(a == b)


def _go_regexp_search(pattern: str, text: str) -> bool:
    """An OpenAPI ``pattern``: Go's RE2 syntax, unanchored (re2 from cel-python's dependencies if present)."""
    try:
        import re2  # type: ignore[import-untyped]  # RE2 as Go has it: `$` is the very end of the text
    except ImportError:  # pragma: no cover - re2 comes with cel-python
        return re.search(pattern, text) is not None
    return re2.search(pattern, text) is not None


def _prune(
    value: Any, schema: Mapping[str, Any], path: str, unknown: list[str], *, root: bool = False
) -> None:
    """Drop fields the schema does not declare (recording their paths), in place, as the API server does
    when it decodes a custom resource; also drop ``null`` values of non-nullable fields without a default."""
    if isinstance(value, dict):
        kept: set[str] = set()
        if root or schema.get("x-kubernetes-embedded-resource"):
            kept = {"apiVersion", "kind", "metadata"}
            meta = value.get("metadata")
            if isinstance(meta, dict):  # ObjectMeta is decoded strictly: what it lacks is dropped
                for key in [k for k in meta if k not in _OBJECT_META_FIELDS]:
                    del meta[key]
                    unknown.append(_child(_child(path, "metadata"), key))
        properties: Mapping[str, Any] = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        for key in list(value):
            if key in kept:
                continue
            if key in properties:
                _prune(value[key], properties[key], _child(path, key), unknown)
            elif isinstance(additional, Mapping):
                _prune(value[key], additional, _child(path, key), unknown)
            elif not preserve and additional is not True:
                del value[key]
                unknown.append(_child(path, key))
        for key, sub in properties.items():
            if key in value and value[key] is None and not sub.get("nullable") and "default" not in sub:
                del value[key]
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(value):
            _prune(item, schema["items"], f"{path}[{index}]", unknown)


def _default(value: Any, schema: Mapping[str, Any]) -> None:
    """Fill in ``default``s top-down, in place (absent fields and non-nullable ``null``s), as the API server
    does on every decode; a defaulted object gets the defaults of its own properties too."""
    if isinstance(value, dict):
        properties: Mapping[str, Any] = schema.get("properties") or {}
        for key, sub in properties.items():
            if "default" in sub and (key not in value or (value[key] is None and not sub.get("nullable"))):
                value[key] = copy.deepcopy(sub["default"])
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            if key in properties:
                _default(item, properties[key])
            elif isinstance(additional, Mapping):
                _default(item, additional)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for item in value:
            _default(item, schema["items"])


def _is_date(text: str) -> bool:
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return re.fullmatch(r"\d{4}-\d{2}-\d{2}", text) is not None


_DATE_TIME_CLOCK = re.compile(r"([0-9]{2}):([0-9]{2}):([0-9]{2})(.[0-9]+)?(z|([+-][0-9]{2}:[0-9]{2}))")


def _is_date_time(text: str) -> bool:
    """strfmt's IsDateTime: a date, ``t`` (either case), and a clock with a ``z`` or an offset."""
    parts = text.lower().split("t")
    if len(text) < 4 or len(parts) < 2 or not _is_date(parts[0]):
        return False
    clock = _DATE_TIME_CLOCK.fullmatch(parts[1])
    return clock is not None and clock[1] <= "23" and clock[2] <= "59" and clock[3] <= "59"


def _is_base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except ValueError:
        return False
    return True


def _is_ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def _is_cidr(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return "/" in text


_UUID = r"(?i)[0-9a-f]{8}-?[0-9a-f]{4}-?%s[0-9a-f]{3}-?%s[0-9a-f]{3}-?[0-9a-f]{12}"
# The string formats checked (strfmt's registry); CRDs may name others, which are not checked.
_FORMATS: dict[str, Callable[[str], bool]] = {
    "date-time": _is_date_time,
    "datetime": _is_date_time,
    "date": _is_date,
    "byte": _is_base64,
    "uuid": lambda s: re.fullmatch(_UUID % ("[0-9a-f]", "[0-9a-f]"), s) is not None,
    "uuid3": lambda s: re.fullmatch(_UUID % ("3", "[0-9a-f]"), s) is not None,
    "uuid4": lambda s: re.fullmatch(_UUID % ("4", "[89ab]"), s) is not None,
    "uuid5": lambda s: re.fullmatch(_UUID % ("5", "[89ab]"), s) is not None,
    "ipv4": lambda s: _is_ip(s, 4),
    "ipv6": lambda s: _is_ip(s, 6),
    "cidr": _is_cidr,
    "mac": lambda s: re.fullmatch(r"(?i)([0-9a-f]{2}[:-]){5}[0-9a-f]{2}", s) is not None,
}


def _type_matches(expected: str, actual: str, value: Any) -> bool:
    if not expected or expected == actual:
        return True
    if expected == "integer" and actual == "number":
        return float(value).is_integer()  # 1.0 is an integer to kube-openapi
    return expected == "number" and actual == "integer"


def _enum_error(schema: Mapping[str, Any], value: Any, path: str) -> list[_FieldError]:
    enum = schema.get("enum")
    if not enum or any(_json_equal(value, allowed) for allowed in enum):
        return []
    supported = [v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for v in enum]
    detail = "supported values: " + ", ".join(_go_quote(s) for s in supported)
    return [_FieldError("FieldValueNotSupported", path, value, detail)]


def _schema_errors(schema: Mapping[str, Any], value: Any, path: str, old: Any = _ABSENT) -> list[_FieldError]:
    """kube-openapi's validation of one value (already pruned and defaulted), worded like the API server.

    ``old`` is the correlated value of the stored object on update: an unchanged value is not validated
    again (CRD validation ratcheting, on by default since 1.30). Checks run in kube-openapi's order: type,
    allOf/anyOf/oneOf/not, string, format, number, array, enum, object.
    """
    if old is not _ABSENT and _json_equal(value, old):
        return []
    where = f"{path} in body"
    expected, actual = str(schema.get("type") or ""), _json_type(value)
    errors: list[_FieldError] = []
    if schema.get("x-kubernetes-int-or-string") and actual not in ("integer", "string", "null"):
        # v1.37 checks int-or-string as one type with two names (v1.32 reported an anyOf failure too).
        detail = f"{where} must be of type integer,string: {_go_quote(actual)}"
        return [_FieldError("FieldValueTypeInvalid", path, actual, detail)]
    if value is None:
        if expected and not schema.get("nullable"):
            errors.append(
                _FieldError(
                    "FieldValueTypeInvalid", path, "null", f'{where} must be of type {expected}: "null"'
                )
            )
        return errors + _enum_error(schema, value, path)
    if not _type_matches(expected, actual, value):
        detail = f"{where} must be of type {expected}: {_go_quote(actual)}"
        return [_FieldError("FieldValueTypeInvalid", path, actual, detail), *_enum_error(schema, value, path)]
    errors += _combinator_errors(schema, value, path)
    if actual == "string":
        length = len(value)
        if "maxLength" in schema and length > schema["maxLength"]:
            detail = f"may not be more than {schema['maxLength']} bytes"
            errors.append(_FieldError("FieldValueTooLong", path, _OMIT, detail))
        if "minLength" in schema and length < schema["minLength"]:
            detail = f"{where} should be at least {schema['minLength']} chars long"
            errors.append(_FieldError("FieldValueInvalid", path, value, detail))
        if "pattern" in schema and not _go_regexp_search(schema["pattern"], value):
            detail = f"{where} should match '{schema['pattern']}'"
            errors.append(_FieldError("FieldValueInvalid", path, value, detail))
        check = _FORMATS.get(str(schema.get("format", "")))
        if check is not None and not check(value):
            detail = f"{where} must be of type {schema['format']}: {_go_quote(value)}"
            errors.append(_FieldError("FieldValueTypeInvalid", path, value, detail))
    elif actual in ("integer", "number"):
        errors += _number_errors(schema, value, path)
    elif actual == "array":
        items = schema.get("items")
        if isinstance(items, Mapping):
            olds = _correlate_items(schema, old)
            for index, item in enumerate(value):
                errors += _schema_errors(items, item, f"{path}[{index}]", olds(item))
        if "minItems" in schema and len(value) < schema["minItems"]:
            detail = f"{where} should have at least {schema['minItems']} items"
            errors.append(_FieldError("FieldValueInvalid", path, len(value), detail))
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            detail = f"must have at most {schema['maxItems']} items"
            errors.append(_FieldError("FieldValueTooMany", path, len(value), detail))
    errors += _enum_error(schema, value, path)
    if actual == "object":
        errors += _object_errors(schema, value, path, old)
    return errors


def _number_errors(schema: Mapping[str, Any], value: float, path: str) -> list[_FieldError]:
    where = f"{path} in body"
    errors: list[_FieldError] = []
    multiple = schema.get("multipleOf")
    if multiple and (value / multiple) != int(value / multiple):
        detail = f"{where} should be a multiple of {_go_float(float(multiple))}"
        errors.append(_FieldError("FieldValueInvalid", path, value, detail))
    if "maximum" in schema:
        limit, exclusive = schema["maximum"], bool(schema.get("exclusiveMaximum"))
        if value > limit or (exclusive and value == limit):
            relation = "less than" if exclusive else "less than or equal to"
            detail = f"{where} should be {relation} {_go_float(float(limit))}"
            errors.append(_FieldError("FieldValueInvalid", path, value, detail))
    if "minimum" in schema:
        limit, exclusive = schema["minimum"], bool(schema.get("exclusiveMinimum"))
        if value < limit or (exclusive and value == limit):
            relation = "greater than" if exclusive else "greater than or equal to"
            detail = f"{where} should be {relation} {_go_float(float(limit))}"
            errors.append(_FieldError("FieldValueInvalid", path, value, detail))
    return errors


def _object_errors(
    schema: Mapping[str, Any], value: Mapping[str, Any], path: str, old: Any
) -> list[_FieldError]:
    where = f"{path} in body"
    errors: list[_FieldError] = []
    if "minProperties" in schema and len(value) < schema["minProperties"]:
        detail = f"{where} should have at least {schema['minProperties']} properties"
        errors.append(_FieldError("FieldValueInvalid", path, len(value), detail))
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        detail = f"must have at most {schema['maxProperties']} items"
        errors.append(_FieldError("FieldValueTooMany", path, len(value), detail))
    properties: Mapping[str, Any] = schema.get("properties") or {}
    additional = schema.get("additionalProperties")
    correlated = isinstance(old, Mapping) and schema.get("x-kubernetes-map-type") != "atomic"
    if isinstance(additional, Mapping):
        for key, item in value.items():
            if key not in properties:
                previous = old.get(key, _ABSENT) if correlated else _ABSENT
                errors += _schema_errors(additional, item, _child(path, key), previous)
    for key, sub in properties.items():
        if key in value and not (path == "" and key == "metadata"):
            previous = old.get(key, _ABSENT) if correlated else _ABSENT
            errors += _schema_errors(sub, value[key], _child(path, key), previous)
    errors += [
        _FieldError("FieldValueRequired", _child(path, key))
        for key in schema.get("required") or []
        if key not in value
    ]
    return errors


def _combinator_errors(schema: Mapping[str, Any], value: Any, path: str) -> list[_FieldError]:
    """allOf, anyOf, oneOf and not (value validations only, in structural schemas): kube-openapi reports
    them with a message on the path and no field, plus the errors of the closest alternative."""
    errors: list[_FieldError] = []
    quoted = _go_quote(path)
    for sub in schema.get("allOf") or []:
        errors += _schema_errors(dict(sub, type=schema.get("type")), value, path)
    alternatives: list[list[_FieldError]] = [
        _schema_errors(dict(s, type=schema.get("type")), value, path) for s in schema.get("anyOf") or []
    ]
    if alternatives and all(alternatives):
        errors.append(
            _FieldError("FieldValueInvalid", "", "", f"{quoted} must validate at least one schema (anyOf)")
        )
        errors += sorted(alternatives, key=len)[0]  # the closest alternative's
    alternatives = [
        _schema_errors(dict(s, type=schema.get("type")), value, path) for s in schema.get("oneOf") or []
    ]
    valid = sum(1 for found in alternatives if not found)
    if alternatives and valid != 1:
        found = "Found none valid" if valid == 0 else f"Found {valid} valid alternatives"
        errors.append(
            _FieldError(
                "FieldValueInvalid",
                "",
                "",
                f"{quoted} must validate one and only one schema (oneOf). {found}",
            )
        )
        if valid == 0:
            errors += sorted(alternatives, key=len)[0]  # the closest alternative's
    negated = schema.get("not")
    if isinstance(negated, Mapping) and not _schema_errors(
        dict(negated, type=schema.get("type")), value, path
    ):
        errors.append(
            _FieldError("FieldValueInvalid", "", "", f"{quoted} must not validate the schema (not)")
        )
    return errors


def _correlate_items(schema: Mapping[str, Any], old: Any) -> Callable[[Any], Any]:
    """For an item of the new list, its old self: by key in a list-type map, by value in a set, else none."""
    if not isinstance(old, list):
        return lambda item: _ABSENT
    list_type = schema.get("x-kubernetes-list-type")
    if list_type == "map":
        keys = list(schema.get("x-kubernetes-list-map-keys") or [])

        def key_of(item: Any) -> Any:
            return json.dumps([item.get(k) for k in keys]) if isinstance(item, Mapping) else None

        by_key = {key_of(item): item for item in old if isinstance(item, Mapping)}
        return lambda item: by_key.get(key_of(item), _ABSENT)
    if list_type == "set":
        return lambda item: item if any(_json_equal(item, o) for o in old) else _ABSENT
    return lambda item: _ABSENT


def _list_type_errors(schema: Mapping[str, Any], value: Any, path: str) -> list[_FieldError]:
    """Duplicates in ``x-kubernetes-list-type`` sets and maps (the second appearance is reported)."""
    errors: list[_FieldError] = []
    if isinstance(value, Mapping):
        properties: Mapping[str, Any] = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            sub = properties.get(key) if key in properties else additional
            if isinstance(sub, Mapping) and not (path == "" and key == "metadata"):
                errors += _list_type_errors(sub, item, _child(path, key))
    elif isinstance(value, list):
        list_type = schema.get("x-kubernetes-list-type")
        keys = list(schema.get("x-kubernetes-list-map-keys") or [])
        if list_type in ("set", "map"):
            seen: dict[str, int] = {}
            for index, item in enumerate(value):
                if list_type == "map":
                    if item is not None and not isinstance(item, Mapping):
                        detail = "must be an object for an array of list-type map"
                        return [_FieldError("FieldValueInvalid", f"{path}[{index}]", item, detail)]
                    shown: Any = {k: item[k] for k in keys if isinstance(item, Mapping) and k in item}
                else:
                    shown = item
                marker = json.dumps(shown, sort_keys=True)
                seen[marker] = seen.get(marker, 0) + 1
                if seen[marker] == 2:
                    errors.append(_FieldError("FieldValueDuplicate", f"{path}[{index}]", shown))
        items = schema.get("items")
        if isinstance(items, Mapping):
            for index, item in enumerate(value):
                errors += _list_type_errors(items, item, f"{path}[{index}]")
    return errors


def _name_errors(name: str, *, label: bool = False) -> list[_FieldError]:
    """``metadata.name`` as ValidateObjectMeta checks it: a DNS-1123 subdomain (or label, for namespaces)."""
    limit, pattern, message = (
        (63, _DNS1123_LABEL, _DNS1123_LABEL_MSG)
        if label
        else (
            253,
            _DNS1123_SUBDOMAIN,
            _DNS1123_SUBDOMAIN_MSG,
        )
    )
    errors = []
    if len(name) > limit:
        errors.append(
            _FieldError(
                "FieldValueInvalid", "metadata.name", name, f"must be no more than {limit} characters"
            )
        )
    if not re.fullmatch(pattern, name):
        errors.append(_FieldError("FieldValueInvalid", "metadata.name", name, message))
    return errors


# -- x-kubernetes-validations: CEL rules with cel-python, as kube-apiserver runs them with cel-go ---------


_QUALIFIED_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_QUALIFIED_NAME_MSG = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric"
    f" character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '{_QUALIFIED_NAME}')"
)


def _qualified_name_errors(value: str, path: str) -> list[_FieldError]:
    """``ValidateQualifiedName``: an optional DNS-subdomain prefix and ``/``, then a name part."""
    parts = value.split("/")
    if len(parts) > 2:
        detail = (
            f"a qualified name {_QUALIFIED_NAME_MSG} with an optional DNS subdomain prefix and '/' (e.g."
            " 'example.com/MyName')"
        )
        return [_FieldError("FieldValueInvalid", path, value, detail)]
    errors: list[_FieldError] = []
    name = parts[-1]
    if len(parts) == 2:
        if not parts[0]:
            errors.append(_FieldError("FieldValueInvalid", path, value, "prefix part must be non-empty"))
        elif not re.fullmatch(_DNS1123_SUBDOMAIN, parts[0]) or len(parts[0]) > 253:
            errors.append(
                _FieldError("FieldValueInvalid", path, value, f"prefix part {_DNS1123_SUBDOMAIN_MSG}")
            )
    if not name:
        errors.append(_FieldError("FieldValueInvalid", path, value, "name part must be non-empty"))
    elif len(name) > 63:
        errors.append(
            _FieldError("FieldValueInvalid", path, value, "name part must be no more than 63 characters")
        )
    if not re.fullmatch(_QUALIFIED_NAME, name):
        errors.append(_FieldError("FieldValueInvalid", path, value, f"name part {_QUALIFIED_NAME_MSG}"))
    return errors


def _event_errors(event: Mapping[str, Any], namespace: str | None) -> list[_FieldError]:
    """The validation of a core v1 Event (``legacyValidateEvent``): its involved object is in its namespace;
    an event with an ``eventTime`` (the new API's) also names its reporting controller and instance, its
    action and its reason."""
    involved: Mapping[str, Any] = event.get("involvedObject") or {}
    involved = involved if isinstance(involved, Mapping) else {}
    involved_namespace = str(involved.get("namespace") or "")
    namespace = namespace or ""
    mismatch = _FieldError(
        "FieldValueInvalid", "involvedObject.namespace", involved_namespace, "does not match event.namespace"
    )
    errors: list[_FieldError] = []
    if event.get("eventTime") is None:
        if (not involved_namespace and namespace not in ("", "default")) or (
            involved_namespace and involved_namespace != namespace
        ):
            errors.append(mismatch)
        return errors
    if not involved_namespace and namespace not in ("default", "kube-system"):
        errors.append(mismatch)
    controller = str(event.get("reportingComponent") or "")
    if not controller:
        errors.append(_FieldError("FieldValueRequired", "reportingComponent"))
    errors += _qualified_name_errors(controller, "reportingComponent")
    for field, limit in (("reportingInstance", 128), ("action", 128), ("reason", 128)):
        text = str(event.get(field) or "")
        if not text:
            errors.append(_FieldError("FieldValueRequired", field))
        if len(text) > limit:
            errors.append(_FieldError("FieldValueInvalid", field, "", f"can have at most {limit} characters"))
    if len(str(event.get("message") or "")) > 1024:
        errors.append(_FieldError("FieldValueInvalid", "message", "", "can have at most 1024 characters"))
    return errors


class _CelUnsupported(Exception):
    """A rule cel-python cannot compile or evaluate, though cel-go (kube-apiserver) may well."""


_CEL_RESERVED = frozenset(
    "true false null in as break const continue else for function if import let loop package namespace"  # noqa: SIM905
    " return var void while".split()
)
_GO_DURATION_UNITS = {
    "ns": 1,
    "us": 10**3,
    "µs": 10**3,  # Go accepts both micro signs
    "μs": 10**3,
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}
_STRING_LITERAL = re.compile(r"'''.*?'''|\"\"\".*?\"\"\"|'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\"", re.DOTALL)


def _parse_go_duration(text: str) -> int:
    """Go's time.ParseDuration, in nanoseconds (``ValueError`` where Go returns an error)."""
    rest, negative = text, False
    if rest[:1] in ("-", "+"):
        negative, rest = rest[0] == "-", rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise ValueError(f"time: invalid duration {_go_quote(text)}")
    total = decimal.Decimal(0)
    while rest:
        number = re.match(r"([0-9]*)(\.[0-9]*)?", rest)
        assert number is not None  # the pattern matches the empty string
        if not number[1] and len(number[2] or "") <= 1:
            raise ValueError(f"time: invalid duration {_go_quote(text)}")
        rest = rest[number.end() :]
        unit = re.match(r"[^0-9.]+", rest)
        if unit is None:
            raise ValueError(f"time: missing unit in duration {_go_quote(text)}")
        if unit[0] not in _GO_DURATION_UNITS:
            raise ValueError(f"time: unknown unit {_go_quote(unit[0])} in duration {_go_quote(text)}")
        rest = rest[unit.end() :]
        total += decimal.Decimal((number[1] or "0") + (number[2] or "")) * _GO_DURATION_UNITS[unit[0]]
    nanoseconds = int(total)
    if nanoseconds > 2**63 - 1:
        raise ValueError(f"time: invalid duration {_go_quote(text)}")
    return -nanoseconds if negative else nanoseconds


def _cel_escape(name: str) -> str | None:
    """How a property name is spelled in CEL (``__dash__`` etc.); ``None`` if it cannot be accessed."""
    if name in _CEL_RESERVED:
        return f"__{name}__"
    if not re.fullmatch(r"[a-zA-Z_.\-/][a-zA-Z0-9_.\-/]*", name):
        return None
    for plain, escaped in (
        ("__", "__underscores__"),
        (".", "__dot__"),
        ("-", "__dash__"),
        ("/", "__slash__"),
    ):
        name = name.replace(plain, escaped)
    return name


def _uses_old_self(rule: str) -> bool:
    return re.search(r"\boldSelf\b", _STRING_LITERAL.sub("''", rule)) is not None


class _Cel:
    """Compiles (once) and evaluates CEL expressions with cel-python, imported on first use.

    cel-python is not cel-go: what it cannot parse (optionals such as ``self.?x``, ``optionalOldSelf``
    rules), functions it lacks (the Kubernetes libraries beyond the string and list helpers defined here:
    ``quantity``, ``url``, ``ip``, ``cidr``, ``format``, regex ``find``...), and results that are not a bool
    are reported as an ``InternalError`` cause naming the rule, never passed silently. Runtime errors are
    worded as cel-go words them where the two agree (``no such key: x``, ``no such overload``, the
    ``type conversion error`` of ``duration()``/``timestamp()``, which follow Go's parsers here).
    """

    MEMORY = 4096  # outcomes kept

    def __init__(self) -> None:
        self._programs: dict[str, Any] = {}
        self._environment: Any = None
        self.outcomes: dict[tuple[str, str], tuple[bool, str | None]] = {}

    def remember(self, key: tuple[str, str], outcome: tuple[bool, str | None]) -> tuple[bool, str | None]:
        if len(self.outcomes) >= self.MEMORY:
            del self.outcomes[next(iter(self.outcomes))]  # the oldest
        self.outcomes[key] = outcome
        return outcome

    def _celpy(self) -> Any:
        try:
            import celpy  # a test dependency, needed only when a CRD has CEL rules
        except ImportError as exc:  # pragma: no cover - installed with the test extras
            raise _CelUnsupported("cel-python is not installed (pip install cel-python)") from exc
        if self._environment is None:
            self._environment = celpy.Environment()
        return celpy

    def program(self, expression: str) -> Any:
        if expression not in self._programs:
            celpy = self._celpy()
            try:
                ast = self._environment.compile(expression)
            except celpy.CELParseError as exc:
                raise _CelUnsupported(f"cel-python cannot parse it: {' '.join(str(exc).split())}") from None
            self._programs[expression] = self._environment.program(ast, functions=_cel_functions())
        return self._programs[expression]

    def evaluate(self, expression: str, activation: Mapping[str, Any]) -> tuple[Any, str | None]:
        """``(value, None)``, or ``(None, message)`` worded like cel-go for a runtime error."""
        from celpy.evaluation import CELEvalError

        program = self.program(expression)
        try:
            result = program.evaluate(dict(activation))
        except CELEvalError as exc:
            return None, _cel_error_text(exc)
        if isinstance(result, CELEvalError):
            return None, _cel_error_text(result)
        return result, None

    def is_bool(self, value: Any) -> bool:
        from celpy import celtypes

        return isinstance(value, celtypes.BoolType)

    def value(self, value: Any, schema: Mapping[str, Any], *, root: bool = False) -> Any:
        """A decoded JSON value as CEL sees it through its schema (date-time strings are timestamps...)."""
        from celpy import celtypes

        return _to_cel(celtypes, value, schema, root=root)


def _cel_error_text(error: Exception) -> str:
    message = str(error.args[0]) if error.args else str(error)
    if message.startswith("undeclared reference to"):
        name = error.args[2][0] if len(error.args) > 2 and error.args[2] else message
        raise _CelUnsupported(f"cel-python has no function or variable {name!r}")
    if message.startswith("no such member in mapping: "):
        return "no such key: " + message.removeprefix("no such member in mapping: ").strip("'\"")
    if message.startswith(("found no matching overload", "no such overload")):
        return "no such overload"
    if message == "modulus or divide by zero":
        return "division by zero"
    if message == "invalid_argument" and len(error.args) > 1 and error.args[1] is IndexError:
        return "index out of bounds"
    return message


def _to_cel(celtypes: Any, value: Any, schema: Mapping[str, Any], *, root: bool = False) -> Any:
    if value is None:
        return None
    if isinstance(value, Mapping):
        properties: Mapping[str, Any] = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        fields: dict[Any, Any] = {}
        for key, item in value.items():
            if root and key == "metadata":
                # Rules at the root see only the name and generateName of the metadata.
                meta = item if isinstance(item, Mapping) else {}
                shown = {k: celtypes.StringType(meta[k]) for k in ("name", "generateName") if k in meta}
                fields[celtypes.StringType("metadata")] = celtypes.MapType(
                    {celtypes.StringType(k): v for k, v in shown.items()}
                )
            elif key in properties:
                escaped = _cel_escape(key)
                if escaped is not None:
                    fields[celtypes.StringType(escaped)] = _to_cel(celtypes, item, properties[key])
            elif isinstance(additional, Mapping):
                fields[celtypes.StringType(key)] = _to_cel(celtypes, item, additional)
            else:  # x-kubernetes-preserve-unknown-fields: untyped JSON
                fields[celtypes.StringType(key)] = _to_cel(celtypes, item, {})
        return celtypes.MapType(fields)
    if isinstance(value, list):
        items: Mapping[str, Any] = schema["items"] if isinstance(schema.get("items"), Mapping) else {}
        return celtypes.ListType([_to_cel(celtypes, item, items) for item in value])
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int):
        return celtypes.IntType(value) if value in _INT64 else celtypes.DoubleType(value)
    if isinstance(value, float):
        if schema.get("type") == "integer" and value.is_integer():
            return celtypes.IntType(int(value))
        return celtypes.DoubleType(value)
    if isinstance(value, str):
        converted = _typed_string(celtypes, value, str(schema.get("format", "")))
        return converted if converted is not None else celtypes.StringType(value)
    return value


def _typed_string(celtypes: Any, text: str, fmt: str) -> Any:
    """Strings with a format are typed in CEL: duration, date/date-time as timestamps, byte as bytes."""
    try:
        if fmt == "duration":
            nanoseconds = _parse_go_duration(text)
            return celtypes.DurationType(nanoseconds // 10**9, nanoseconds % 10**9)
        if fmt in ("date-time", "datetime") and _is_date_time(text):
            return celtypes.TimestampType(text.upper().replace(" ", "T"))
        if fmt == "date" and _is_date(text):
            return celtypes.TimestampType(f"{text}T00:00:00Z")
        if fmt == "byte":
            return celtypes.BytesType(base64.b64decode(text))
    except (ValueError, TypeError):
        return None
    return None


def _cel_functions() -> dict[str, Callable[..., Any]]:
    """Go-compatible ``duration``/``timestamp`` and the common Kubernetes string and list functions."""
    from celpy import celtypes
    from celpy.evaluation import CELEvalError

    def conversion_error(target: str) -> Any:
        return CELEvalError(f"type conversion error from 'string' to 'google.protobuf.{target}'")

    def duration(value: Any) -> Any:
        if isinstance(value, celtypes.DurationType):
            return value
        try:
            nanoseconds = _parse_go_duration(str(value))
        except ValueError:
            return conversion_error("Duration")
        return celtypes.DurationType(nanoseconds // 10**9, nanoseconds % 10**9)

    def timestamp(value: Any) -> Any:
        if isinstance(value, celtypes.TimestampType):
            return value
        text = str(value)
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})", text):
            return conversion_error("Timestamp")
        try:
            return celtypes.TimestampType(text)
        except ValueError:
            return conversion_error("Timestamp")

    def text(value: Any) -> Any:
        return celtypes.StringType(value)

    def index_of(target: Any, item: Any, start: Any = 0) -> Any:
        if isinstance(target, str):
            found = str(target).find(str(item), int(start))
        else:
            found = next((i for i, x in enumerate(target) if x == item), -1)
        return celtypes.IntType(found)

    def last_index_of(target: Any, item: Any) -> Any:
        if isinstance(target, str):
            return celtypes.IntType(str(target).rfind(str(item)))
        return celtypes.IntType(max((i for i, x in enumerate(target) if x == item), default=-1))

    def split(value: Any, separator: Any, limit: Any = -1) -> Any:
        parts = (
            str(value).split(str(separator), int(limit) - 1)
            if int(limit) > 0
            else str(value).split(str(separator))
        )
        return celtypes.ListType([text(part) for part in (parts if int(limit) != 0 else [])])

    def replace(value: Any, old: Any, new: Any, limit: Any = -1) -> Any:
        return text(str(value).replace(str(old), str(new), int(limit)))

    def substring(value: Any, start: Any, end: Any = None) -> Any:
        chars = str(value)
        stop = len(chars) if end is None else int(end)
        if not 0 <= int(start) <= stop <= len(chars):
            return CELEvalError(f"index out of range: {int(start) if int(start) > len(chars) else stop}")
        return text(chars[int(start) : stop])

    def join(items: Any, separator: Any = "") -> Any:
        return text(str(separator).join(str(item) for item in items))

    def extreme(pick: Callable[..., Any]) -> Callable[[Any], Any]:
        def apply(items: Any) -> Any:
            return pick(items) if items else CELEvalError(f"{pick.__name__}(list) argument must not be empty")

        return apply

    return {
        "duration": duration,
        "timestamp": timestamp,
        "lowerAscii": lambda s: text("".join(c.lower() if c.isascii() else c for c in str(s))),
        "upperAscii": lambda s: text("".join(c.upper() if c.isascii() else c for c in str(s))),
        "trim": lambda s: text(str(s).strip()),
        "charAt": lambda s, i: text(str(s)[int(i) : int(i) + 1]),
        "indexOf": index_of,
        "lastIndexOf": last_index_of,
        "split": split,
        "replace": replace,
        "substring": substring,
        "join": join,
        "isSorted": lambda items: celtypes.BoolType(all(a <= b for a, b in itertools.pairwise(items))),
        "sum": lambda items: sum(items[1:], items[0]) if items else celtypes.IntType(0),
        "min": extreme(min),
        "max": extreme(max),
    }


_CEL = _Cel()  # one program cache for every emulator in the process


def _cel_errors(
    schema: Mapping[str, Any],
    value: Any,
    old: Any,
    path: str,
    warnings: list[str],
    *,
    root: bool = False,
) -> list[_FieldError]:
    """Every ``x-kubernetes-validations`` rule on the value and below it, top-down, as the API server runs
    them: ``self`` is the value at the rule's node (absent values are not validated), transition rules
    (``oldSelf``) run only on update where an old value correlates, and a failing rule on an unchanged
    value is ratcheted into a warning unless it is a transition rule."""
    if value is None:
        return []
    errors: list[_FieldError] = []
    rules = schema.get("x-kubernetes-validations") or []
    if rules:
        errors += _node_cel_errors(schema, rules, value, old, path, warnings, root=root)
    if isinstance(value, Mapping):
        properties: Mapping[str, Any] = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        correlated = isinstance(old, Mapping) and schema.get("x-kubernetes-map-type") != "atomic"
        for key, sub in properties.items():
            if key in value and not (root and key == "metadata"):
                previous = old.get(key, _ABSENT) if correlated else _ABSENT
                errors += _cel_errors(sub, value[key], previous, _child(path, key), warnings)
        if isinstance(additional, Mapping):
            for key, item in value.items():
                if key not in properties:
                    previous = old.get(key, _ABSENT) if correlated else _ABSENT
                    errors += _cel_errors(additional, item, previous, f"{path}[{key}]", warnings)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        olds = _correlate_items(schema, old) if schema.get("x-kubernetes-list-type") == "map" else None
        for index, item in enumerate(value):
            previous = olds(item) if olds is not None else _ABSENT
            errors += _cel_errors(schema["items"], item, previous, f"{path}[{index}]", warnings)
    return errors


def _node_cel_errors(
    schema: Mapping[str, Any],
    rules: Sequence[Mapping[str, Any]],
    value: Any,
    old: Any,
    path: str,
    warnings: list[str],
    *,
    root: bool,
) -> list[_FieldError]:
    errors: list[_FieldError] = []
    kind = str(schema.get("type") or "")
    unchanged = old is not _ABSENT and _json_equal(value, old)
    bound: dict[str, Any] = {}

    def activation() -> dict[str, Any]:
        if not bound:  # converted once per node, and only if a rule has to be evaluated
            bound["self"] = _CEL.value(value, schema, root=root)
            if old is not _ABSENT:
                bound["oldSelf"] = _CEL.value(old, schema, root=root)
        return bound

    # cel-python is slow and most writes (status updates) leave the spec as it was: outcomes are memoised
    # by rule, schema node and values, so an unchanged object costs one lookup per rule.
    node = json.dumps([schema, value, old if old is not _ABSENT else None, root], sort_keys=True, default=str)
    for rule in rules:
        expression = str(rule.get("rule", ""))
        transition = _uses_old_self(expression)
        if not expression or (transition and old is _ABSENT and not rule.get("optionalOldSelf")):
            continue
        message = str(rule.get("message") or "").strip()
        shown = message or expression.strip()  # ruleErrorString: the message, else the rule
        try:
            if transition and rule.get("optionalOldSelf"):
                raise _CelUnsupported("cel-python has no CEL optionals, which optionalOldSelf rules use")
            outcome = _CEL.outcomes.get((expression, node))
            if outcome is None:
                evaluated, failure = _CEL.evaluate(expression, activation())
                if failure is None and not _CEL.is_bool(evaluated):
                    raise _CelUnsupported(f"the rule evaluated to {type(evaluated).__name__}, not bool")
                outcome = _CEL.remember((expression, node), (bool(evaluated), failure))
            result, failure = outcome
        except _CelUnsupported as exc:
            detail = (
                f"the emulator cannot evaluate the rule {expression!r} with cel-python (kube-apiserver"
                f" evaluates it with cel-go): {exc}"
            )
            errors.append(_FieldError("InternalError", path, _OMIT, detail))
            continue
        if failure is not None:  # a runtime error: no such key, a failed conversion...
            if failure == "no such overload":
                detail = (
                    f"'{failure}': call arguments did not match a supported operator, function or macro"
                    f" signature for rule: {shown}"
                )
            else:
                detail = f"{failure} evaluating rule: {shown}"
            errors.append(_FieldError("FieldValueInvalid", path, kind, detail))
            continue
        if result:
            continue
        field_path = str(rule.get("fieldPath") or "").lstrip(".")
        where = (
            (f"{path}{field_path}" if field_path.startswith("[") else _child(path, field_path))
            if field_path
            else path
        )
        detail = message or f"failed rule: {expression.strip()}"
        if rule.get("messageExpression"):
            try:
                evaluated, failure = _CEL.evaluate(str(rule["messageExpression"]), activation())
            except _CelUnsupported:
                evaluated, failure = None, "unsupported"
            # Like the API server, fall back to the message if the expression fails or is not one line.
            if failure is None and isinstance(evaluated, str):  # concatenation yields a plain str
                candidate = evaluated.strip()
                if candidate and "\n" not in candidate and "\r" not in candidate:
                    detail = candidate
        reason = rule.get("reason")
        # Since v1.35 a failed rule shows the value it failed on when that is a scalar, and none for an
        # object or a list (v1.32 showed the schema type, "object", in its place).
        shown_value = _OMIT if kind in ("object", "array") else value
        if reason == "FieldValueForbidden":
            error = _FieldError("FieldValueForbidden", where, _OMIT, detail)
        elif reason == "FieldValueRequired":
            error = _FieldError("FieldValueRequired", where, _OMIT, detail)
        elif reason == "FieldValueDuplicate":
            error = _FieldError("FieldValueDuplicate", where, shown_value)
        else:
            error = _FieldError("FieldValueInvalid", where, shown_value, detail)
        if unchanged and not transition:
            warnings.append(str(error))  # validation ratcheting: an unchanged value keeps its old faults
        else:
            errors.append(error)
    return errors


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclasses.dataclass(frozen=True)
class _SigningKey:
    kid: str
    private_key: rsa.RSAPrivateKey = dataclasses.field(repr=False)
    public_jwk: dict[str, Any]

    @classmethod
    def generate(cls) -> _SigningKey:
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        numbers = private_key.public_key().public_numbers()
        e, n = _b64url_uint(numbers.e), _b64url_uint(numbers.n)
        # RFC 7638 thumbprint: SHA-256 of the required members in lexicographic order, no whitespace.
        canonical = json.dumps({"e": e, "kty": "RSA", "n": n}, separators=(",", ":"), sort_keys=True)
        kid = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()
        jwk = {"use": "sig", "kty": "RSA", "kid": kid, "alg": "RS256", "n": n, "e": e}
        return cls(kid=kid, private_key=private_key, public_jwk=jwk)


@dataclasses.dataclass(frozen=True)
class _Route:
    """What a URL addresses, parsed the way the API server does (kmock's parser mistakes some URLs)."""

    resource: kmock.resource | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None


def _parse_route(path: str) -> _Route:
    parts = [part for part in path.split("/") if part]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    elif len(parts) == 2 and parts[0] == "apis":
        return _Route(resource=kmock.resource(group=parts[1]))
    else:
        return _Route()
    namespace: str | None = None
    # /namespaces/{ns}/{plural}/... is namespaced, except /namespaces/{name}/status|finalize (Namespace's own).
    if (
        len(rest) >= 3
        and rest[0] == "namespaces"
        and not (len(rest) == 3 and rest[2] in ("status", "finalize"))
    ):
        namespace, rest = rest[1], rest[2:]
    plural = rest[0] if rest else None
    name = rest[1] if len(rest) > 1 else None
    subresource = "/".join(rest[2:]) or None
    resource = kmock.resource(group=group, version=version, plural=plural)
    return _Route(resource=resource, namespace=namespace, name=name, subresource=subresource)


def _guess_action(route: _Route, method: str, params: Mapping[str, str]) -> kmock.action | None:
    if route.resource is None or route.resource.version is None:
        return None
    if method == "GET" and params.get("watch") in ("true", "1"):
        return kmock.action.WATCH
    if route.name is None:
        return {"GET": kmock.action.LIST, "POST": kmock.action.CREATE}.get(method)
    return {"GET": kmock.action.FETCH, "PATCH": kmock.action.UPDATE, "DELETE": kmock.action.DELETE}.get(
        method
    )


@dataclasses.dataclass(eq=False)
class _Watch:
    """One open watch request: what it wants to see, and the queue its events are delivered to."""

    resource: kmock.resource
    namespace: str | None
    name: str | None
    predicates: list[Predicate]
    queue: asyncio.Queue[dict[str, Any]] = dataclasses.field(default_factory=asyncio.Queue)

    def wants(self, resource: kmock.resource, obj: Mapping[str, Any]) -> bool:
        meta = _meta(obj)
        return (
            resource == self.resource
            and (self.namespace is None or meta.get("namespace") == self.namespace)
            and (self.name is None or meta.get("name") == self.name)
            and all(predicate(obj) for predicate in self.predicates)
        )


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# -- the emulator -----------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """A stateful Kubernetes API server: ``async with KubeEmulator() as kube, kmock.Server(kube) as server``.

    Not thread-safe: call its methods from the thread that runs its event loop (HTTP clients may live anywhere).
    """

    issuer: str = DEFAULT_ISSUER
    # The discovery document's jwks_uri, as --service-account-jwks-uri sets it; None (the default): the
    # API server's own address, as kube-apiserver publishes it without that flag.
    jwks_uri: str | None = None
    clock: Callable[[], datetime.datetime] | None = None
    bookmark_interval: float = 30.0  # how often an idle watch that allows bookmarks gets one

    _resource_version: int = attrs.field(default=0, init=False)
    _signing_keys: list[_SigningKey] = attrs.field(factory=list, init=False)  # the current key is the last
    _event_log: collections.deque[tuple[int, kmock.resource, dict[str, Any]]] = attrs.field(
        factory=collections.deque, init=False
    )
    _compacted_rv: int = attrs.field(default=0, init=False)  # events up to this rv are no longer replayable
    _watches: set[_Watch] = attrs.field(factory=set, init=False)
    _crd_resources: dict[str, kmock.resource] = attrs.field(factory=dict, init=False)  # CRD name → resource
    _warnings: list[str] = attrs.field(factory=list, init=False)  # the Warning headers of the current request
    _emptying: set[str] = attrs.field(factory=set, init=False)  # namespaces whose contents are being deleted
    # Each CRD schema's merge type, by the schema object's id (kept with it, so an id is never reused).
    _shapes: dict[int, tuple[dict[str, Any], _Shape]] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()  # kmock's discovery, list/watch/fetch/create/patch/delete fallbacks
        self.fallback[kmock.method.PUT] << self._serve_replace
        self.fallback[kmock.method.POST] << self._serve_subresource_create
        self.fallback["get /.well-known/openid-configuration"] << self._serve_openid_configuration
        self.fallback["get /openid/v1/jwks"] << self._serve_jwks
        self.fallback["get /openapi/v3"] << self._serve_openapi_root
        self.fallback["get", re.compile(r"/openapi/v3/.+")] << self._serve_openapi_group_version
        for resource, info in _CORE_RESOURCES:
            self.resources[resource] = copy.deepcopy(info)
        for namespace in DEFAULT_NAMESPACES:
            self.add_namespace(namespace)

    # -- public API for tests and the sandbox ---------------------------------------------------------

    def install_crd(self, crd: Mapping[str, Any]) -> None:
        """Register the resource a CRD manifest defines and store the CRD (created or replaced).

        Raises ``ApiError`` (422 Invalid) for a CRD without group, names or a served version.
        """
        body = copy.deepcopy(dict(crd))
        body.setdefault("apiVersion", "apiextensions.k8s.io/v1")
        body.setdefault("kind", "CustomResourceDefinition")
        name = _meta(body).get("name")
        if not name:
            raise ValueError("a CustomResourceDefinition needs metadata.name")
        old = self._current(_CRD_RESOURCE, None, name)
        if old is None:
            self._create(_CRD_RESOURCE, None, body)
        else:
            self._replace(_CRD_RESOURCE, None, name, body, old=old, check_version=False)

    def forget_requests(self) -> None:
        """Drop the requests served so far from kmock's log. kmock matches each new request against its
        payloads by walking their views of the whole log, so every request costs more than the one
        before; a long test that needs no history of its earlier steps forgets it between them. Call it
        from the loop serving the emulator, between awaits (no request is being matched then), and
        not in a test that registered a sliced or counted reaction (``kube[...][:1] << 503``): those
        count the log, so a forgotten request would be counted again."""
        self._requests.clear()

    def add_namespace(self, name: str) -> None:
        """Create a namespace (if absent) and its ``default`` service account, as a cluster does."""
        if self._current(_NAMESPACES, None, name) is None:
            self._create(_NAMESPACES, None, {"metadata": {"name": name}})
        else:
            self.add_service_account(name, "default")

    def add_service_account(self, namespace: str, name: str) -> None:
        """Create a service account (if absent); its namespace is created too if needed."""
        if self._current(_NAMESPACES, None, namespace) is None:
            self.add_namespace(namespace)
        if self._current(_SERVICE_ACCOUNTS, namespace, name) is None:
            self._create(_SERVICE_ACCOUNTS, namespace, {"metadata": {"name": name, "namespace": namespace}})

    def mint_token(
        self,
        namespace: str,
        service_account: str,
        *,
        audiences: Sequence[str],
        expiration_seconds: int = DEFAULT_TOKEN_SECONDS,
    ) -> str:
        """Issue the same JWT the TokenRequest API returns. ``LookupError`` if the service account is absent."""
        sa = self._current(_SERVICE_ACCOUNTS, namespace, service_account)
        if sa is None:
            raise LookupError(f"service account {namespace}/{service_account} does not exist")
        iat = int(self._now().timestamp())
        claims = {
            "aud": list(audiences),
            "exp": iat + expiration_seconds,
            "iat": iat,
            "iss": self.issuer,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account, "uid": _meta(sa)["uid"]},
            },
            "nbf": iat,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
        }
        key = self._keys()[-1]
        # Real service-account tokens carry only alg and kid in the header (no "typ").
        return jwt.encode(claims, key.private_key, algorithm="RS256", headers={"kid": key.kid, "typ": None})

    def rotate_signing_key(self, *, keep_previous: bool = True) -> str:
        """Make a new current signing key and return its kid; old keys stay published unless told not to."""
        keys = self._keys() if keep_previous else []
        key = _SigningKey.generate()
        self._signing_keys[:] = [*keys, key]
        return key.kid

    def retire_previous_keys(self) -> None:
        """Drop all but the current key from the JWKS: tokens signed by them stop verifying."""
        del self._keys()[:-1]

    def jwks(self) -> dict[str, Any]:
        """The public JWKS as ``/openid/v1/jwks`` serves it, the current key first."""
        return {"keys": [dict(key.public_jwk) for key in reversed(self._keys())]}

    def _keys(self) -> list[_SigningKey]:
        # Generated on first use: an RSA key costs ~80 ms and most tests never issue a token.
        if not self._signing_keys:
            self._signing_keys.append(_SigningKey.generate())
        return self._signing_keys

    def openid_configuration(self, server_url: str | None = None) -> dict[str, Any]:
        """The OIDC discovery document as ``/.well-known/openid-configuration`` serves it. Its ``jwks_uri`` is
        ``self.jwks_uri`` if set, else this server's own ``/openid/v1/jwks`` at ``server_url`` (the address
        the request came to; without one, the issuer's)."""
        base = (server_url or self.issuer).rstrip("/")
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri or f"{base}/openid/v1/jwks",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def current(
        self, resource: str | kmock.resource, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        """A copy of an object's current state, or ``None`` (a convenience over ``kube.objects[...]``)."""
        current = self._current(kmock.resource(resource), namespace, name)
        return copy.deepcopy(current) if current is not None else None

    @property
    def resource_version(self) -> str:
        """The latest resourceVersion handed out (what a list returns now)."""
        return str(self._resource_version)

    # -- request parsing & dispatch -------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock's own request parser fails on /api/v1/namespaces and reads /api/v1/namespaces/x as
        # "namespace x", so requests are parsed here; error handling mirrors kmock's RawHandler.
        body = await raw_request.read()
        request = self._parse_request(raw_request, body)
        self._requests.append(request)
        try:
            if self.limit is not None and len(self._requests) > self.limit:
                raise KMockError("Too many requests have been served so far.")
            return await self._handle(request)
        except Exception as exc:
            if not self._errors:
                raise
            stream = exc.args[0] if isinstance(exc, StreamingError) else None
            cause = exc.__cause__ if stream is not None and isinstance(exc.__cause__, Exception) else exc
            self._errors[-1].append(cause)
            if not isinstance(stream, aiohttp.web.StreamResponse) or not stream.prepared:
                return await self._render_error(cause)
            await self._stream_error(cause, stream)
            await stream.write_eof()
            return stream

    def _parse_request(self, raw_request: aiohttp.web.BaseRequest, body: bytes) -> kmock.Request:
        text = body.decode("utf-8", errors="replace")
        data: Any
        if body and raw_request.headers.get("Content-Type", "").startswith(_PROTOBUF):
            try:
                data = _decode_protobuf(body)  # so that tests see what was sent, as JSON
            except ApiError:
                data = None  # the handler decodes it again to answer with the reason
        else:
            try:
                data = json.loads(text) if body else None
            except ValueError:
                data = None
        route = _parse_route(raw_request.path)
        params = dict(raw_request.query)
        return kmock.Request(
            id=len(self._requests),
            raw_request=raw_request,
            url=raw_request.url,
            method=raw_request.method,
            params=params,
            headers=dict(raw_request.headers),
            cookies=dict(raw_request.cookies),
            body=body,
            text=text,
            data=data,
            action=_guess_action(route, raw_request.method, params),
            resource=route.resource,
            namespace=route.namespace,
            name=route.name,
            subresource=route.subresource,
        )

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # Skip KubernetesEmulator._handle (it writes objects its own way before dispatching) and go
        # straight to kmock's reaction dispatch: user reactions first, then the fallbacks below.
        return await kmock.RawHandler._handle(self, request)

    def _api(self, request: kmock.Request, handler: Callable[[kmock.Request], tuple[int, Any]]) -> Response:
        self._warnings = []
        try:
            _require_json_acceptable(request)
            status, body = handler(request)
        except ApiError as exc:
            status, body = exc.code, exc.status()
        # kmock 0.8 merges a returned Response's headers into the (shared) reaction that called us, so the
        # header is always set: to None when there is nothing to warn about, which kmock leaves out.
        warning = _warning_header(self._warnings) if self._warnings else None
        return Response(status=status, payload=body, headers={"Warning": warning})

    def _lookup(self, request: kmock.Request) -> tuple[kmock.resource, kmock.ResourceInfo]:
        resource = request.resource
        if resource is None or resource.plural is None or resource not in self.resources:
            raise _no_such_resource()
        info = self.resources[resource]
        all_namespaces = request.action in (kmock.action.LIST, kmock.action.WATCH)
        if info.namespaced and request.namespace is None and not all_namespaces:
            raise _no_such_resource()
        if not info.namespaced and request.namespace is not None:
            raise _no_such_resource()
        return resource, info

    def _require_namespace(self, namespace: str | None) -> None:
        if namespace is not None and self._current(_NAMESPACES, None, namespace) is None:
            raise _not_found(_NAMESPACES, namespace)

    # -- reads ------------------------------------------------------------------------------------------

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        return self._api(request, self._fetch)

    def _fetch(self, request: kmock.Request) -> tuple[int, Any]:
        resource, info = self._lookup(request)
        assert request.name is not None  # FETCH is the named GET
        if request.subresource is not None and request.subresource not in info.subresources - {"token"}:
            raise _no_such_resource()
        current = self._current(resource, request.namespace, request.name)
        if current is None:
            raise _not_found(resource, request.name)
        return 200, current

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        return self._api(request, self._list)

    def _list(self, request: kmock.Request) -> tuple[int, Any]:
        resource, info = self._lookup(request)
        predicates = self._selectors(request)
        items = [
            obj
            for obj in self._objects_of(resource, request.namespace)
            if all(predicate(obj) for predicate in predicates)
        ]
        kind = info.kind or str(resource.plural).capitalize()
        if "as=Table" in request.headers.get("Accept", ""):
            return 200, self._table(resource, items)
        if not self._is_custom(resource):
            # A typed list's items carry no apiVersion and kind (the list says them once); custom
            # resources are lists of maps, each item with its own.
            items = [{k: v for k, v in item.items() if k not in ("apiVersion", "kind")} for item in items]
        return 200, {
            "kind": f"{kind}List",
            "apiVersion": _api_version(resource),
            "metadata": {"resourceVersion": str(self._resource_version)},
            "items": items,
        }

    def _selectors(self, request: kmock.Request) -> list[Predicate]:
        return _label_selector(request.params.get("labelSelector", "")) + _field_selector(
            request.params.get("fieldSelector", "")
        )

    def _objects_of(self, resource: kmock.resource, namespace: str | None) -> list[dict[str, Any]]:
        found = []
        for (res, ns, name), obj in list(self.objects.items()):
            if res == resource and (namespace is None or ns == namespace) and not obj.deleted:
                current = self._current(res, ns, name)
                if current is not None:
                    found.append(((ns or "", name), current))
        return [obj for _, obj in sorted(found, key=lambda pair: pair[0])]

    def _table(self, resource: kmock.resource, items: list[dict[str, Any]]) -> dict[str, Any]:
        """A ``meta.k8s.io/v1`` Table for ``kubectl get``: a custom resource's printer columns (or Age), a
        built-in kind's columns as kube-apiserver's printers fill them, or Name and Created At."""
        definitions, cells_of = self._printer(resource)
        rows = [
            {
                "cells": cells_of(obj),
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": _go_ordered("ObjectMeta", _meta(obj)),
                },
            }
            for obj in items
        ]
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": str(self._resource_version)},
            "columnDefinitions": definitions,
            "rows": rows,
        }

    def _printer(
        self, resource: kmock.resource
    ) -> tuple[list[dict[str, Any]], Callable[[Mapping[str, Any]], list[Any]]]:
        """The column definitions of a resource's table, and how to fill a row."""
        _, version = self._crd_version(resource)
        if version is not None:
            return self._custom_printer(version)
        kind = self.resources[resource].kind or ""
        if resource.group == "events.k8s.io":
            kind = "events.k8s.io/Event"
        table_kind = "Event" if kind == "events.k8s.io/Event" else kind
        if table_kind not in _BUILTIN_COLUMNS:
            table_kind = ""
        definitions = [
            {
                "name": name,
                "type": type_,
                "format": format_,
                "description": _COLUMN_DOCS.get((table_kind, name))
                or (_NAME_DOC if name == "Name" else _CREATION_DOC),
                "priority": priority,
            }
            for name, type_, format_, priority in _BUILTIN_COLUMNS[table_kind]
        ]
        return definitions, lambda obj: self._builtin_cells(kind, table_kind, obj)

    def _custom_printer(
        self, version: Mapping[str, Any]
    ) -> tuple[list[dict[str, Any]], Callable[[Mapping[str, Any]], list[Any]]]:
        # Without printer columns a CRD gets an Age column (serveDefaultColumnsIfEmpty); with some, only them.
        columns = list(version.get("additionalPrinterColumns") or []) or [
            {
                "name": "Age",
                "type": "date",
                "description": _CREATION_DOC,
                "jsonPath": ".metadata.creationTimestamp",
            }
        ]
        definitions = [
            {"name": "Name", "type": "string", "format": "name", "description": _NAME_DOC, "priority": 0}
        ]
        for column in columns:
            json_path = str(column.get("jsonPath", ""))
            definitions.append(
                {
                    "name": column.get("name"),
                    "type": column.get("type", "string"),
                    "format": column.get("format", ""),
                    "description": column.get("description")
                    or f"Custom resource definition column (in JSONPath format): {json_path}",
                    "priority": column.get("priority", 0),
                }
            )

        def cells(obj: Mapping[str, Any]) -> list[Any]:
            row: list[Any] = [_meta(obj).get("name")]
            for column in columns:
                value = _json_path(obj, str(column.get("jsonPath", "")))
                row.append(self._custom_cell(str(column.get("type", "string")), value))
            return row

        return definitions, cells

    def _custom_cell(self, type_: str, value: Any) -> Any:
        """apiextensions' tableconvertor: a string column prints the value, a date becomes an age, the
        other types pass through when the value has that type; a missing value is null (an empty cell)."""
        if value is None:
            return None
        if type_ == "string":
            return _jsonpath_text(value)
        if type_ == "date":
            if not isinstance(value, str):
                return None
            return self._age(value) if _parse_timestamp(value) is not None else "<invalid>"
        if type_ == "integer" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
        if type_ == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if type_ == "boolean" and isinstance(value, bool):
            return value
        return None

    def _builtin_cells(self, kind: str, table_kind: str, obj: Mapping[str, Any]) -> list[Any]:
        """One row as kube-apiserver's printer for the kind fills it (``printEvent``, ``printConfigMap``...)."""
        meta = _meta(obj)
        name, created = meta.get("name"), meta.get("creationTimestamp")
        match table_kind:
            case "ConfigMap":
                size = len(obj.get("data") or {}) + len(obj.get("binaryData") or {})
                return [name, size, self._age(created)]
            case "Secret":
                return [name, obj.get("type", ""), len(obj.get("data") or {}), self._age(created)]
            case "ServiceAccount":
                return [name, self._age(created)]
            case "Namespace":
                return [name, (obj.get("status") or {}).get("phase", ""), self._age(created)]
            case "Event":
                return self._event_cells(kind, obj)
            case "Pod":
                return self._pod_cells(obj)
            case "CustomResourceDefinition":
                spec = obj.get("spec") or {}
                versions = ",".join(
                    f"{v.get('name')}{'(storage)' if v.get('storage') else ''}"
                    for v in spec.get("versions") or []
                )
                conditions = (obj.get("status") or {}).get("conditions") or []
                established = any(
                    c.get("type") == "Established" and c.get("status") == "True" for c in conditions
                )
                names = spec.get("names") or {}
                return [
                    name,
                    spec.get("scope", ""),
                    versions,
                    created,
                    spec.get("group", ""),
                    names.get("kind", ""),
                    ",".join(names.get("shortNames") or []),
                    established,
                ]
            case _:
                return [name, created]

    def _event_cells(self, kind: str, obj: Mapping[str, Any]) -> list[Any]:
        if kind == "events.k8s.io/Event":  # the same printer, on the core fields the v1 event converts to
            source = obj.get("deprecatedSource") or {}
            first, last = obj.get("deprecatedFirstTimestamp"), obj.get("deprecatedLastTimestamp")
            count, regarding, message = obj.get("deprecatedCount") or 0, obj.get("regarding"), obj.get("note")
            controller = obj.get("reportingController")
        else:
            source = obj.get("source") or {}
            first, last = obj.get("firstTimestamp"), obj.get("lastTimestamp")
            count, regarding, message = obj.get("count") or 0, obj.get("involvedObject"), obj.get("message")
            controller = obj.get("reportingComponent")
        involved = regarding if isinstance(regarding, Mapping) else {}
        first_seen = self._age(first) if first else self._age(obj.get("eventTime"))
        last_seen = self._age(last) if last else first_seen
        series = obj.get("series")
        if isinstance(series, Mapping):
            last_seen, count = self._age(series.get("lastObservedTime")), series.get("count") or 0
        elif not count:
            count = 1  # singleton events do not set a count in the new API
        target = str(involved.get("kind", "")).lower()
        if involved.get("name"):
            target = f"{target}/{involved['name']}"
        return [
            last_seen,
            obj.get("type", ""),
            obj.get("reason", ""),
            target,
            involved.get("fieldPath", ""),
            _event_source(
                source.get("component") or controller, source.get("host") or obj.get("reportingInstance")
            ),
            str(message or "").strip(),
            first_seen,
            count,
            _meta(obj).get("name"),
        ]

    def _pod_cells(self, obj: Mapping[str, Any]) -> list[Any]:
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        statuses = status.get("containerStatuses") or []
        ready = sum(1 for s in statuses if isinstance(s, Mapping) and s.get("ready"))
        restarts = sum(int(s.get("restartCount") or 0) for s in statuses if isinstance(s, Mapping))
        gates = spec.get("readinessGates") or []
        conditions = {
            c.get("type"): c.get("status") for c in status.get("conditions") or [] if isinstance(c, Mapping)
        }
        passed = sum(
            1 for g in gates if isinstance(g, Mapping) and conditions.get(g.get("conditionType")) == "True"
        )
        return [
            _meta(obj).get("name"),
            f"{ready}/{len(spec.get('containers') or [])}",
            status.get("reason") or status.get("phase") or "",
            str(restarts),
            self._age(_meta(obj).get("creationTimestamp")),
            status.get("podIP") or "<none>",
            spec.get("nodeName") or "<none>",
            status.get("nominatedNodeName") or "<none>",
            f"{passed}/{len(gates)}" if gates else "<none>",
        ]

    def _age(self, timestamp: Any) -> str:
        """``translateTimestampSince``: how long ago, by this emulator's clock; ``<unknown>`` for none."""
        then = _parse_timestamp(timestamp)
        if then is None:
            return "<unknown>"
        return _human_duration((self._now() - then).total_seconds())

    # kmock declares its watch as an async generator; this one may also answer with a plain error.
    async def _serve_watch(self, request: kmock.Request) -> kmock.Payload:  # type: ignore[override]
        try:
            _require_json_acceptable(request)
            resource, _ = self._lookup(request)
            predicates = self._selectors(request)
            since_text = request.params.get("resourceVersion", "")
            if since_text and not since_text.isdigit():
                raise _bad_request(f"invalid resourceVersion: {since_text!r}")
            since = int(since_text) if since_text not in ("", "0") else None
        except ApiError as exc:
            return Response(status=exc.code, payload=exc.status())
        watch = _Watch(resource, request.namespace, request.name, predicates)
        timeout = float(request.params.get("timeoutSeconds", "0") or 0)
        initial = request.params.get("sendInitialEvents") == "true"
        bookmarks = request.params.get("allowWatchBookmarks") == "true"
        raw = request._raw_request

        def connected() -> bool:
            return raw is None or raw.transport is not None

        stream = self._stream_watch(
            watch, since, initial=initial, bookmarks=bookmarks, timeout=timeout, connected=connected
        )
        tabled = "as=Table" in request.headers.get("Accept", "")
        events: AsyncIterator[kmock.Payload] = self._tabled(resource, stream) if tabled else stream
        # kubectl picks its stream decoder by the Content-Type: JSON watches are plain application/json.
        return Response(payload=events, headers={"Content-Type": "application/json"})

    async def _tabled(
        self, resource: kmock.resource, events: AsyncGenerator[kmock.Payload, None]
    ) -> AsyncIterator[kmock.Payload]:
        """A watch for ``kubectl get -w``: each object becomes a one-row Table; only the first carries the
        column definitions (the API server omits them afterwards, and kubectl reuses the last ones)."""
        headers = True
        try:
            async for event in events:
                if isinstance(event, dict) and event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                    table = self._table(resource, [event["object"]])
                    table["metadata"]["resourceVersion"] = _meta(event["object"]).get("resourceVersion")
                    if not headers:
                        table["columnDefinitions"] = None
                    headers = False
                    event = {"type": event["type"], "object": table}
                yield event
        finally:
            await events.aclose()

    async def _stream_watch(
        self,
        watch: _Watch,
        since: int | None,
        *,
        initial: bool,
        bookmarks: bool,
        timeout: float,
        connected: Callable[[], bool],
    ) -> AsyncGenerator[kmock.Payload, None]:
        # Everything up to the first yield runs in one go: the snapshot (or replay) and the
        # subscription cannot miss or duplicate an event committed in between.
        backlog: list[dict[str, Any]]
        if since is None or initial:
            backlog = [
                {"type": "ADDED", "object": obj}
                for obj in self._objects_of(watch.resource, watch.namespace)
                if watch.wants(watch.resource, obj)
            ]
        elif since < self._compacted_rv:
            gone = ApiError(410, "Expired", f"too old resource version: {since} ({self._compacted_rv})")
            backlog = [{"type": "ERROR", "object": gone.status()}]
        else:
            backlog = [
                event
                for rv, resource, event in self._event_log
                if rv > since and watch.wants(resource, event["object"])
            ]
        if initial:
            end = self._bookmark(watch.resource)
            end["object"]["metadata"]["annotations"] = {"k8s.io/initial-events-end": "true"}
            backlog.append(end)
        if not backlog or backlog[-1]["type"] != "ERROR":
            self._watches.add(watch)
        try:
            yield b""  # send the headers now: clients wait for them before they read any event
            for event in backlog:
                yield event
            if watch not in self._watches:
                return
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout if timeout > 0 else None
            next_bookmark = loop.time() + self.bookmark_interval
            while connected():
                now = loop.time()
                if deadline is not None and now >= deadline:
                    return
                if bookmarks and now >= next_bookmark:
                    next_bookmark = now + self.bookmark_interval
                    yield self._bookmark(watch.resource)
                    continue
                # aiohttp does not cancel handlers of gone clients: look at the connection now and then.
                wait = DISCONNECT_POLL_SECONDS
                if deadline is not None:
                    wait = min(wait, deadline - now)
                if bookmarks:
                    wait = min(wait, next_bookmark - now)
                try:
                    async with asyncio.timeout(wait):
                        event = await watch.queue.get()
                except TimeoutError:
                    continue
                yield event
        finally:
            self._watches.discard(watch)

    def _bookmark(self, resource: kmock.resource) -> dict[str, Any]:
        info = self.resources[resource]
        return {
            "type": "BOOKMARK",
            "object": {
                "kind": info.kind,
                "apiVersion": _api_version(resource),
                "metadata": {"resourceVersion": str(self._resource_version)},
            },
        }

    # -- writes over HTTP -------------------------------------------------------------------------------

    async def _serve_create(self, request: kmock.Request) -> kmock.Payload:
        return self._api(request, self._http_create)

    def _http_create(self, request: kmock.Request) -> tuple[int, Any]:
        resource, _ = self._lookup(request)
        body = _json_body(request)
        created = self._create(
            resource,
            request.namespace,
            body,
            dry_run=self._dry_run(request),
            validation=_field_validation(request),
            writer=self._writer(request, resource),
        )
        return 201, created

    def _writer(
        self, request: kmock.Request, resource: kmock.resource, *, apply: bool = False
    ) -> _FieldManager:
        """The field manager of a write: who, how, in which version, on which subresource."""
        manager = _manager_name(request)
        if apply and not manager:
            error = _FieldError("FieldValueRequired", "fieldManager", _OMIT, "is required for apply patch")
            raise ApiError(
                422,
                "Invalid",
                f'PatchOptions.meta.k8s.io "" is invalid: {error}',
                {"group": "meta.k8s.io", "kind": "PatchOptions", "causes": [error.cause()]},
            )
        return _FieldManager(
            manager=manager,
            operation="Apply" if apply else "Update",
            api_version=_api_version(resource),
            subresource=request.subresource,
            force=request.params.get("force") == "true",
        )

    async def _serve_update(self, request: kmock.Request) -> kmock.Payload:
        return self._api(request, self._http_patch)

    def _http_patch(self, request: kmock.Request) -> tuple[int, Any]:
        resource, info = self._lookup(request)
        assert request.name is not None  # UPDATE is the named PATCH
        subresource = self._writable_subresource(info, request.subresource)
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type not in _PATCH_TYPES or (content_type == _PATCH_TYPES[2] and resource.group != ""):
            # Custom resources have no schema with merge keys, so real servers refuse strategic merge.
            accepted = [t for t in _PATCH_TYPES if resource.group == "" or t != _PATCH_TYPES[2]]
            msg = (
                "the body of the request was in an unknown format - accepted media types include: "
                + ", ".join(accepted)
            )
            raise ApiError(415, "UnsupportedMediaType", msg)
        patch = self._patch_body(request, content_type)
        applying = content_type == "application/apply-patch+yaml"
        writer = self._writer(request, resource, apply=applying)
        old = self._current(resource, request.namespace, request.name)
        if old is None:
            if applying and subresource is None:
                # Server-side apply creates what does not exist yet.
                self._check_applied_type(resource, patch)
                self._require_namespace(request.namespace)
                created = self._create(
                    resource,
                    request.namespace,
                    patch,
                    dry_run=self._dry_run(request),
                    validation=_field_validation(request),
                    writer=writer,
                    applied=patch,
                )
                return 201, created
            raise _not_found(resource, request.name)
        target = copy.deepcopy(old)
        if applying:
            self._check_applied_type(resource, patch)
            candidate = self._apply_merge(resource, target, patch, writer)
        elif content_type == "application/json-patch+json":
            try:
                candidate = jsonpatch.JsonPatch(patch).apply(target)
            except jsonpatch.InvalidJsonPatch as exc:
                raise _bad_request(str(exc)) from None
            except jsonpatch.JsonPatchException as exc:
                # A failed "test" op, as in kopf's resourceVersion guard, is 422 on a real server too.
                msg = f"the server rejected our request due to an error in our request: {exc}"
                raise ApiError(422, "Invalid", msg) from None
            except (jsonpatch.JsonPointerException, TypeError, KeyError, IndexError) as exc:
                msg = f"the server rejected our request due to an error in our request: {exc}"
                raise ApiError(422, "Invalid", msg) from None
        elif content_type == "application/strategic-merge-patch+json":
            candidate = _strategic_merge(target, patch)
        else:
            candidate = _merge_patch(target, patch)
        if not isinstance(candidate, dict):
            raise _bad_request("the patched object is not a JSON object")
        result = self._update(
            resource,
            request.namespace,
            request.name,
            candidate,
            old=old,
            subresource=subresource,
            dry_run=self._dry_run(request),
            validation=_field_validation(request),
            patched=True,
            writer=writer,
            applied=patch if applying else None,
        )
        return 200, result

    def _check_applied_type(self, resource: kmock.resource, applied: Mapping[str, Any]) -> None:
        """An apply configuration names its kind and version, and they are the resource's."""
        api_version, kind = str(applied.get("apiVersion") or ""), str(applied.get("kind") or "")
        if api_version != _api_version(resource) or kind != self.resources[resource].kind:
            group, _, version = api_version.rpartition("/")
            raise _bad_request(f"invalid object type: {group}/{version}, Kind={kind}")

    def _patch_body(self, request: kmock.Request, content_type: str) -> Any:
        body: Any
        if content_type == "application/apply-patch+yaml":
            try:
                body = yaml.safe_load(request.text)
            except yaml.YAMLError as exc:
                raise _bad_request(f"error decoding YAML: {exc}") from None
        else:
            body = request.data
            if body is None:
                raise _bad_request("the body of the request is not valid JSON")
        if content_type == "application/json-patch+json":
            if not isinstance(body, list) or not all(isinstance(op, dict) for op in body):
                msg = "json: cannot unmarshal object into Go value of type []handlers.jsonPatchOp"
                raise _bad_request(msg)
        elif not isinstance(body, dict):
            raise _bad_request("the body of the request must be a JSON object")
        return body

    async def _serve_replace(self, request: kmock.Request) -> kmock.Payload:
        return self._api(request, self._http_replace)

    def _http_replace(self, request: kmock.Request) -> tuple[int, Any]:
        resource, info = self._lookup(request)
        if request.name is None:
            raise ApiError(
                405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
            )
        subresource = self._writable_subresource(info, request.subresource)
        body = _json_body(request)
        body_name = _meta(body).get("name")
        if body_name != request.name:
            msg = f"the name of the object ({body_name}) does not match the name on the URL ({request.name})"
            raise _bad_request(msg)
        old = self._current(resource, request.namespace, request.name)
        if old is None:
            raise _not_found(resource, request.name)
        result = self._replace(
            resource,
            request.namespace,
            request.name,
            body,
            old=old,
            subresource=subresource,
            dry_run=self._dry_run(request),
            validation=_field_validation(request),
            writer=self._writer(request, resource),
        )
        return 200, result

    def _writable_subresource(self, info: kmock.ResourceInfo, subresource: str | None) -> str | None:
        if subresource is not None and (subresource != "status" or "status" not in info.subresources):
            raise _no_such_resource()
        return subresource

    def _dry_run(self, request: kmock.Request) -> bool:
        return bool(request.params.get("dryRun"))

    async def _serve_delete(self, request: kmock.Request) -> kmock.Payload:
        return self._api(request, self._http_delete)

    def _http_delete(self, request: kmock.Request) -> tuple[int, Any]:
        resource, _ = self._lookup(request)
        assert request.name is not None  # DELETE is the named DELETE
        if request.subresource is not None:
            raise _no_such_resource()
        options = request.data if isinstance(request.data, dict) else {}
        old = self._current(resource, request.namespace, request.name)
        if old is None:
            raise _not_found(resource, request.name)
        preconditions = options.get("preconditions") or {}
        for field in ("uid", "resourceVersion"):
            expected = preconditions.get(field)
            if expected and expected != _meta(old).get(field):
                raise _conflict(resource, request.name)
        policy = options.get("propagationPolicy") or request.params.get("propagationPolicy") or "Background"
        obj, removed = self._delete(
            resource,
            request.namespace,
            request.name,
            old=old,
            orphan=policy == "Orphan",
            dry_run=self._dry_run(request),
        )
        if removed and resource.group == "" and resource.plural not in ("pods", "namespaces"):
            # Built-in resources answer an immediate deletion with a Status, not the object.
            details = _details(resource, request.name) | {"uid": _meta(obj).get("uid")}
            return 200, {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": details,
            }
        return 200, obj

    async def _serve_subresource_create(self, request: kmock.Request) -> kmock.Payload:
        return self._api(request, self._http_token_request)

    def _http_token_request(self, request: kmock.Request) -> tuple[int, Any]:
        resource = request.resource
        if resource != _SERVICE_ACCOUNTS or request.subresource != "token" or request.name is None:
            raise _no_such_resource()
        namespace, name = request.namespace, request.name
        if namespace is None or self._current(_SERVICE_ACCOUNTS, namespace, name) is None:
            raise _not_found(_SERVICE_ACCOUNTS, name)
        body = _json_body(request) if request.body else {}  # kubectl create token sends protobuf
        spec: dict[str, Any] = body["spec"] if isinstance(body.get("spec"), dict) else {}
        audiences = spec.get("audiences") or [self.issuer]  # the API server's own audience by default
        seconds = spec.get("expirationSeconds")
        seconds = DEFAULT_TOKEN_SECONDS if seconds is None else seconds
        if not isinstance(seconds, int) or seconds < MIN_TOKEN_SECONDS:
            msg = (
                f'TokenRequest.authentication.k8s.io "{name}" is invalid: spec.expirationSeconds: '
                f"Invalid value: {seconds}: may not specify a duration less than 10 minutes"
            )
            details = {"name": name, "group": "authentication.k8s.io", "kind": "TokenRequest"}
            raise ApiError(422, "Invalid", msg, details)
        if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
            raise _bad_request("spec.audiences must be a list of strings")
        token = self.mint_token(namespace, name, audiences=audiences, expiration_seconds=seconds)
        expires = self._now() + datetime.timedelta(seconds=seconds)
        return 201, {
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": None},
            "spec": {
                "audiences": audiences,
                "expirationSeconds": seconds,
                "boundObjectRef": spec.get("boundObjectRef"),
            },
            "status": {"token": token, "expirationTimestamp": format_time(expires)},
        }

    # -- non-resource URLs --------------------------------------------------------------------------------

    async def _serve_openid_configuration(self, request: kmock.Request) -> kmock.Payload:
        url = request.url
        return self.openid_configuration(f"{url.scheme}://{url.raw_authority}" if url.is_absolute() else None)

    async def _serve_server_version(self, request: kmock.Request) -> kmock.Payload:
        """``/version``: the release this emulator follows (kmock's own answer names a k3s v1.26)."""
        return dict(SERVER_VERSION)

    async def _serve_jwks(self, request: kmock.Request) -> kmock.Payload:
        return Response(payload=self.jwks(), headers={"Content-Type": "application/jwk-set+json"})

    async def _serve_openapi_root(self, request: kmock.Request) -> kmock.Payload:
        # kubectl apply/create check here whether the server validates fields itself (fieldValidation);
        # if not, they insist on downloading the protobuf OpenAPI v2 schema to validate client-side.
        paths = {
            gv.lstrip("/"): {"serverRelativeURL": f"/openapi/v3{gv}?hash={self._resource_version}"}
            for gv in sorted({_group_version_path(kmock.resource(key)) for key in self.resources})
        }
        return {"paths": paths}

    async def _serve_openapi_group_version(self, request: kmock.Request) -> kmock.Payload:
        """An OpenAPI v3 document: one PATCH operation per kind that accepts ``fieldValidation`` (so kubectl
        leaves validation to the server), and the schemas of the CRDs served here (for kubectl explain)."""
        gv_path = request.url.path.removeprefix("/openapi/v3")
        paths: dict[str, Any] = {}
        for key in self.resources:
            resource = kmock.resource(key)
            info = self.resources[resource]
            if _group_version_path(resource) != gv_path:
                continue
            scope = "/namespaces/{namespace}" if info.namespaced else ""
            patch_op = {
                "x-kubernetes-group-version-kind": {
                    "group": resource.group,
                    "version": resource.version,
                    "kind": info.kind,
                },
                "parameters": [
                    {"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
                    for name in ("dryRun", "fieldManager", "fieldValidation", "force")
                ],
                # No strategic-merge-patch here: kubectl then builds it from its compiled-in types.
                "requestBody": {
                    "content": {
                        t: {"schema": {"type": "object"}} for t in _PATCH_TYPES if "strategic" not in t
                    }
                },
                "responses": {"200": {"description": "OK"}},
            }
            paths[f"{gv_path}{scope}/{resource.plural}/{{name}}"] = {"patch": patch_op}
        if not paths:
            return Response(status=404, payload=_no_such_resource().status())
        schemas: dict[str, Any] = {}
        for key in self.resources:
            resource = kmock.resource(key)
            crd, version = self._crd_version(resource)
            if crd is not None and version is not None and _group_version_path(resource) == gv_path:
                schemas.update(_crd_openapi_schemas(crd, version))
        if schemas:
            schemas.update(copy.deepcopy(_META_SCHEMAS))
        return {
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
            "paths": paths,
            "components": {"schemas": schemas},
        }

    # -- discovery: kmock's, with the core group version spelled "v1" ---------------------------------------

    async def _serve_version(self, request: kmock.Request) -> kmock.Payload:
        assert request.resource is not None  # the route only matches /api/{v} and /apis/{g}/{v}
        group, version = request.resource.group or "", request.resource.version
        entries: list[dict[str, Any]] = []
        for resource in sorted((kmock.resource(key) for key in self.resources), key=lambda r: str(r.plural)):
            if resource.group != group or resource.version != version or not resource.plural:
                continue
            info = self.resources[resource]
            entry: dict[str, Any] = {
                "name": resource.plural,
                "singularName": info.singular or resource.plural,
                "namespaced": bool(info.namespaced),
                "kind": info.kind or str(resource.plural).capitalize(),
                "verbs": sorted(info.verbs or _VERBS),
            }
            if info.shortnames:
                entry["shortNames"] = sorted(info.shortnames)
            if info.categories:
                entry["categories"] = sorted(info.categories)
            entries.append(entry)
            for sub in sorted(info.subresources):
                sub_entry = {
                    "name": f"{resource.plural}/{sub}",
                    "singularName": "",
                    "namespaced": bool(info.namespaced),
                }
                if sub == "token":
                    sub_entry |= {
                        "group": "authentication.k8s.io",
                        "version": "v1",
                        "kind": "TokenRequest",
                        "verbs": ["create"],
                    }
                else:
                    sub_entry |= {"kind": entry["kind"], "verbs": ["get", "patch", "update"]}
                entries.append(sub_entry)
        if not entries and group:
            return Response(status=404, payload=_no_such_resource().status())
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": entries,
        }

    # -- the commit path: every write ends here ----------------------------------------------------------

    def _now(self) -> datetime.datetime:
        return (self.clock or _utcnow)()

    def _current(self, resource: kmock.resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The stored object (not a copy: never mutate it), stamped with metadata if a test seeded it bare."""
        key = (resource, namespace, name)
        if key not in self.objects:
            return None
        obj = self.objects[key]
        if obj.deleted:
            return None
        current = obj.last.raw
        meta = _meta(current)
        if not meta.get("resourceVersion"):
            # Seeded directly through kube.objects[...]: give it what the API server would have.
            self._resource_version += 1
            meta = dict(meta, name=name, resourceVersion=str(self._resource_version))
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", format_time(self._now()))
            if self._has_generation(resource):
                meta.setdefault("generation", 1)
            if namespace is not None:
                meta["namespace"] = namespace
            current = dict(current, metadata=meta)
            current.setdefault("apiVersion", _api_version(resource))
            if resource in self.resources and self.resources[resource].kind:
                current.setdefault("kind", self.resources[resource].kind)
            obj.history[-1] = current
        return current

    def _create(
        self,
        resource: kmock.resource,
        namespace: str | None,
        body: Mapping[str, Any],
        *,
        dry_run: bool = False,
        validation: str = "Warn",
        writer: _FieldManager | None = None,
        applied: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Create an object. ``writer`` is the client's field manager (None: seeded by the emulator's own
        methods, attributed to no one); ``applied`` the configuration of a server-side apply."""
        info = self.resources[resource]
        new = copy.deepcopy(dict(body))
        schema = self._schema_of(resource)
        if schema is not None:
            self._decode_custom(resource, info, new, schema, validation=validation, patched=False)
        else:
            self._decode_builtin(resource, info, new)
        meta = _meta(new)
        new["metadata"] = meta
        body_namespace = meta.get("namespace")
        if info.namespaced:
            if body_namespace and body_namespace != namespace:
                msg = "the namespace of the provided object does not match the namespace sent on the request"
                raise _bad_request(msg)
            self._require_namespace(namespace)
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        name = meta.get("name")
        if not name and meta.get("generateName"):
            suffix = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))
            name = meta["name"] = f"{meta['generateName']}{suffix}"
        if not name or not isinstance(name, str):
            raise ApiError(
                422,
                "Invalid",
                f"{info.kind} is invalid: metadata.name: Required value: name or generateName is required",
            )
        if namespace is not None and info.namespaced:
            self._refuse_terminating_namespace(resource, namespace, name)
        if resource == _NAMESPACES and (errors := _name_errors(name, label=True)):
            raise _invalid_object(resource, info.kind, name, errors)
        if self._current(resource, namespace if info.namespaced else None, name) is not None:
            msg = f'{_qualified(resource)} "{name}" already exists'
            raise ApiError(409, "AlreadyExists", msg, _details(resource, name))
        if "status" in info.subresources:
            new.pop("status", None)  # status is written through its subresource only
        new["apiVersion"] = _api_version(resource)
        new["kind"] = info.kind
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion", "managedFields"):
            meta.pop(field, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = format_time(self._now())
        if self._has_generation(resource):
            meta["generation"] = 1
        else:
            meta.pop("generation", None)
        if resource == _NAMESPACES:
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = name  # SetDefaults_Namespace
        _coerce_object_meta(meta)
        if schema is not None:
            self._validate_custom(resource, info, new, schema, old=None)
        elif resource == _EVENTS and (errors := _event_errors(new, namespace)):
            raise _invalid_object(resource, info.kind, name, errors)
        if writer is not None:
            self._manage_fields(resource, self._zero_object(resource, info), new, writer, applied=applied)
        self._server_side_defaults(resource, new)
        if dry_run:
            return self._encoded(resource, new)
        return self._commit(resource, namespace if info.namespaced else None, name, new, created=True)

    def _replace(
        self,
        resource: kmock.resource,
        namespace: str | None,
        name: str,
        body: Mapping[str, Any],
        *,
        old: Mapping[str, Any],
        subresource: str | None = None,
        check_version: bool = True,
        dry_run: bool = False,
        validation: str = "Warn",
        writer: _FieldManager | None = None,
    ) -> dict[str, Any]:
        candidate = copy.deepcopy(dict(body))
        if not check_version:
            _meta(candidate).pop("resourceVersion", None)
        return self._update(
            resource,
            namespace,
            name,
            candidate,
            old=old,
            subresource=subresource,
            dry_run=dry_run,
            validation=validation,
            writer=writer,
        )

    def _update(
        self,
        resource: kmock.resource,
        namespace: str | None,
        name: str,
        candidate: dict[str, Any],
        *,
        old: Mapping[str, Any],
        subresource: str | None = None,
        dry_run: bool = False,
        validation: str = "Warn",
        patched: bool = False,
        writer: _FieldManager | None = None,
        applied: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Turn a client's desired object into the stored one, keeping what clients may not change.
        ``writer`` and ``applied`` as for ``_create``."""
        info = self.resources[resource]
        schema = self._schema_of(resource)
        if schema is not None:
            # Decoding prunes (and with fieldValidation=Strict refuses) unknown fields and applies defaults.
            self._decode_custom(resource, info, candidate, schema, validation=validation, patched=patched)
        else:
            self._decode_builtin(resource, info, candidate)
        old_meta = _meta(old)
        requested = _meta(candidate)
        # Optimistic concurrency: a resourceVersion (or uid) in the body is a precondition.
        if requested.get("resourceVersion") and requested["resourceVersion"] != old_meta.get(
            "resourceVersion"
        ):
            raise _conflict(resource, name)
        if requested.get("uid") and requested["uid"] != old_meta.get("uid"):
            raise _conflict(resource, name)
        if subresource == "status":
            new = copy.deepcopy(dict(old))
            if candidate.get("status") is None:
                new.pop("status", None)
            else:
                new["status"] = candidate["status"]
        else:
            new = candidate
            if "status" in info.subresources:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
            meta = dict(requested)
            for field in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds"):
                if field in old_meta:
                    meta[field] = old_meta[field]
                else:
                    meta.pop(field, None)
            meta["name"] = name
            if namespace is not None:
                meta["namespace"] = namespace
            if old_meta.get("deletionTimestamp"):
                added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
                if added:
                    msg = (
                        "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being"
                        f" deleted, found new finalizers {sorted(added)}"
                    )
                    raise _invalid(resource, name, msg)
            new["metadata"] = meta
        new["apiVersion"] = _api_version(resource)
        new["kind"] = info.kind
        meta = new["metadata"]
        meta["resourceVersion"] = old_meta.get("resourceVersion")
        if self._has_generation(resource):
            meta["generation"] = old_meta.get("generation", 1)
            if _spec_part(new) != _spec_part(old):
                meta["generation"] = meta["generation"] + 1
        else:
            meta.pop("generation", None)
        if resource == _NAMESPACES:
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = name  # SetDefaults_Namespace
        _coerce_object_meta(meta)
        if schema is not None:
            self._validate_custom(resource, info, new, schema, old=old)
        elif resource == _EVENTS and (errors := _event_errors(new, namespace)):
            raise _invalid_object(resource, info.kind, name, errors)
        if writer is None or subresource == "status":
            # The emulator's own writes are attributed to no one; a status write keeps the metadata.
            if old_meta.get("managedFields"):
                meta["managedFields"] = copy.deepcopy(old_meta["managedFields"])
            else:
                meta.pop("managedFields", None)
        if writer is not None:
            self._manage_fields(resource, old, new, writer, applied=applied)
        self._server_side_defaults(resource, new)
        if new == old:
            return dict(old)  # a no-op write changes nothing, not even the resourceVersion
        if dry_run:
            return self._encoded(resource, new)
        return self._commit(resource, namespace, name, new, created=False)

    def _delete(
        self,
        resource: kmock.resource,
        namespace: str | None,
        name: str,
        *,
        old: Mapping[str, Any],
        orphan: bool = False,
        dry_run: bool = False,
    ) -> tuple[dict[str, Any], bool]:
        """Delete now, or mark for deletion while finalizers remain. Returns (object, removed now?)."""
        old_meta = _meta(old)
        if resource == _NAMESPACES and not dry_run:
            return self._delete_namespace(name, old)
        if old_meta.get("finalizers"):
            if old_meta.get("deletionTimestamp") or dry_run:
                return dict(old), False
            new = copy.deepcopy(dict(old))
            new["metadata"]["deletionTimestamp"] = format_time(self._now())
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            return self._commit(resource, namespace, name, new, created=False), False
        if dry_run:
            return dict(old), True
        return self._remove(resource, namespace, name, dict(old), orphan=orphan), True

    def _commit(
        self,
        resource: kmock.resource,
        namespace: str | None,
        name: str,
        new: dict[str, Any],
        *,
        created: bool,
    ) -> dict[str, Any]:
        """Store a new version with a fresh resourceVersion and tell the watchers; finish deletions."""
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and resource != _NAMESPACES:
            # The last finalizer is gone from an object being deleted: it disappears now.
            return self._remove(resource, namespace, name, new, orphan=False)
        self._resource_version += 1
        meta["resourceVersion"] = str(self._resource_version)
        new = self._encoded(resource, new)
        key = (resource, namespace, name)
        if key in self.objects:
            self.objects[key].history.append(new)
        else:
            self.objects[key] = new
        self._emit(resource, "ADDED" if created else "MODIFIED", new)
        if resource == _CRD_RESOURCE:
            self._register_crd(new)
        elif resource == _NAMESPACES and created:
            self.add_service_account(name, "default")
        return copy.deepcopy(new)

    def _remove(
        self,
        resource: kmock.resource,
        namespace: str | None,
        name: str,
        last: dict[str, Any],
        *,
        orphan: bool,
    ) -> dict[str, Any]:
        last = copy.deepcopy(last)
        self._resource_version += 1
        last["metadata"]["resourceVersion"] = str(self._resource_version)
        last = self._encoded(resource, last)
        key = (resource, namespace, name)
        self.objects[key].history.append(last)  # the final state stays in the history...
        self.objects[key].delete()  # ...followed by kmock's soft-deletion marker
        self._emit(resource, "DELETED", last)
        if resource == _CRD_RESOURCE:
            self._unregister_crd(name)
        if not orphan:
            self._collect_garbage(_meta(last).get("uid"))
        if namespace is not None and namespace not in self._emptying:
            self._finish_namespace(namespace)
        return last

    def _delete_namespace(self, name: str, old: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """What deleting a namespace does on a cluster: it turns Terminating, the namespace controller deletes
        everything in it, and it goes once nothing is left (objects held by finalizers keep it)."""
        current = dict(old)
        if not _meta(old).get("deletionTimestamp"):
            marked = copy.deepcopy(current)
            marked["metadata"]["deletionTimestamp"] = format_time(self._now())
            marked["metadata"]["deletionGracePeriodSeconds"] = 0
            marked["status"] = {"phase": "Terminating"}
            current = self._commit(_NAMESPACES, None, name, marked, created=False)
        self._emptying.add(name)
        try:
            for (res, ns, obj_name), obj in list(self.objects.items()):
                if ns != name or obj.deleted or res == _NAMESPACES:
                    continue
                content = self._current(res, ns, obj_name)
                if content is not None and not _meta(content).get("deletionTimestamp"):
                    self._delete(res, ns, obj_name, old=content)
        finally:
            self._emptying.discard(name)
        removed = self._finish_namespace(name)
        return (removed, True) if removed is not None else (current, False)

    def _finish_namespace(self, name: str) -> dict[str, Any] | None:
        """Remove a Terminating namespace that holds nothing any more; ``None`` while it has to wait."""
        namespace = self._current(_NAMESPACES, None, name)
        if (
            namespace is None
            or not _meta(namespace).get("deletionTimestamp")
            or _meta(namespace).get("finalizers")
        ):
            return None
        for (res, ns, _), obj in self.objects.items():
            if ns == name and res != _NAMESPACES and not obj.deleted:
                return None
        return self._remove(_NAMESPACES, None, name, dict(namespace), orphan=False)

    def _refuse_terminating_namespace(self, resource: kmock.resource, namespace: str, name: str) -> None:
        held = self._current(_NAMESPACES, None, namespace)
        if held is not None and _meta(held).get("deletionTimestamp"):
            msg = (
                f'{_qualified(resource)} "{name}" is forbidden: unable to create new content in namespace'
                f" {namespace} because it is being terminated"
            )
            raise ApiError(403, "Forbidden", msg, _details(resource, name))

    def _collect_garbage(self, owner_uid: Any) -> None:
        """Background cascading deletion: dependents whose owners are all gone are deleted too."""
        if not owner_uid:
            return
        live_uids = {
            _meta(obj.last.raw).get("uid") for _, obj in self.objects.items() if not obj.deleted
        }  # fmt: skip
        for (resource, namespace, name), obj in list(self.objects.items()):
            if obj.deleted:
                continue
            refs = _meta(obj.last.raw).get("ownerReferences") or []
            owners = {ref.get("uid") for ref in refs if isinstance(ref, Mapping)}
            if owner_uid in owners and not (owners & live_uids):
                current = self._current(resource, namespace, name)
                if current is not None:
                    self._delete(resource, namespace, name, old=current)

    def _emit(self, resource: kmock.resource, kind: str, obj: dict[str, Any]) -> None:
        event = {"type": kind, "object": copy.deepcopy(obj)}
        while self._event_log and len(self._event_log) >= EVENT_LOG_SIZE:
            self._compacted_rv = self._event_log.popleft()[0]
        self._event_log.append((self._resource_version, resource, event))
        for watch in self._watches:
            if watch.wants(resource, obj):
                watch.queue.put_nowait(event)

    def _server_side_defaults(self, resource: kmock.resource, obj: dict[str, Any]) -> None:
        """What controllers or defaulting would fill in on a real cluster, done at write time."""
        if resource == _NAMESPACES:
            spec = obj.setdefault("spec", {})
            if isinstance(spec, dict):
                spec.setdefault("finalizers", ["kubernetes"])  # what the namespace controller waits on
            obj["status"] = {"phase": "Terminating" if _meta(obj).get("deletionTimestamp") else "Active"}
        elif resource == _PODS:
            obj.setdefault("status", {}).setdefault("phase", "Pending")  # the pod strategy's PrepareForCreate
        elif resource == _CRD_RESOURCE:
            _crd_registration(obj)  # refuse a CRD that cannot be served before anything is stored
            spec = obj.get("spec") or {}
            now = format_time(self._now())
            conditions = [
                {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": now}
                for t, r, m in (
                    ("NamesAccepted", "NoConflicts", "no conflicts found"),
                    ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                )
            ]
            old_status = obj.get("status") or {}
            if old_status.get("conditions"):
                conditions = old_status["conditions"]
            obj["status"] = {
                "acceptedNames": copy.deepcopy(spec.get("names") or {}),
                "conditions": conditions,
                "storedVersions": [v["name"] for v in spec.get("versions", []) if v.get("storage")],
            }

    # -- how stored objects are typed and encoded, and who owns their fields --------------------------------

    def _is_custom(self, resource: kmock.resource) -> bool:
        return resource in self._crd_resources.values()

    def _has_generation(self, resource: kmock.resource) -> bool:
        """Kinds with spec/status semantics count ``metadata.generation``: custom resources, CRDs and (since
        v1.34) pods; ConfigMaps, Secrets, ServiceAccounts, Namespaces and Events do not."""
        return self._is_custom(resource) or resource in (_CRD_RESOURCE, _PODS)

    def _go_type_of(self, resource: kmock.resource) -> str | None:
        if resource not in self.resources:
            return None
        return _go_type(resource, self.resources[resource].kind)

    def _decode_builtin(
        self, resource: kmock.resource, info: kmock.ResourceInfo, obj: dict[str, Any]
    ) -> None:
        """What decoding a built-in kind does to a body, in place: Go's zero values, timestamps in their
        canonical form, and the defaulting of its version (SetDefaults_Secret, stringData into data)."""
        type_name = _go_type(resource, info.kind)
        if type_name is not None:
            try:
                _go_decode(type_name, obj)
            except _TimeError as exc:
                kind, version = info.kind, str(resource.version)
                raise _bad_request(
                    f"{kind} in version {_go_quote(version)} cannot be handled as a {kind}: {exc}"
                ) from None
        if resource == _SECRETS:
            string_data = obj.pop("stringData", None)
            if isinstance(string_data, Mapping) and string_data:
                data = dict(obj["data"]) if isinstance(obj.get("data"), Mapping) else {}
                for key, text in string_data.items():
                    data[key] = base64.b64encode(str(text).encode()).decode()
                obj["data"] = data
            if not obj.get("type"):
                obj["type"] = "Opaque"

    def _encoded(self, resource: kmock.resource, obj: dict[str, Any]) -> dict[str, Any]:
        """The object as kube-apiserver encodes it: a custom resource's keys sorted (it is a map), a built-in
        kind's in its Go struct's field order."""
        if self._is_custom(resource):
            ordered: dict[str, Any] = _sorted_keys(obj)
            return ordered
        type_name = self._go_type_of(resource)
        if type_name is not None:
            typed: dict[str, Any] = _go_ordered(type_name, obj)
            return typed
        if isinstance(obj.get("metadata"), dict):
            return dict(obj, metadata=_go_ordered("ObjectMeta", obj["metadata"]))
        return obj

    def _zero_object(self, resource: kmock.resource, info: kmock.ResourceInfo) -> dict[str, Any]:
        """What a create is compared with for its managed fields: the kind's empty object (a new
        Unstructured for a custom resource, the Go zero value for a built-in kind)."""
        if self._is_custom(resource):
            return {"apiVersion": _api_version(resource), "kind": info.kind}
        zero: dict[str, Any] = {"metadata": {"creationTimestamp": None}}
        zero.update(copy.deepcopy(_GO_ZERO_FIELDS.get(self._go_type_of(resource) or "", {})))
        return zero

    def _shape(self, resource: kmock.resource) -> _Shape:
        """The structured-merge-diff type of a resource: its CRD's schema, or the built-in kind's."""
        schema = self._schema_of(resource)
        if schema is not None:
            cached = self._shapes.get(id(schema))
            if cached is None or cached[0] is not schema:  # a CRD replaced makes a new schema object
                cached = self._shapes[id(schema)] = (schema, _custom_resource_shape(schema))
            return cached[1]
        known = _BUILTIN_SHAPES.get(self._go_type_of(resource) or "")
        if known is not None:
            return known
        return _Shape(
            "map",
            fields={"apiVersion": _SCALAR, "kind": _SCALAR, "metadata": _OBJECT_META_SHAPE},
            element=_UNTYPED,
        )

    def _applied_config(self, resource: kmock.resource, applied: Mapping[str, Any]) -> dict[str, Any]:
        """A server-side apply's configuration as the field manager reads it: decoded (unknown fields of a
        custom resource pruned), not defaulted."""
        config = copy.deepcopy(dict(applied))
        schema = self._schema_of(resource)
        if schema is not None:
            _prune(config, schema, "", [], root=True)
        return config

    def _reset_fields(
        self, resource: kmock.resource, writer: _FieldManager, paths: set[_FieldPath]
    ) -> set[_FieldPath]:
        """Fields a write cannot own: status through the main resource, all but status through /status."""
        info = self.resources[resource]
        if "status" not in info.subresources:
            return paths
        if writer.subresource == "status":
            return {path for path in paths if path[:1] == ("f:status",)}
        return {path for path in paths if path[:1] != ("f:status",)}

    def _apply_merge(
        self,
        resource: kmock.resource,
        live: dict[str, Any],
        applied: Mapping[str, Any],
        writer: _FieldManager,
    ) -> dict[str, Any]:
        """A server-side apply's new object: the configuration merged into the live object by the schema
        (maps and associative lists merge, atomic values are replaced), then what this manager applied
        before and no longer applies, and nobody else owns, removed."""
        shape = self._shape(resource)
        config = self._applied_config(resource, applied)
        merged = _smd_merge(live, config, shape)
        managed = _Managed.read(_meta(live).get("managedFields"))
        previous = managed.entries.get(writer.key)
        if previous is not None:
            now_applied: set[_FieldPath] = set()
            _field_set(config, shape, (), now_applied)
            others: set[_FieldPath] = set()
            for key, (_, owned) in managed.entries.items():
                if key != writer.key:
                    others |= owned
            for path in sorted(previous[1] - now_applied - others, key=len, reverse=True):
                _remove_path(merged, path)
        result: dict[str, Any] = merged
        return result

    def _manage_fields(
        self,
        resource: kmock.resource,
        live: Mapping[str, Any],
        new: dict[str, Any],
        writer: _FieldManager,
        *,
        applied: Mapping[str, Any] | None,
    ) -> None:
        """Record in ``new``'s ``managedFields`` who owns what after this write, as kube-apiserver's field
        manager does; a server-side apply that would take another manager's fields without ``force`` is
        refused with the 409 Conflict the API server sends."""
        shape = self._shape(resource)
        live_meta, new_meta = _meta(live), _meta(new)
        requested = new_meta.get("managedFields")
        # A client that changed managedFields itself (or reset them with []) is taken at its word.
        source = requested if requested is not None and requested != live_meta.get("managedFields") else None
        managed = _Managed.read(source if source is not None else live_meta.get("managedFields"))
        added: set[_FieldPath] = set()
        modified: set[_FieldPath] = set()
        removed: set[_FieldPath] = set()
        _compare_fields(live, new, shape, (), added, modified, removed)
        changed = added | modified
        now = format_time(self._now())
        entry = {
            "manager": writer.manager,
            "operation": writer.operation,
            "apiVersion": writer.api_version,
            "time": now,
            "subresource": writer.subresource,
        }
        if writer.operation == "Apply" and applied is not None:
            config: set[_FieldPath] = set()
            _field_set(self._applied_config(resource, applied), shape, (), config)
            config = self._reset_fields(resource, writer, config) - _STRIPPED_PATHS
            conflicts = managed.conflicts(writer, changed)
            if conflicts and not writer.force:
                raise _conflict_error(conflicts)
            previous = managed.entries.pop(writer.key, None)
            managed.take(changed, removed=removed)
            if previous is not None and previous[1] == config and not changed and not removed:
                entry = previous[0]  # nothing changed: the entry keeps its time
            if config:
                managed.entries[writer.key] = (entry, config)
        else:
            own = self._reset_fields(resource, writer, changed) - _STRIPPED_PATHS
            managed.take(changed, removed=removed)
            if own:
                previous = managed.entries.get(writer.key)
                managed.entries[writer.key] = (entry, (previous[1] if previous else set()) | own)
        entries = managed.write()
        if entries:
            new_meta["managedFields"] = entries
        else:
            new_meta.pop("managedFields", None)

    # -- custom resources ----------------------------------------------------------------------------------

    def _crd_version(self, resource: kmock.resource) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The CRD that serves a resource and its served version (``None``s for built-in resources)."""
        for crd_name, res in self._crd_resources.items():
            crd = self._current(_CRD_RESOURCE, None, crd_name)
            if res == resource and crd is not None:
                for version in crd.get("spec", {}).get("versions", []):
                    if version.get("name") == resource.version:
                        return crd, version
                return crd, None
        return None, None

    def _schema_of(self, resource: kmock.resource) -> dict[str, Any] | None:
        """The openAPIV3Schema of a custom resource's version (``None`` for built-ins: not validated)."""
        _, version = self._crd_version(resource)
        if version is None:
            return None
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        return schema if isinstance(schema, dict) else _PRESERVE_EVERYTHING

    def _decode_custom(
        self,
        resource: kmock.resource,
        info: kmock.ResourceInfo,
        obj: dict[str, Any],
        schema: Mapping[str, Any],
        *,
        validation: str,
        patched: bool,
    ) -> None:
        """What decoding a custom resource does to it, in place: unknown fields are pruned (reported as
        warnings, or refused with ``fieldValidation=Strict``), then defaults are applied."""
        sent = json.dumps(obj, separators=(",", ":")) if patched and validation == "Strict" else ""
        unknown: list[str] = []
        _prune(obj, schema, "", unknown, root=True)
        if unknown:
            problems = [f"unknown field {json.dumps(path)}" for path in unknown]
            text = "strict decoding error: " + ", ".join(problems)
            if validation == "Strict" and patched:
                # The patch handler reports a strict decoding error of the patched object as Invalid.
                error = _FieldError("FieldValueInvalid", "patch", sent, text)
                raise ApiError(422, "Invalid", f' "" is invalid: {error}', {"causes": [error.cause()]})
            if validation == "Strict":
                kind, version = info.kind, str(resource.version)
                raise _bad_request(
                    f"{kind} in version {_go_quote(version)} cannot be handled as a {kind}: {text}"
                )
            if validation != "Ignore":
                self._warnings.extend(problems)
        _default(obj, schema)

    def _validate_custom(
        self,
        resource: kmock.resource,
        info: kmock.ResourceInfo,
        new: dict[str, Any],
        schema: Mapping[str, Any],
        *,
        old: Mapping[str, Any] | None,
    ) -> None:
        """The CR strategy's validation: name, OpenAPI schema (ratcheting unchanged values on update), list
        sets and maps, then CEL rules unless a blocking schema error stops them. Raises 422 Invalid."""
        name = str(_meta(new).get("name"))
        previous: Any = _ABSENT if old is None else old
        errors = _name_errors(name)
        errors += _schema_errors(schema, new, "", previous)
        if old is None or not _list_type_errors(schema, old, ""):
            errors += _list_type_errors(schema, new, "")
        if any(error.type in _BLOCKING for error in errors):
            errors.append(_FieldError("FieldValueInvalid", "", None, _NOT_CHECKED))
        else:
            errors += _cel_errors(schema, new, previous, "", self._warnings, root=True)
        if errors:
            raise _invalid_object(resource, info.kind, name, errors)

    def _register_crd(self, crd: Mapping[str, Any]) -> None:
        resource, info = _crd_registration(crd)
        crd_name = _meta(crd)["name"]
        previous = self._crd_resources.get(crd_name)
        if previous is not None and previous != resource:
            del self.resources[previous]
        self._crd_resources[crd_name] = resource
        self.resources[resource] = info

    def _unregister_crd(self, crd_name: str) -> None:
        resource = self._crd_resources.pop(crd_name, None)
        if resource is None:
            return
        for (res, namespace, name), obj in list(self.objects.items()):
            if res == resource and not obj.deleted:
                self._remove(res, namespace, name, obj.last.raw, orphan=False)
        del self.resources[resource]


def _crd_registration(crd: Mapping[str, Any]) -> tuple[kmock.resource, kmock.ResourceInfo]:
    """The resource a CRD serves. Only its storage version is served: nothing converts between versions."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    versions = [v for v in spec.get("versions") or [] if v.get("served", True)]
    storage = next((v for v in versions if v.get("storage")), versions[0] if versions else None)
    if not spec.get("group") or not names.get("plural") or not names.get("kind") or storage is None:
        name = str(_meta(crd).get("name"))
        msg = "spec.group, spec.names.plural, spec.names.kind and a served version are required"
        raise _invalid(_CRD_RESOURCE, name, msg)
    resource = kmock.resource(spec["group"], storage["name"], names["plural"])
    info = kmock.ResourceInfo(
        kind=names["kind"],
        singular=names.get("singular") or names["kind"].lower(),
        namespaced=spec.get("scope", "Namespaced") == "Namespaced",
        shortnames=set(names.get("shortNames") or []),
        categories=set(names.get("categories") or []),
        verbs=set(_VERBS),
        subresources={"status"} if "status" in (storage.get("subresources") or {}) else set(),
    )
    return resource, info


def _group_version_path(resource: kmock.resource) -> str:
    return f"/apis/{resource.group}/{resource.version}" if resource.group else f"/api/{resource.version}"


# -- how kube-apiserver encodes built-in kinds: field order, zero values, timestamps -----------------------

# Go struct field order of the built-in types the emulator serves (JSON keys come out in this order; maps
# such as labels or data come out sorted). Fields a type does not declare follow, in the order sent.
_GO_FIELD_ORDER: dict[str, tuple[str, ...]] = {
    "ObjectMeta": (
        "name",
        "generateName",
        "namespace",
        "selfLink",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
    ),
    "ManagedFieldsEntry": (
        "manager",
        "operation",
        "apiVersion",
        "time",
        "fieldsType",
        "fieldsV1",
        "subresource",
    ),
    "OwnerReference": ("apiVersion", "kind", "name", "uid", "controller", "blockOwnerDeletion"),
    "ObjectReference": ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion", "fieldPath"),
    "ConfigMap": ("kind", "apiVersion", "metadata", "immutable", "data", "binaryData"),
    "Secret": ("kind", "apiVersion", "metadata", "immutable", "data", "stringData", "type"),
    "ServiceAccount": (
        "kind",
        "apiVersion",
        "metadata",
        "secrets",
        "imagePullSecrets",
        "automountServiceAccountToken",
    ),
    "Namespace": ("kind", "apiVersion", "metadata", "spec", "status"),
    "Pod": ("kind", "apiVersion", "metadata", "spec", "status"),
    "CustomResourceDefinition": ("kind", "apiVersion", "metadata", "spec", "status"),
    "Event": (
        "kind",
        "apiVersion",
        "metadata",
        "involvedObject",
        "reason",
        "message",
        "source",
        "firstTimestamp",
        "lastTimestamp",
        "count",
        "type",
        "eventTime",
        "series",
        "action",
        "related",
        "reportingComponent",
        "reportingInstance",
    ),
    "events.k8s.io/Event": (
        "kind",
        "apiVersion",
        "metadata",
        "eventTime",
        "series",
        "reportingController",
        "reportingInstance",
        "action",
        "reason",
        "regarding",
        "related",
        "note",
        "type",
        "deprecatedSource",
        "deprecatedFirstTimestamp",
        "deprecatedLastTimestamp",
        "deprecatedCount",
    ),
    "EventSource": ("component", "host"),
    "EventSeries": ("count", "lastObservedTime"),
}
# The fields of ObjectMeta: what metadata may hold beside them is pruned, as the API server prunes it.
_OBJECT_META_FIELDS = frozenset(_GO_FIELD_ORDER["ObjectMeta"])
# Nested fields of those types that are themselves typed (the rest are maps, sorted, or scalars).
_GO_NESTED: dict[str, dict[str, str]] = {
    "ObjectMeta": {"ownerReferences": "[]OwnerReference", "managedFields": "[]ManagedFieldsEntry"},
    "Event": {
        "involvedObject": "ObjectReference",
        "related": "ObjectReference",
        "source": "EventSource",
        "series": "EventSeries",
    },
    "events.k8s.io/Event": {
        "regarding": "ObjectReference",
        "related": "ObjectReference",
        "deprecatedSource": "EventSource",
        "series": "EventSeries",
    },
    "ServiceAccount": {"secrets": "[]ObjectReference"},
}
# What a typed object always carries, as a Go zero value: fields without omitempty (and structs, which
# omitempty never drops). ``None`` is a zero metav1.Time / MicroTime, encoded as null.
_GO_ZERO_FIELDS: dict[str, dict[str, Any]] = {
    "Event": {
        "involvedObject": {},
        "source": {},
        "firstTimestamp": None,
        "lastTimestamp": None,
        "eventTime": None,
        "reportingComponent": "",
        "reportingInstance": "",
    },
    "events.k8s.io/Event": {
        "eventTime": None,
        "regarding": {},
        "deprecatedSource": {},
        "deprecatedFirstTimestamp": None,
        "deprecatedLastTimestamp": None,
    },
    "Namespace": {"spec": {}, "status": {}},
    "Pod": {"spec": {"containers": None}, "status": {}},
    "CustomResourceDefinition": {"spec": {}, "status": {}},
}
# metav1.Time fields (RFC 3339 to the second, in UTC) and metav1.MicroTime fields (to the microsecond).
_GO_TIMES: dict[str, dict[str, str]] = {
    "Event": {"firstTimestamp": "time", "lastTimestamp": "time", "eventTime": "micro"},
    "events.k8s.io/Event": {
        "eventTime": "micro",
        "deprecatedFirstTimestamp": "time",
        "deprecatedLastTimestamp": "time",
    },
    "EventSeries": {"lastObservedTime": "micro"},
}
_GO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def _go_type(resource: kmock.resource, kind: str | None) -> str | None:
    """The name the tables above know a built-in resource's type by (None: not described here)."""
    if resource.group == "events.k8s.io":
        return "events.k8s.io/Event"
    return kind if kind in _GO_FIELD_ORDER else None


_RFC3339 = "2006-01-02T15:04:05Z07:00"
_RFC3339_MICRO = "2006-01-02T15:04:05.000000Z07:00"
_GO_TIME_ELEMENTS = (
    ("2006", r"\d{4}"),
    ("-", "-"),
    ("01", r"\d{2}"),
    ("-", "-"),
    ("02", r"\d{2}"),
    ("T", "T"),
    ("15", r"\d{2}"),
    (":", ":"),
    ("04", r"\d{2}"),
    (":", ":"),
    ("05", r"\d{2}"),
)


class _TimeError(ValueError):
    """A timestamp Go's ``time.Parse`` refuses; the message is Go's."""


def _go_parse_time(value: str, *, micro: bool) -> datetime.datetime:
    """Go's ``time.Parse`` with RFC 3339 (a Time) or RFC 3339 with six fractional digits (a MicroTime)."""
    layout = _RFC3339_MICRO if micro else _RFC3339
    fraction = (".000000", r"\.\d{6}") if micro else ("", r"(\.\d+)?")  # Go takes a fraction unasked
    rest = value
    for element, pattern in (*_GO_TIME_ELEMENTS, fraction, ("Z07:00", r"Z|[+-]\d{2}:\d{2}")):
        match = re.match(pattern, rest)
        if match is None:
            raise _TimeError(
                f"parsing time {_go_quote(value)} as {_go_quote(layout)}: cannot parse {_go_quote(rest)} as"
                f" {_go_quote(element)}"
            )
        rest = rest[match.end() :]
    if rest:
        raise _TimeError(f"parsing time {_go_quote(value)}: extra text: {_go_quote(rest)}")
    year, month, day = int(value[0:4]), int(value[5:7]), int(value[8:10])
    hour, minute, second = int(value[11:13]), int(value[14:16]), int(value[17:19])
    for what, number, top in (
        ("month", month, 12),
        ("hour", hour, 23),
        ("minute", minute, 59),
        ("second", second, 59),
    ):
        if number > top or (what == "month" and number < 1):
            raise _TimeError(f"parsing time {_go_quote(value)}: {what} out of range")
    try:
        datetime.date(year, month, day)
    except ValueError:
        raise _TimeError(f"parsing time {_go_quote(value)}: day out of range") from None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _go_time(kind: str, value: Any) -> Any:
    """Decode and re-encode a metav1.Time ("time") or MicroTime ("micro") the way kube-apiserver does:
    parsed as RFC 3339 (a MicroTime with exactly six fractional digits), written back in UTC, a Time to
    the second. ``_TimeError`` for what Go would not parse."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _TimeError(f"json: cannot unmarshal {_json_type(value)} into Go value of type string")
    moment = _go_parse_time(value, micro=kind == "micro").astimezone(datetime.UTC)
    if kind == "micro":
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _go_decode(type_name: str, obj: dict[str, Any], field: str = "") -> None:
    """What decoding into a Go struct and encoding it again does to a body, in place: zero values appear,
    timestamps are normalized (nested typed fields too)."""
    for key, zero in _GO_ZERO_FIELDS.get(type_name, {}).items():
        if key not in obj:
            obj[key] = copy.deepcopy(zero)
    for key, kind in _GO_TIMES.get(type_name, {}).items():
        if key in obj:
            obj[key] = _go_time(kind, obj[key])
    for key, nested in _GO_NESTED.get(type_name, {}).items():
        value = obj.get(key)
        if nested.startswith("[]") and isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    _go_decode(nested[2:], item, _child(field, key))
        elif isinstance(value, dict):
            _go_decode(nested, value, _child(field, key))


# Fields of those types that are Go maps: encoded with their keys sorted.
_GO_MAPS: dict[str, frozenset[str]] = {
    "ObjectMeta": frozenset({"labels", "annotations"}),
    "ConfigMap": frozenset({"data", "binaryData"}),
    "Secret": frozenset({"data", "stringData"}),
}


def _go_ordered(type_name: str, value: Any) -> Any:
    """``value`` with its keys in the order Go's encoder writes them: the type's fields in declaration order
    (undeclared ones after, as sent), its map fields' keys sorted. Nested values of types not described
    here keep the order they were sent in."""
    if isinstance(value, list):
        return [_go_ordered(type_name, item) for item in value]
    if not isinstance(value, dict):
        return value
    order = _GO_FIELD_ORDER.get(type_name, ())
    nested = {"metadata": "ObjectMeta", **_GO_NESTED.get(type_name, {})}
    maps = _GO_MAPS.get(type_name, frozenset())
    keys = [key for key in order if key in value] + [key for key in value if key not in order]
    result: dict[str, Any] = {}
    for key in keys:
        inner, item = nested.get(key), value[key]
        if inner is not None:
            result[key] = _go_ordered(inner.removeprefix("[]"), item)
        elif key in maps and isinstance(item, dict):
            result[key] = {k: item[k] for k in sorted(item)}
        else:
            result[key] = item
    return result


def _sorted_keys(value: Any) -> Any:
    """A custom resource as kube-apiserver returns it: decoded into maps, so every key comes out sorted."""
    if isinstance(value, dict):
        return {key: _sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(item) for item in value]
    return value


def _coerce_object_meta(meta: dict[str, Any]) -> None:
    """ObjectMeta's omitempty, in place: empty labels, annotations, finalizers, ownerReferences (and the
    like) are dropped, as the round trip through ObjectMeta drops them (custom resources included)."""
    for key in [k for k, v in meta.items() if k in _OBJECT_META_FIELDS and v in (None, "", {}, [])]:
        if key not in ("creationTimestamp", "deletionGracePeriodSeconds"):
            del meta[key]


# -- managed fields, as structured-merge-diff tracks them ----------------------------------------------------
#
# Every write by a client is attributed to a field manager (``?fieldManager=``, else the first part of the
# User-Agent) with an operation (Update for create, update and the non-apply patches; Apply for server-side
# apply), the request's API version and its subresource. A field path is a tuple of structured-merge-diff's
# path elements in their FieldsV1 spelling: ``f:name`` (a field or a map key), ``k:{"type":"Ready"}`` (an
# item of a list-map), ``v:"x"`` (an item of a set). What the emulator does not do: the cap of ten Update
# managers (``ancient-changes``), ``before-first-apply``, kubectl's last-applied annotation upgrade, and
# version conversion of managed fields (only the storage version is served anyway).


@dataclasses.dataclass
class _Shape:
    """A node of the type structured-merge-diff sees: ``map`` (a struct's declared ``fields``, and/or any
    key typed ``element``), ``list`` (``list_type`` atomic, set or map with ``keys``), ``scalar``, or
    ``untyped`` (deduced from the value: maps granular, lists atomic)."""

    kind: str
    fields: dict[str, _Shape] = dataclasses.field(default_factory=dict)
    element: _Shape | None = None
    atomic: bool = False
    list_type: str = "atomic"
    keys: tuple[str, ...] = ()

    def child(self, key: str) -> _Shape:
        return self.fields.get(key) or self.element or _UNTYPED


_SCALAR = _Shape("scalar")
_UNTYPED = _Shape("untyped")
_ATOMIC = _Shape("map", element=_UNTYPED, atomic=True)


def _struct(**fields: _Shape) -> _Shape:
    return _Shape("map", fields=dict(fields))


def _map_of(element: _Shape) -> _Shape:
    return _Shape("map", element=element)


_OBJECT_META_SHAPE = _struct(
    labels=_map_of(_SCALAR),
    annotations=_map_of(_SCALAR),
    finalizers=_Shape("list", element=_SCALAR, list_type="set"),
    ownerReferences=_Shape("list", element=_ATOMIC, list_type="map", keys=("uid",)),
    managedFields=_Shape("list", element=_ATOMIC),
)
_OBJECT_META_SHAPE.element = _SCALAR  # name, uid and the other scalars
_BUILTIN_SHAPES: dict[str, _Shape] = {
    "ConfigMap": _struct(data=_map_of(_SCALAR), binaryData=_map_of(_SCALAR), immutable=_SCALAR),
    "Secret": _struct(data=_map_of(_SCALAR), stringData=_map_of(_SCALAR), type=_SCALAR, immutable=_SCALAR),
    "ServiceAccount": _struct(
        secrets=_Shape("list", element=_ATOMIC, list_type="map", keys=("name",)),
        imagePullSecrets=_Shape("list", element=_ATOMIC),
        automountServiceAccountToken=_SCALAR,
    ),
    "Namespace": _struct(
        spec=_struct(finalizers=_Shape("list", element=_SCALAR)),
        status=_struct(
            phase=_SCALAR,
            conditions=_Shape("list", element=_map_of(_SCALAR), list_type="map", keys=("type",)),
        ),
    ),
    "Event": _struct(
        involvedObject=_ATOMIC,
        related=_ATOMIC,
        source=_map_of(_SCALAR),
        series=_map_of(_SCALAR),
    ),
    "events.k8s.io/Event": _struct(
        regarding=_ATOMIC,
        related=_ATOMIC,
        deprecatedSource=_map_of(_SCALAR),
        series=_map_of(_SCALAR),
    ),
}
for _shape in _BUILTIN_SHAPES.values():
    _shape.fields.update(apiVersion=_SCALAR, kind=_SCALAR, metadata=_OBJECT_META_SHAPE)
    _shape.element = _shape.element or _SCALAR
# What the field manager leaves out of every manager's set (its stripMeta step): exact paths only.
_STRIPPED_PATHS = frozenset(
    {("f:apiVersion",), ("f:kind",), ("f:metadata",)}
    | {
        ("f:metadata", f"f:{name}")
        for name in (
            "name",
            "namespace",
            "creationTimestamp",
            "selfLink",
            "uid",
            "clusterName",
            "generation",
            "managedFields",
            "resourceVersion",
        )
    }
)

_FieldPath = tuple[str, ...]


def _schema_shape(schema: Mapping[str, Any]) -> _Shape:
    """The structured-merge-diff type of a CRD's structural schema (lists are atomic unless declared)."""
    if schema.get("x-kubernetes-int-or-string"):
        return _SCALAR
    kind = schema.get("type")
    preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
    if kind == "array":
        items = schema.get("items")
        item_shape = _schema_shape(items) if isinstance(items, Mapping) else _UNTYPED
        list_type = str(schema.get("x-kubernetes-list-type") or "atomic")
        keys = tuple(sorted(str(k) for k in schema.get("x-kubernetes-list-map-keys") or ()))
        return _Shape("list", element=item_shape, list_type=list_type, keys=keys)
    if kind == "object" or "properties" in schema or "additionalProperties" in schema:
        fields = {str(k): _schema_shape(v) for k, v in (schema.get("properties") or {}).items()}
        if schema.get("x-kubernetes-embedded-resource"):
            fields.update(apiVersion=_SCALAR, kind=_SCALAR, metadata=_OBJECT_META_SHAPE)
        additional = schema.get("additionalProperties")
        element: _Shape | None = None
        if isinstance(additional, Mapping):
            element = _schema_shape(additional)
        elif additional is True or preserve:
            element = _UNTYPED
        return _Shape(
            "map", fields=fields, element=element, atomic=schema.get("x-kubernetes-map-type") == "atomic"
        )
    return _UNTYPED if preserve or not kind else _SCALAR


def _custom_resource_shape(schema: Mapping[str, Any]) -> _Shape:
    shape = _schema_shape(schema)
    if shape.kind != "map":
        shape = _Shape("map", element=_UNTYPED)
    shape.fields = dict(shape.fields, apiVersion=_SCALAR, kind=_SCALAR, metadata=_OBJECT_META_SHAPE)
    return shape


def _resolve_shape(shape: _Shape, *values: Any) -> _Shape:
    """An untyped node takes the shape of its value: an object is a granular map, anything else atomic."""
    if shape.kind != "untyped":
        return shape
    if any(isinstance(v, Mapping) for v in values):
        return _Shape("map", element=_UNTYPED)
    return _SCALAR


def _list_items(shape: _Shape, value: Any) -> dict[str, Any]:
    """The items of an associative list by their path element (the first of duplicates wins)."""
    items: dict[str, Any] = {}
    for item in value if isinstance(value, list) else []:
        if shape.list_type == "map":
            fields = item if isinstance(item, Mapping) else {}
            element = "k:" + _go_json({key: fields.get(key) for key in shape.keys})
        else:
            element = "v:" + _go_json(item)
        items.setdefault(element, item)
    return items


def _is_empty(value: Any) -> bool:
    return value is _ABSENT or value is None or value == {} or value == []


def _compare_fields(
    lhs: Any,
    rhs: Any,
    shape: _Shape,
    path: _FieldPath,
    added: set[_FieldPath],
    modified: set[_FieldPath],
    removed: set[_FieldPath],
) -> None:
    """structured-merge-diff's ``Compare`` (``_ABSENT`` for a missing side): leaves (scalars, atomic values,
    containers empty on both sides) are added, modified or removed; so are containers that appear or go."""
    shape = _resolve_shape(shape, lhs, rhs)
    container = shape.kind == "map" and all(isinstance(v, Mapping) or _is_empty(v) for v in (lhs, rhs))
    container |= (
        shape.kind == "list"
        and shape.list_type in ("set", "map")
        and all(isinstance(v, list) or _is_empty(v) for v in (lhs, rhs))
    )
    if not container or shape.atomic or (_is_empty(lhs) and _is_empty(rhs)):
        if lhs is _ABSENT:
            added.add(path)
        elif rhs is _ABSENT:
            removed.add(path)
        elif not _json_equal(lhs, rhs):
            modified.add(path)
        return
    if shape.kind == "map":
        left = lhs if isinstance(lhs, Mapping) else {}
        right = rhs if isinstance(rhs, Mapping) else {}
        for key in dict.fromkeys([*left, *right]):
            sub = shape.child(key)
            _compare_fields(
                left.get(key, _ABSENT),
                right.get(key, _ABSENT),
                sub,
                (*path, f"f:{key}"),
                added,
                modified,
                removed,
            )
    else:
        left_items, right_items = _list_items(shape, lhs), _list_items(shape, rhs)
        element = shape.element or _UNTYPED
        for key in dict.fromkeys([*left_items, *right_items]):
            _compare_fields(
                left_items.get(key, _ABSENT),
                right_items.get(key, _ABSENT),
                element,
                (*path, key),
                added,
                modified,
                removed,
            )
    if lhs is _ABSENT:
        added.add(path)
    elif rhs is _ABSENT:
        removed.add(path)


def _field_set(value: Any, shape: _Shape, path: _FieldPath, out: set[_FieldPath]) -> None:
    """structured-merge-diff's ``ToFieldSet``: every leaf, every list-map or set item, every map key that is
    not a declared field, and every null or empty object."""
    shape = _resolve_shape(shape, value)
    if (
        shape.atomic
        or shape.kind in ("scalar", "untyped")
        or (shape.kind == "list" and shape.list_type == "atomic")
    ):
        out.add(path)
        return
    if shape.kind == "map":
        if not isinstance(value, Mapping):
            out.add(path)
            return
        for key, item in value.items():
            child = (*path, f"f:{key}")
            if key not in shape.fields or item is None or item == {}:
                out.add(child)
            _field_set(item, shape.child(key), child, out)
        return
    for key, item in _list_items(shape, value).items():
        out.add((*path, key))
        _field_set(item, shape.element or _UNTYPED, (*path, key), out)


def _smd_merge(lhs: Any, rhs: Any, shape: _Shape) -> Any:
    """structured-merge-diff's ``Merge`` of an apply configuration (``rhs``) into the live object: maps
    merge key by key, sets and list-maps item by item (kept in the order the merge walker makes), and any
    other value — scalars, atomic maps and lists — is the configuration's."""
    shape = _resolve_shape(shape, lhs, rhs)
    if shape.kind == "map" and not shape.atomic and isinstance(lhs, Mapping) and isinstance(rhs, Mapping):
        out = dict(lhs)
        for key, value in rhs.items():
            out[key] = _smd_merge(lhs[key], value, shape.child(key)) if key in lhs else copy.deepcopy(value)
        return out
    if (
        shape.kind == "list"
        and shape.list_type in ("set", "map")
        and isinstance(lhs, list)
        and isinstance(rhs, list)
    ):
        element = shape.element or _UNTYPED
        left, right = _list_items(shape, lhs), _list_items(shape, rhs)
        left_order, right_order = list(left), list(right)
        shared = [key for key in right_order if key in left]
        next_shared = shared.pop(0) if shared else None
        merged: list[Any] = []
        li = ri = 0
        while li < len(left_order) or ri < len(right_order):
            progressed = False
            if li < len(left_order) and ri < len(right_order):
                key = left_order[li]
                if key == right_order[ri]:
                    merged.append(_smd_merge(left[key], right[key], element))
                    li, ri = li + 1, ri + 1
                    next_shared = shared.pop(0) if shared else None
                    continue
                if key in right and next_shared is not None and next_shared != key:
                    li += 1  # shared, but not the one wanted now: merged when the configuration gets there
                    continue
            if li < len(left_order) and left_order[li] not in right:
                merged.append(copy.deepcopy(left[left_order[li]]))
                li += 1
                continue
            if ri < len(right_order):
                key = right_order[ri]
                merged.append(
                    _smd_merge(left[key], right[key], element) if key in left else copy.deepcopy(right[key])
                )
                ri += 1
                if next_shared is not None and next_shared == key:
                    next_shared = shared.pop(0) if shared else None
                progressed = True
            if not progressed:
                li += 1  # an item already merged from the configuration's side
        return merged
    return copy.deepcopy(rhs)


def _fields_v1(paths: set[_FieldPath]) -> dict[str, Any]:
    """A set of paths in FieldsV1 form: ``{"f:a": {".": {}, "f:b": {}}}`` (``.``: the node itself)."""
    tree: dict[str, Any] = {}
    members: set[_FieldPath] = set()
    for path in paths:
        node = tree
        for element in path:
            node = node.setdefault(element, {})
        members.add(path)

    def render(node: dict[str, Any], path: _FieldPath) -> dict[str, Any]:
        out: dict[str, Any] = {".": {}} if node and path in members else {}
        for element in sorted(node):
            out[element] = render(node[element], (*path, element))
        return out

    return render(tree, ())


def _parse_fields_v1(fields: Any, path: _FieldPath = ()) -> set[_FieldPath]:
    out: set[_FieldPath] = set()
    if not isinstance(fields, Mapping):
        return out
    if not fields and path:
        out.add(path)
    for element, sub in fields.items():
        if element == ".":
            out.add(path)
            continue
        if element.startswith(("k:", "v:")):
            with contextlib.suppress(ValueError):
                element = element[:2] + _go_json(json.loads(element[2:]))  # one spelling for one key
        out |= _parse_fields_v1(sub, (*path, element))
    return out


def _path_text(path: _FieldPath) -> str:
    """A path as a conflict message prints it: ``.spec.roles[="viewer"]``, ``.status.conditions[type="Ready"]``."""

    def shown(value: Any) -> str:
        return _go_quote(value) if isinstance(value, str) else _go_json(value)

    parts = []
    for element in path:
        kind, text = element[:2], element[2:]
        if kind == "f:":
            parts.append(f".{text}")
        elif kind == "k:":
            key = json.loads(text)
            parts.append("[" + ",".join(f"{k}={shown(v)}" for k, v in key.items()) + "]")
        elif kind == "v:":
            parts.append(f"[={shown(json.loads(text))}]")
        else:
            parts.append(f"[{text}]")
    return "".join(parts)


def _remove_path(obj: Any, path: _FieldPath) -> None:
    """Remove the field or list item at ``path`` from ``obj``, in place (nothing if it is not there)."""
    node = obj
    for index, element in enumerate(path):
        last = index == len(path) - 1
        kind, text = element[:2], element[2:]
        if kind == "f:" and isinstance(node, dict):
            if last:
                node.pop(text, None)
                return
            node = node.get(text)
        elif kind in ("k:", "v:") and isinstance(node, list):
            wanted = json.loads(text)
            match = [
                i
                for i, item in enumerate(node)
                if (kind == "v:" and _json_equal(item, wanted))
                or (
                    kind == "k:"
                    and isinstance(item, Mapping)
                    and all(item.get(k) == v for k, v in wanted.items())
                )
            ]
            if not match:
                return
            if last:
                node.pop(match[0])
                return
            node = node[match[0]]
        else:
            return


@dataclasses.dataclass(frozen=True)
class _FieldManager:
    """Who writes, and how: what a ``managedFields`` entry records."""

    manager: str
    operation: str  # "Update" or "Apply"
    api_version: str
    subresource: str | None = None
    force: bool = False

    @property
    def key(self) -> tuple[str, str, str, str]:
        # buildManagerIdentifier: an applier is the same manager whatever version it applies in.
        version = "" if self.operation == "Apply" else self.api_version
        return (self.manager, self.operation, version, self.subresource or "")


def _manager_name(request: kmock.Request) -> str:
    """``?fieldManager=``, else the User-Agent up to its first ``/`` (printable characters, at most 128)."""
    explicit = request.params.get("fieldManager")
    if explicit:
        return explicit
    agent = request.headers.get("User-Agent", "").split("/")[0]
    return "".join(char for char in agent if char.isprintable())[:128]


@dataclasses.dataclass
class _Managed:
    """The managed fields of an object: each manager's entry and its set of paths."""

    entries: dict[tuple[str, str, str, str], tuple[dict[str, Any], set[_FieldPath]]]

    @classmethod
    def read(cls, value: Any) -> _Managed:
        entries: dict[tuple[str, str, str, str], tuple[dict[str, Any], set[_FieldPath]]] = {}
        for entry in value if isinstance(value, list) else []:
            if not isinstance(entry, Mapping):
                continue
            operation, version = str(entry.get("operation") or ""), str(entry.get("apiVersion") or "")
            key = (
                str(entry.get("manager") or ""),
                operation,
                "" if operation == "Apply" else version,
                str(entry.get("subresource") or ""),
            )
            meta = {k: v for k, v in entry.items() if k not in ("fieldsType", "fieldsV1")}
            entries[key] = (meta, _parse_fields_v1(entry.get("fieldsV1")))
        return cls(entries)

    def write(self) -> list[dict[str, Any]]:
        """The entries as the API server stores them: sorted by operation, time (to the second), manager,
        API version and subresource."""
        out = []
        for meta, paths in self.entries.values():
            entry = {
                "manager": meta.get("manager", ""),
                "operation": meta.get("operation", ""),
                "apiVersion": meta.get("apiVersion", ""),
                "time": meta.get("time"),
                "fieldsType": "FieldsV1",
                "fieldsV1": _fields_v1(paths),
            }
            if meta.get("subresource"):
                entry["subresource"] = meta["subresource"]
            out.append(entry)
        out.sort(
            key=lambda e: (
                e["operation"],
                e["time"] or "",
                e["manager"],
                e["apiVersion"],
                e.get("subresource", ""),
            )
        )
        return out

    def take(self, paths: set[_FieldPath], *, removed: set[_FieldPath]) -> None:
        """The fields a write changed (``paths``) or removed belong to no one else any more."""
        for key, (_, owned) in list(self.entries.items()):
            owned -= paths
            owned -= removed
            if not owned:
                del self.entries[key]

    def conflicts(
        self, writer: _FieldManager, changed: set[_FieldPath]
    ) -> list[tuple[dict[str, Any], _FieldPath]]:
        found = []
        for key, (meta, owned) in sorted(self.entries.items()):
            if key != writer.key:
                found += [(meta, path) for path in sorted(owned & changed)]
        return found


def _conflict_error(conflicts: Sequence[tuple[Mapping[str, Any], _FieldPath]]) -> ApiError:
    """The 409 a server-side apply gets when it would take fields another manager set differently."""

    def printed(meta: Mapping[str, Any]) -> str:
        text = _go_quote(str(meta.get("manager", "")))
        if meta.get("subresource"):
            text += f" with subresource {_go_quote(str(meta['subresource']))}"
        if meta.get("operation") == "Update":
            text += f" using {meta.get('apiVersion', '')}"
        return text

    causes = [
        {
            "reason": "FieldManagerConflict",
            "message": f"conflict with {printed(meta)}",
            "field": _path_text(path),
        }
        for meta, path in conflicts
    ]
    if len(conflicts) == 1:
        meta, path = conflicts[0]
        message = f"Apply failed with 1 conflict: conflict with {printed(meta)}: {_path_text(path)}"
    else:
        lines: list[str] = []
        by_manager: dict[str, list[str]] = {}
        for meta, path in conflicts:
            by_manager.setdefault(printed(meta), []).append(_path_text(path))
        for manager in sorted(by_manager):
            lines.append(f"conflicts with {manager}:")
            lines += [f"- {path}" for path in by_manager[manager]]
        message = f"Apply failed with {len(conflicts)} conflicts: " + "\n".join(lines)
    return ApiError(409, "Conflict", message, {"causes": causes})


# -- tables: what `kubectl get` prints, computed by the server ----------------------------------------------


def _human_duration(seconds: float) -> str:
    """apimachinery's ``duration.HumanDuration``: how kubectl and the API server print an age."""
    whole = int(seconds)
    if whole < -1:
        return "<invalid>"
    if whole < 0:
        return "0s"
    if whole < 120:
        return f"{whole}s"
    minutes = whole // 60
    if minutes < 10:
        rest = whole % 60
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = whole // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d{rest}h" if rest else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y{days}d" if days else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def _parse_timestamp(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str) or not _GO_TIME.match(value):
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _jsonpath_text(value: Any) -> str:
    """How a printer column of type string shows a value (the JSONPath printer's text)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, (dict, list)):
        return _go_json(value)
    return str(value)


def _event_source(component: Any, instance: Any) -> str:
    component, instance = str(component or ""), str(instance or "")
    if not component and not instance:
        return ""
    return f"{component}, {instance}" if instance else component


_NAME_DOC = (
    "Name must be unique within a namespace. Is required when creating resources, although some "
    "resources may allow a client to request the generation of an appropriate name automatically. "
    "Name is primarily intended for creation idempotence and configuration definition. Cannot be "
    "updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-"
    "objects/names#names"
)
_CREATION_DOC = (
    "CreationTimestamp is a timestamp representing the server time when this object was created. It "
    "is not guaranteed to be set in happens-before order across separate operations. Clients may not "
    "set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-"
    "only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-"
    "architecture/api-conventions.md#metadata"
)
# The columns kube-apiserver v1.37 prints for the built-in kinds (pkg/printers/internalversion), and how
# it describes them; "" is the default table of a kind without a printer.
_BUILTIN_COLUMNS: dict[str, tuple[tuple[str, str, str, int], ...]] = {
    "ConfigMap": (("Name", "string", "name", 0), ("Data", "string", "", 0), ("Age", "string", "", 0)),
    "Event": (
        ("Last Seen", "string", "", 0),
        ("Type", "string", "", 0),
        ("Reason", "string", "", 0),
        ("Object", "string", "", 0),
        ("Subobject", "string", "", 1),
        ("Source", "string", "", 1),
        ("Message", "string", "", 0),
        ("First Seen", "string", "", 1),
        ("Count", "string", "", 1),
        ("Name", "string", "name", 1),
    ),
    "ServiceAccount": (("Name", "string", "name", 0), ("Age", "string", "", 0)),
    "Secret": (
        ("Name", "string", "name", 0),
        ("Type", "string", "", 0),
        ("Data", "string", "", 0),
        ("Age", "string", "", 0),
    ),
    "Namespace": (("Name", "string", "name", 0), ("Status", "string", "", 0), ("Age", "string", "", 0)),
    "Pod": (
        ("Name", "string", "name", 0),
        ("Ready", "string", "", 0),
        ("Status", "string", "", 0),
        ("Restarts", "string", "", 0),
        ("Age", "string", "", 0),
        ("IP", "string", "", 1),
        ("Node", "string", "", 1),
        ("Nominated Node", "string", "", 1),
        ("Readiness Gates", "string", "", 1),
    ),
    "CustomResourceDefinition": (
        ("Name", "string", "name", 0),
        ("Scope", "string", "", 0),
        ("Versions", "string", "", 0),
        ("Created At", "date", "", 0),
        ("Group", "string", "", 1),
        ("Kind", "string", "", 1),
        ("ShortNames", "string", "", 1),
        ("Established", "boolean", "", 1),
    ),
    "": (("Name", "string", "name", 0), ("Created At", "date", "", 0)),
}
_COLUMN_DOCS: dict[tuple[str, str], str] = {
    ("ConfigMap", "Data"): (
        "Data contains the configuration data. Each key must consist of alphanumeric characters, '-', '_'"
        " or '.'. Values with non-UTF-8 byte sequences must use the BinaryData field. The keys stored in "
        "Data must not overlap with the keys in the BinaryData field, this is enforced during validation "
        "process."
    ),
    ("Event", "Last Seen"): "The time at which the most recent occurrence of this event was recorded.",
    ("Event", "Type"): "Type of this event (Normal, Warning), new types could be added in the future",
    ("Event", "Reason"): (
        "This should be a short, machine understandable string that gives the reason for the transition "
        "into the object's current status."
    ),
    ("Event", "Object"): "The object that this event is about.",
    ("Event", "Subobject"): (
        "If referring to a piece of an object instead of an entire object, this string should contain a "
        "valid JSON/Go field access statement, such as desiredState.manifest.containers[2]. For example, "
        "if the object reference is to a container within a pod, this would take on a value like: "
        '"spec.containers{name}" (where "name" refers to the name of the container that triggered the '
        'event) or if no container name is specified "spec.containers[2]" (container with index 2 in this'
        " pod). This syntax is chosen only to have some well-defined way of referencing a part of an "
        "object."
    ),
    ("Event", "Source"): (
        "The component reporting this event. Should be a short machine understandable string."
    ),
    ("Event", "Message"): "A human-readable description of the status of this operation.",
    ("Event", "First Seen"): (
        "The time at which the event was first recorded. (Time of server receipt is in TypeMeta.)"
    ),
    ("Event", "Count"): "The number of times this event has occurred.",
    ("Secret", "Type"): (
        "Used to facilitate programmatic handling of secret data. More info: "
        "https://kubernetes.io/docs/concepts/configuration/secret/#secret-types"
    ),
    ("Secret", "Data"): (
        "Data contains the secret data. Each key must consist of alphanumeric characters, '-', '_' or "
        "'.'. The serialized form of the secret data is a base64 encoded string, representing the "
        "arbitrary (possibly non-string) data value here. Described in "
        "https://tools.ietf.org/html/rfc4648#section-4"
    ),
    ("Namespace", "Status"): "The status of the namespace",
    ("Pod", "Ready"): "The aggregate readiness state of this pod for accepting traffic.",
    ("Pod", "Status"): "The aggregate status of the containers in this pod.",
    ("Pod", "Restarts"): (
        "The number of times the containers in this pod have been restarted and when the last container "
        "in this pod has restarted."
    ),
    ("Pod", "IP"): (
        "podIP address allocated to the pod. Routable at least within the cluster. Empty if not yet "
        "allocated."
    ),
    ("Pod", "Node"): (
        "NodeName indicates in which node this pod is scheduled. If empty, this pod is a candidate for "
        "scheduling by the scheduler defined in schedulerName. Once this field is set, the kubelet for "
        "this node becomes responsible for the lifecycle of this pod. This field should not be used to "
        "express a desire for the pod to be scheduled on a specific node. "
        "https://kubernetes.io/docs/concepts/scheduling-eviction/assign-pod-node/#nodename"
    ),
    ("Pod", "Nominated Node"): (
        "nominatedNodeName is set only when this pod preempts other pods on the node, but it cannot be "
        "scheduled right away as preemption victims receive their graceful termination periods. This "
        "field does not guarantee that the pod will be scheduled on this node. Scheduler may decide to "
        "place the pod elsewhere if other nodes become available sooner. Scheduler may also decide to "
        "give the resources on this node to a higher priority pod that is created after preemption. As a "
        "result, this field may be different than PodSpec.nodeName when the pod is scheduled."
    ),
    ("Pod", "Readiness Gates"): (
        "If specified, all readiness gates will be evaluated for pod readiness. A pod is ready when all "
        "its containers are ready AND all conditions specified in the readiness gates have status equal "
        'to "True" More info: https://git.k8s.io/enhancements/keps/sig-network/580-pod-readiness-gates'
    ),
    ("CustomResourceDefinition", "Scope"): "Cluster/Namespaced",
    ("CustomResourceDefinition", "Versions"): "Served versions",
    ("CustomResourceDefinition", "Group"): "API group",
    ("CustomResourceDefinition", "Kind"): "CustomResource kind",
    ("CustomResourceDefinition", "ShortNames"): "Short names",
    ("CustomResourceDefinition", "Established"): "Established status",
}


# -- protobuf request bodies (what kubectl's typed clients send for built-in kinds) ------------------------

_PROTOBUF = "application/vnd.kubernetes.protobuf"
_PROTOBUF_MAGIC = b"k8s\x00"


@dataclasses.dataclass(frozen=True)
class _PbField:
    """One field of a protobuf message: its JSON name and how to read it.

    Kinds: ``string``, ``int`` (zero omitted, as Go's ``omitempty``), ``optint`` (a pointer: kept when
    sent), ``bool``, ``bytes`` (base64 in JSON), ``time`` / ``microtime`` (metav1.Time, MicroTime),
    ``message`` (kept even when empty), ``optmessage`` (a pointer: dropped when empty), ``map`` (string to
    string) and ``bytesmap`` (string to bytes).
    """

    name: str
    kind: str
    message: Mapping[int, _PbField] | None = None
    repeated: bool = False


def _pb(
    name: str, kind: str, message: Mapping[int, _PbField] | None = None, *, repeated: bool = False
) -> _PbField:
    return _PbField(name, kind, message, repeated)


# Field numbers from k8s.io/api core/v1, authentication/v1 and k8s.io/apimachinery meta/v1 generated.proto.
_PB_OWNER_REFERENCE = {
    5: _pb("apiVersion", "string"),
    1: _pb("kind", "string"),
    3: _pb("name", "string"),
    4: _pb("uid", "string"),
    6: _pb("controller", "bool"),
    7: _pb("blockOwnerDeletion", "bool"),
}
_PB_OBJECT_META = {
    1: _pb("name", "string"),
    2: _pb("generateName", "string"),
    3: _pb("namespace", "string"),
    5: _pb("uid", "string"),
    6: _pb("resourceVersion", "string"),
    7: _pb("generation", "int"),
    8: _pb("creationTimestamp", "time"),
    9: _pb("deletionTimestamp", "time"),
    10: _pb("deletionGracePeriodSeconds", "optint"),
    11: _pb("labels", "map"),
    12: _pb("annotations", "map"),
    13: _pb("ownerReferences", "message", _PB_OWNER_REFERENCE, repeated=True),
    14: _pb("finalizers", "string", repeated=True),
}
_PB_OBJECT_REFERENCE = {
    1: _pb("kind", "string"),
    2: _pb("namespace", "string"),
    3: _pb("name", "string"),
    4: _pb("uid", "string"),
    5: _pb("apiVersion", "string"),
    6: _pb("resourceVersion", "string"),
    7: _pb("fieldPath", "string"),
}
_PB_METADATA = _pb("metadata", "message", _PB_OBJECT_META)
_PB_KINDS: dict[tuple[str, str], Mapping[int, _PbField]] = {
    ("v1", "Namespace"): {
        1: _PB_METADATA,
        2: _pb("spec", "message", {1: _pb("finalizers", "string", repeated=True)}),
        3: _pb("status", "message", {1: _pb("phase", "string")}),
    },
    ("v1", "ServiceAccount"): {
        1: _PB_METADATA,
        2: _pb("secrets", "message", _PB_OBJECT_REFERENCE, repeated=True),
        3: _pb("imagePullSecrets", "message", {1: _pb("name", "string")}, repeated=True),
        4: _pb("automountServiceAccountToken", "bool"),
    },
    ("v1", "ConfigMap"): {
        1: _PB_METADATA,
        2: _pb("data", "map"),
        3: _pb("binaryData", "bytesmap"),
        4: _pb("immutable", "bool"),
    },
    ("v1", "Secret"): {
        1: _PB_METADATA,
        2: _pb("data", "bytesmap"),
        3: _pb("type", "string"),
        4: _pb("stringData", "map"),
        5: _pb("immutable", "bool"),
    },
    ("v1", "Event"): {
        1: _PB_METADATA,
        2: _pb("involvedObject", "message", _PB_OBJECT_REFERENCE),
        3: _pb("reason", "string"),
        4: _pb("message", "string"),
        5: _pb("source", "message", {1: _pb("component", "string"), 2: _pb("host", "string")}),
        6: _pb("firstTimestamp", "time"),
        7: _pb("lastTimestamp", "time"),
        8: _pb("count", "int"),
        9: _pb("type", "string"),
        10: _pb("eventTime", "microtime"),
        11: _pb("series", "optmessage", {1: _pb("count", "int"), 2: _pb("lastObservedTime", "microtime")}),
        12: _pb("action", "string"),
        13: _pb("related", "optmessage", _PB_OBJECT_REFERENCE),
        14: _pb("reportingComponent", "string"),
        15: _pb("reportingInstance", "string"),
    },
    ("authentication.k8s.io/v1", "TokenRequest"): {
        1: _PB_METADATA,
        2: _pb(
            "spec",
            "message",
            {
                1: _pb("audiences", "string", repeated=True),
                4: _pb("expirationSeconds", "optint"),
                3: _pb(
                    "boundObjectRef",
                    "optmessage",
                    {
                        1: _pb("kind", "string"),
                        2: _pb("apiVersion", "string"),
                        3: _pb("name", "string"),
                        4: _pb("uid", "string"),
                    },
                ),
            },
        ),
    },
    ("v1", "DeleteOptions"): {
        1: _pb("gracePeriodSeconds", "optint"),
        2: _pb("preconditions", "optmessage", {1: _pb("uid", "string"), 2: _pb("resourceVersion", "string")}),
        3: _pb("orphanDependents", "bool"),
        4: _pb("propagationPolicy", "string"),
        5: _pb("dryRun", "string", repeated=True),
    },
}
_PB_TYPE_META = {1: _pb("apiVersion", "string"), 2: _pb("kind", "string")}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _protobuf_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """Decode one protobuf message into (field number, varint or bytes) pairs, in wire order."""
    fields: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == 0:
            value, pos = _varint(data, pos)
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ValueError("truncated length-delimited field")
            value, pos = data[pos : pos + length], pos + length
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, pos = data[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        fields.append((number, value))
    return fields


def _pb_time(data: bytes, *, micro: bool) -> str | None:
    seconds = nanos = 0
    for number, value in _protobuf_fields(data):
        if number == 1 and isinstance(value, int):
            seconds = value - 2**64 if value >= 2**63 else value
        elif number == 2 and isinstance(value, int):
            nanos = value
    if not seconds and not nanos:
        return None  # the zero time is null in JSON
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    if micro:
        return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos // 1000:06d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _pb_scalar(spec: _PbField, value: int | bytes) -> Any:
    kind = spec.kind
    if kind in ("int", "optint") and isinstance(value, int):
        return value - 2**64 if value >= 2**63 else value
    if kind == "bool" and isinstance(value, int):
        return bool(value)
    if isinstance(value, bytes):
        if kind == "string":
            return value.decode("utf-8")
        if kind == "bytes":
            return base64.b64encode(value).decode("ascii")
        if kind in ("time", "microtime"):
            return _pb_time(value, micro=kind == "microtime")
        if kind in ("message", "optmessage"):
            assert spec.message is not None
            return _pb_message(value, spec.message)
    raise ValueError(f"field {spec.name} has the wrong wire type for {kind}")


def _pb_message(data: bytes, message: Mapping[int, _PbField]) -> dict[str, Any]:
    """A protobuf message as the JSON object the same Go struct marshals to (unknown fields skipped)."""
    result: dict[str, Any] = {}
    for number, value in _protobuf_fields(data):
        spec = message.get(number)
        if spec is None:
            continue
        if spec.kind in ("map", "bytesmap"):
            if not isinstance(value, bytes):
                raise ValueError(f"field {spec.name} has the wrong wire type for a map")
            entry = dict(_protobuf_fields(value))
            key, item = entry.get(1, b""), entry.get(2, b"")
            if not isinstance(key, bytes) or not isinstance(item, bytes):
                raise ValueError(f"field {spec.name} has a malformed map entry")
            shown = item.decode("utf-8") if spec.kind == "map" else base64.b64encode(item).decode("ascii")
            result.setdefault(spec.name, {})[key.decode("utf-8")] = shown
            continue
        decoded = _pb_scalar(spec, value)
        if spec.repeated:
            result.setdefault(spec.name, []).append(decoded)
        else:
            result[spec.name] = decoded
    for spec in message.values():  # Go's omitempty: zero values of value fields are not written
        found = result.get(spec.name)
        if spec.name in result and (
            found is None
            or (spec.kind == "string" and not spec.repeated and found == "")
            or (spec.kind == "int" and found == 0)
            or (spec.kind == "optmessage" and found == {})
        ):
            del result[spec.name]
    return result


def _unsupported_protobuf(kind: str) -> ApiError:
    known = ", ".join(sorted({k for _, k in _PB_KINDS}))
    msg = f"the emulator decodes {_PROTOBUF} request bodies for {known} only, not {kind}: send it as JSON"
    return ApiError(415, "UnsupportedMediaType", msg)


def _decode_protobuf(body: bytes) -> dict[str, Any]:
    """A Kubernetes protobuf body (``k8s\\0`` + runtime.Unknown{typeMeta, raw, contentEncoding,
    contentType}) as the JSON object it stands for; ``ApiError`` 400 or 415 when it cannot be read."""
    if not body.startswith(_PROTOBUF_MAGIC):
        raise _bad_request(
            f"the body is not a Kubernetes protobuf envelope (it must start with {_PROTOBUF_MAGIC!r})"
        )
    try:
        fields = dict(_protobuf_fields(body[len(_PROTOBUF_MAGIC) :]))
        type_meta_bytes, raw = fields.get(1, b""), fields.get(2, b"")
        if not isinstance(type_meta_bytes, bytes) or not isinstance(raw, bytes):
            raise ValueError("malformed runtime.Unknown envelope")
        type_meta = _pb_message(type_meta_bytes, _PB_TYPE_META)
        encoding = fields.get(3, b"")
        if encoding not in (b"", None):
            raise ValueError(f"unsupported contentEncoding {encoding!r}")
        key = (str(type_meta.get("apiVersion", "")), str(type_meta.get("kind", "")))
        message = _PB_KINDS.get(key)
        if message is None:
            raise _unsupported_protobuf(
                f"{key[1] or 'an object without a kind'} ({key[0] or 'no apiVersion'})"
            )
        decoded = _pb_message(raw, message)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad_request(f"cannot decode the protobuf body: {exc}") from None
    return {"apiVersion": key[0], "kind": key[1], **decoded}


def _media_types(header: str) -> list[str]:
    return [part.split(";")[0].strip().lower() for part in header.split(",") if part.strip()]


def _accepts_json(accept: str) -> bool:
    """Whether an ``Accept`` header allows the JSON the emulator answers with (absent: anything goes)."""
    types = _media_types(accept)
    return not types or any(t in ("application/json", "application/*", "*/*") for t in types)


def _require_json_acceptable(request: kmock.Request) -> None:
    accept = request.headers.get("Accept", "")
    if not _accepts_json(accept):
        # Typed clients offer protobuf and JSON; one that insists on protobuf cannot be served.
        msg = f"the emulator answers with application/json only, which the request does not accept ({accept})"
        raise ApiError(406, "NotAcceptable", msg)


def _json_body(request: kmock.Request) -> dict[str, Any]:
    """The request's object: its JSON body, or its protobuf body decoded to the same JSON."""
    if request.headers.get("Content-Type", "").startswith(_PROTOBUF) and not isinstance(request.data, dict):
        return _decode_protobuf(request.body)  # raises why it cannot be read
    if not isinstance(request.data, dict):
        raise _bad_request("the body of the request must be a JSON object")
    return request.data


def _field_validation(request: kmock.Request) -> str:
    """The ``fieldValidation`` directive: Ignore, Warn (the default) or Strict (what kubectl sends)."""
    return request.params.get("fieldValidation") or "Warn"


def _warning_header(warnings: Sequence[str]) -> str:
    """RFC 7234 warnings as kube-apiserver sends them (code 299, agent ``-``); kubectl prints each."""
    return ", ".join(f"299 - {json.dumps(text)}" for text in dict.fromkeys(warnings))


# -- OpenAPI v3 documents for installed CRDs (what kubectl explain reads) ----------------------------------

_META_V1 = "io.k8s.apimachinery.pkg.apis.meta.v1"
_CONVENTIONS = "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md"
_TYPE_META_PROPERTIES = {
    "apiVersion": {
        "type": "string",
        "description": (
            "APIVersion defines the versioned schema of this representation of an object. Servers should"
            " convert recognized schemas to the latest internal value, and may reject unrecognized values."
            f" More info: {_CONVENTIONS}#resources"
        ),
    },
    "kind": {
        "type": "string",
        "description": (
            "Kind is a string value representing the REST resource this object represents. Servers may infer"
            " this from the endpoint the client submits requests to. Cannot be updated. In CamelCase. More"
            f" info: {_CONVENTIONS}#types-kinds"
        ),
    },
}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string", "default": ""}}
# The parts of ObjectMeta and ListMeta a client reads: enough for `kubectl explain <kind>.metadata`.
_META_SCHEMAS: dict[str, dict[str, Any]] = {
    f"{_META_V1}.ObjectMeta": {
        "type": "object",
        "description": "ObjectMeta is metadata that all persisted resources must have, which includes all"
        " objects users must create.",
        "properties": {
            "name": {"type": "string", "description": "Name must be unique within a namespace."},
            "generateName": {
                "type": "string",
                "description": "An optional prefix the server uses to generate a unique name if none is given.",
            },
            "namespace": {
                "type": "string",
                "description": "The namespace the object is in (empty: cluster-scoped).",
            },
            "uid": {
                "type": "string",
                "description": "The unique, server-assigned identifier of this object.",
            },
            "resourceVersion": {
                "type": "string",
                "description": "An opaque value that changes on every write, for optimistic concurrency and watches.",
            },
            "generation": {
                "type": "integer",
                "format": "int64",
                "description": "A sequence number of the desired state, incremented on every spec change.",
            },
            "creationTimestamp": {
                "type": "string",
                "format": "date-time",
                "description": "When the server created this object.",
            },
            "deletionTimestamp": {
                "type": "string",
                "format": "date-time",
                "description": "When deletion was requested; set by the server, the object goes once its"
                " finalizers are gone.",
            },
            "deletionGracePeriodSeconds": {
                "type": "integer",
                "format": "int64",
                "description": "Seconds allowed for graceful termination once deletion was requested.",
            },
            "labels": dict(_STRING_MAP, description="Labels to organize and select objects."),
            "annotations": dict(_STRING_MAP, description="Unstructured data set by tools and users."),
            "finalizers": {
                "type": "array",
                "items": {"type": "string", "default": ""},
                "x-kubernetes-list-type": "set",
                "description": "Keys that must be empty before the object is removed from the registry.",
            },
            "ownerReferences": {
                "type": "array",
                "description": "The objects this object depends on: it is garbage collected after they are gone.",
                "items": {
                    "type": "object",
                    "required": ["apiVersion", "kind", "name", "uid"],
                    "properties": {
                        "apiVersion": {"type": "string", "description": "API version of the referent."},
                        "kind": {"type": "string", "description": "Kind of the referent."},
                        "name": {"type": "string", "description": "Name of the referent."},
                        "uid": {"type": "string", "description": "UID of the referent."},
                        "controller": {
                            "type": "boolean",
                            "description": "If true, this reference points to the managing controller.",
                        },
                        "blockOwnerDeletion": {
                            "type": "boolean",
                            "description": "If true, the owner cannot"
                            " be deleted from the key-value store until this reference"
                            " is removed.",
                        },
                    },
                },
            },
        },
    },
    f"{_META_V1}.ListMeta": {
        "type": "object",
        "description": "ListMeta describes metadata that synthetic resources must have, including lists.",
        "properties": {
            "resourceVersion": {"type": "string", "description": "The version of the list, to watch from."},
            "continue": {"type": "string", "description": "Set when more items are available to list."},
            "remainingItemCount": {
                "type": "integer",
                "format": "int64",
                "description": "How many items are left after this page.",
            },
        },
    },
}


def _definition_name(group: str, version: str, kind: str) -> str:
    """kube-openapi's friendly name of a CRD kind: the group reversed (``dev.chainguard.iam.v1alpha1.X``)."""
    return ".".join([*reversed(group.split(".")), version, kind])


def _meta_ref(name: str, description: str) -> dict[str, Any]:
    return {"allOf": [{"$ref": f"#/components/schemas/{_META_V1}.{name}"}], "description": description}


def _crd_openapi_schemas(crd: Mapping[str, Any], version: Mapping[str, Any]) -> dict[str, Any]:
    """The ``components.schemas`` a CRD version publishes: the kind (its openAPIV3Schema with TypeMeta and an
    ObjectMeta reference added) and its list, each tagged with ``x-kubernetes-group-version-kind``."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group, name, kind = str(spec.get("group")), str(version.get("name")), str(names.get("kind"))
    list_kind = str(names.get("listKind") or f"{kind}List")
    schema = copy.deepcopy((version.get("schema") or {}).get("openAPIV3Schema") or {"type": "object"})
    properties = schema.setdefault("properties", {})
    properties.update(copy.deepcopy(_TYPE_META_PROPERTIES))
    properties["metadata"] = _meta_ref(
        "ObjectMeta", f"Standard object's metadata. More info: {_CONVENTIONS}#metadata"
    )
    schema["x-kubernetes-group-version-kind"] = [{"group": group, "kind": kind, "version": name}]
    item = _definition_name(group, name, kind)
    listed = {
        "type": "object",
        "description": f"{list_kind} is a list of {kind}",
        "required": ["items"],
        "properties": {
            **copy.deepcopy(_TYPE_META_PROPERTIES),
            "items": {
                "type": "array",
                "description": f"List of {names.get('plural')}. More info: {_CONVENTIONS}",
                "items": {"$ref": f"#/components/schemas/{item}"},
            },
            "metadata": _meta_ref(
                "ListMeta", f"Standard list metadata. More info: {_CONVENTIONS}#types-kinds"
            ),
        },
        "x-kubernetes-group-version-kind": [{"group": group, "kind": list_kind, "version": name}],
    }
    return {item: schema, _definition_name(group, name, list_kind): listed}


def _spec_part(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Everything that counts for ``generation``: all but metadata and status."""
    return {
        key: value for key, value in obj.items() if key not in ("metadata", "status", "apiVersion", "kind")
    }


def _json_path(obj: Any, path: str) -> Any:
    """The subset of JSONPath CRD printer columns use: ``.a.b``, ``.a[0]``, ``.a[?(@.k=="v")].b``."""
    value = obj
    for part in re.findall(r"\[\?\(@\.\w+==[\"'][^\"']*[\"']\)\]|\[\d+\]|[^.\[\]]+", path):
        if part.startswith("[?"):
            m = re.match(r"\[\?\(@\.(\w+)==[\"']([^\"']*)[\"']\)\]", part)
            assert m is not None
            items = value if isinstance(value, list) else []
            value = next((i for i in items if isinstance(i, Mapping) and str(i.get(m[1])) == m[2]), None)
        elif part.startswith("["):
            index = int(part[1:-1])
            value = value[index] if isinstance(value, list) and index < len(value) else None
        else:
            value = value.get(part) if isinstance(value, Mapping) else None
        if value is None:
            return None
    return value


def write_kubeconfig(
    path: pathlib.Path, server_url: str, *, namespace: str = "default", token: str | None = None
) -> None:
    """Write a kubeconfig for kubectl and the ``kubernetes`` client pointing at the emulator (plain http)."""
    user: dict[str, Any] = {"token": token} if token else {}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": str(server_url).rstrip("/")}}],
        "users": [{"name": "emulator", "user": user}],
        "contexts": [
            {
                "name": "emulator",
                "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace},
            }
        ],
        "current-context": "emulator",
        "preferences": {},
    }
    # The file may hold a bearer token: readable by its owner only.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when the file existed with looser permissions
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        yaml.safe_dump(config, file, sort_keys=False)
