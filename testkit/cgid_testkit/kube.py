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

What else it emulates, as kube-apiserver v1.32 does it:

- Custom resources are decoded and validated with their CRD's ``openAPIV3Schema``: unknown fields are
  pruned (``fieldValidation`` Warn, the default, answers with ``Warning`` headers; Strict, what kubectl
  sends, refuses them; Ignore is silent), ``x-kubernetes-preserve-unknown-fields`` keeps them, ``default``s
  are applied, then type, enum, pattern (RE2), min/max length, items, properties, minimum/maximum,
  multipleOf, required, the date-time/date/byte/uuid/ip/cidr/mac formats, int-or-string, nullable,
  allOf/anyOf/oneOf/not, list-type set/map duplicates and the DNS-subdomain name are checked, and the
  ``x-kubernetes-validations`` CEL rules run (``message``, ``messageExpression``, ``reason``,
  ``fieldPath``; ``oldSelf`` transition rules on update only) unless a blocking schema error stops them.
  Updates ratchet: a value unchanged from the stored object is not failed again (a CEL failure on it
  becomes a warning). The answer is the 422 ``Status`` kube-apiserver sends, its messages worded the same.
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

What it does not emulate: schemas of built-in kinds (their bodies are stored as sent), admission
webhooks and policies, CRD conversion (only the storage version is served), managed fields and
server-side apply conflicts (apply is a merge), authentication and RBAC (every request is allowed), the
CRD cost estimator, field selectors beyond exact matches, and protobuf or CBOR responses.
"""

from __future__ import annotations

import asyncio
import base64
import collections
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


# The built-in resources the operator, kopf and kubectl touch, as a real v1.32 server describes them.
_CORE_RESOURCES: tuple[tuple[kmock.resource, kmock.ResourceInfo], ...] = (
    (_NAMESPACES, _info("Namespace", False, short={"ns"})),
    (kmock.resource("", "v1", "configmaps"), _info("ConfigMap", True, short={"cm"})),
    (_SERVICE_ACCOUNTS, _info("ServiceAccount", True, short={"sa"}, subresources={"token"})),
    (_SECRETS, _info("Secret", True)),
    (kmock.resource("", "v1", "events"), _info("Event", True, short={"ev"})),
    (
        kmock.resource("", "v1", "pods"),
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
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
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


def _go_syntax(value: Any) -> str:
    """Go's ``%#v`` of a decoded JSON value (``map[string]interface {}{"a":1}``)."""
    if value is None:
        return "interface {}(nil)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, str):
        return _go_quote(value)
    if isinstance(value, Mapping):
        items = ", ".join(f"{_go_quote(str(k))}:{_go_syntax(v)}" for k, v in sorted(value.items()))
        return f"map[string]interface {{}}{{{items}}}"
    if isinstance(value, list):
        return "[]interface {}{" + ", ".join(_go_syntax(v) for v in value) + "}"
    return str(value)


def _go_value(value: Any) -> str:
    """How ``ErrorBody`` prints a bad value: ``%q`` for strings, ``%v`` for scalars, ``%#v`` otherwise."""
    if value is None:
        return '"null"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, str):
        return _go_quote(value)
    return _go_syntax(value)


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
_OBJECT_META_FIELDS = frozenset(
    {
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
    }
)
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
        errors.append(
            _FieldError(
                "FieldValueInvalid", "", "", f"{_go_quote(path)} must validate at least one schema (anyOf)"
            )
        )
        errors.append(
            _FieldError(
                "FieldValueTypeInvalid", path, actual, f"{where} must be of type integer: {_go_quote(actual)}"
            )
        )
        return errors
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
        if reason == "FieldValueForbidden":
            error = _FieldError("FieldValueForbidden", where, _OMIT, detail)
        elif reason == "FieldValueRequired":
            error = _FieldError("FieldValueRequired", where, _OMIT, detail)
        elif reason == "FieldValueDuplicate":
            error = _FieldError("FieldValueDuplicate", where, kind)
        else:
            error = _FieldError("FieldValueInvalid", where, kind, detail)
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

    def openid_configuration(self) -> dict[str, Any]:
        """The OIDC discovery document as ``/.well-known/openid-configuration`` serves it."""
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer.rstrip('/')}/openid/v1/jwks",
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
        """A ``meta.k8s.io/v1`` Table for ``kubectl get``: name, CRD printer columns, age."""
        columns = self._printer_columns(resource)
        definitions = [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}]
        definitions += [
            {
                "name": c["name"],
                "type": c.get("type", "string"),
                "format": "",
                "description": "",
                "priority": 0,
            }
            for c in columns
        ]
        definitions.append({"name": "Age", "type": "string", "format": "", "description": "", "priority": 0})
        rows = []
        for obj in items:
            cells: list[Any] = [_meta(obj).get("name")]
            cells += [self._printer_cell(obj, column) for column in columns]
            cells.append(self._age(_meta(obj).get("creationTimestamp")))
            partial = {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": _meta(obj),
            }
            rows.append({"cells": cells, "object": partial})
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": str(self._resource_version)},
            "columnDefinitions": definitions,
            "rows": rows,
        }

    def _printer_columns(self, resource: kmock.resource) -> list[dict[str, Any]]:
        _, version = self._crd_version(resource)
        columns = (version or {}).get("additionalPrinterColumns") or []
        # Age is appended anyway, like the API server does for creationTimestamp.
        return [c for c in columns if c.get("jsonPath") != ".metadata.creationTimestamp"]

    def _printer_cell(self, obj: Mapping[str, Any], column: Mapping[str, Any]) -> Any:
        value = _json_path(obj, str(column.get("jsonPath", "")))
        if column.get("type") == "date" and isinstance(value, str):
            return self._age(value)
        return value  # the API server sends null for a missing value: kubectl leaves the cell empty

    def _age(self, timestamp: Any) -> str:
        if not isinstance(timestamp, str):
            return "<unknown>"
        then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
        seconds = int((self._now() - then).total_seconds())
        if seconds < -1:
            return "<invalid>"  # what the API server prints for a date in the future
        seconds = max(0, seconds)
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if seconds >= size:
                return f"{seconds // size}{unit}"
        return f"{seconds}s"

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
        )
        return 201, created

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
        old = self._current(resource, request.namespace, request.name)
        if old is None:
            if content_type == "application/apply-patch+yaml" and subresource is None:
                # Server-side apply creates what does not exist yet.
                self._require_namespace(request.namespace)
                created = self._create(
                    resource,
                    request.namespace,
                    patch,
                    dry_run=self._dry_run(request),
                    validation=_field_validation(request),
                )
                return 201, created
            raise _not_found(resource, request.name)
        target = copy.deepcopy(old)
        if content_type == "application/json-patch+json":
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
        )
        return 200, result

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
        return self.openid_configuration()

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
            "info": {"title": "Kubernetes", "version": "v1.32.0"},
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
    ) -> dict[str, Any]:
        info = self.resources[resource]
        new = copy.deepcopy(dict(body))
        schema = self._schema_of(resource)
        if schema is not None:
            self._decode_custom(resource, info, new, schema, validation=validation, patched=False)
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
        meta["generation"] = 1
        if schema is not None:
            self._validate_custom(resource, info, new, schema, old=None)
        self._server_side_defaults(resource, new)
        if dry_run:
            return new
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
    ) -> dict[str, Any]:
        """Turn a client's desired object into the stored one, keeping what clients may not change."""
        info = self.resources[resource]
        schema = self._schema_of(resource)
        if schema is not None:
            # Decoding prunes (and with fieldValidation=Strict refuses) unknown fields and applies defaults.
            self._decode_custom(resource, info, candidate, schema, validation=validation, patched=patched)
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
        meta["generation"] = old_meta.get("generation", 1)
        if _spec_part(new) != _spec_part(old):
            meta["generation"] = meta["generation"] + 1
        if schema is not None:
            self._validate_custom(resource, info, new, schema, old=old)
        self._server_side_defaults(resource, new)
        if new == old:
            return dict(old)  # a no-op write changes nothing, not even the resourceVersion
        if dry_run:
            return new
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
        elif resource == _SECRETS and not obj.get("type"):
            obj["type"] = "Opaque"  # SetDefaults_Secret
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
        return (
            schema
            if isinstance(schema, dict)
            else {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        )

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
