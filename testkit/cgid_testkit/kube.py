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
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import re
import secrets
import string
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
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
    (kmock.resource("", "v1", "secrets"), _info("Secret", True)),
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
        try:
            status, body = handler(request)
        except ApiError as exc:
            status, body = exc.code, exc.status()
        return Response(status=status, payload=body)

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
        for crd_name, res in self._crd_resources.items():
            crd = self._current(_CRD_RESOURCE, None, crd_name)
            if res == resource and crd is not None:
                for version in crd.get("spec", {}).get("versions", []):
                    if version.get("name") == resource.version:
                        columns = version.get("additionalPrinterColumns") or []
                        # Age is appended anyway, like the API server does for creationTimestamp.
                        return [c for c in columns if c.get("jsonPath") != ".metadata.creationTimestamp"]
        return []

    def _printer_cell(self, obj: Mapping[str, Any], column: Mapping[str, Any]) -> Any:
        value = _json_path(obj, str(column.get("jsonPath", "")))
        if column.get("type") == "date" and isinstance(value, str):
            return self._age(value)
        return "<none>" if value is None else value

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

        return self._stream_watch(
            watch, since, initial=initial, bookmarks=bookmarks, timeout=timeout, connected=connected
        )

    async def _stream_watch(
        self,
        watch: _Watch,
        since: int | None,
        *,
        initial: bool,
        bookmarks: bool,
        timeout: float,
        connected: Callable[[], bool],
    ) -> AsyncIterator[kmock.Payload]:
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
        _refuse_protobuf(request)
        body = request.data
        if not isinstance(body, dict):
            raise _bad_request("the body of the request must be a JSON object")
        return 201, self._create(resource, request.namespace, body, dry_run=self._dry_run(request))

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
                return 201, self._create(resource, request.namespace, patch, dry_run=self._dry_run(request))
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
        _refuse_protobuf(request)
        body = request.data
        if not isinstance(body, dict):
            raise _bad_request("the body of the request must be a JSON object")
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
        if request.headers.get("Content-Type", "").startswith(_PROTOBUF):
            body = _token_request_from_protobuf(request.body)  # what kubectl create token sends
        else:
            body = request.data if isinstance(request.data, dict) else {}
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
        """A skeleton OpenAPI v3 document: one PATCH operation per kind that accepts ``fieldValidation``."""
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
        return {
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": "v1.32.0"},
            "paths": paths,
            "components": {"schemas": {}},
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
    ) -> dict[str, Any]:
        info = self.resources[resource]
        new = copy.deepcopy(dict(body))
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
    ) -> dict[str, Any]:
        candidate = copy.deepcopy(dict(body))
        if not check_version:
            _meta(candidate).pop("resourceVersion", None)
        return self._update(
            resource, namespace, name, candidate, old=old, subresource=subresource, dry_run=dry_run
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
    ) -> dict[str, Any]:
        """Turn a client's desired object into the stored one, keeping what clients may not change."""
        info = self.resources[resource]
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
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
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
        return last

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
            obj["status"] = {"phase": "Terminating" if _meta(obj).get("deletionTimestamp") else "Active"}
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


_PROTOBUF = "application/vnd.kubernetes.protobuf"


def _refuse_protobuf(request: kmock.Request) -> None:
    if request.headers.get("Content-Type", "").startswith(_PROTOBUF):
        # Only TokenRequest is decoded from protobuf (for kubectl create token); other bodies must be JSON.
        msg = f"the emulator accepts JSON bodies only here, not {_PROTOBUF}"
        raise ApiError(415, "UnsupportedMediaType", msg)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _protobuf_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """Decode one protobuf message into (field number, varint or bytes) pairs."""
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
            value, pos = data[pos : pos + length], pos + length
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, pos = data[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        fields.append((number, value))
    return fields


def _token_request_from_protobuf(body: bytes) -> dict[str, Any]:
    """Read the spec of a protobuf TokenRequest (kubectl's typed client sends protobuf, not JSON).

    The envelope is ``k8s\\0`` + runtime.Unknown{1: TypeMeta, 2: raw}; in the raw TokenRequest field 2 is
    the spec, whose field 1 holds the audiences and field 4 expirationSeconds (k8s.io/api generated.proto).
    """
    try:
        if not body.startswith(b"k8s\x00"):
            raise ValueError("not a Kubernetes protobuf envelope")
        raw = next(v for n, v in _protobuf_fields(body[4:]) if n == 2 and isinstance(v, bytes))
        spec_bytes = next((v for n, v in _protobuf_fields(raw) if n == 2 and isinstance(v, bytes)), b"")
        spec: dict[str, Any] = {}
        for number, value in _protobuf_fields(spec_bytes):
            if number == 1 and isinstance(value, bytes):
                spec.setdefault("audiences", []).append(value.decode())
            elif number == 4 and isinstance(value, int):
                spec["expirationSeconds"] = value
    except (ValueError, IndexError, StopIteration, UnicodeDecodeError) as exc:
        raise _bad_request(f"cannot decode the protobuf TokenRequest: {exc}") from None
    return {"spec": spec}


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
