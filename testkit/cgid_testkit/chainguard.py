"""An emulator of the Chainguard API, its STS and the registry's repository listing (tests and sandbox).

One aiohttp server on loopback answers the IAM v2 paths, ``/sts/exchange`` and ``/registry/v1/repos``
the way ``chainguard-api.md`` describes them (grpc-gateway wire conventions, error bodies, HTTP
statuses), so ``api_url`` and ``sts_url`` are the same address. The state is plain dictionaries of the
wire objects the API returns (``identities``, ``role_bindings``, ``groups``, ``roles``, ``repos``), which
tests seed through ``add_*``/``bind`` and inspect or edit directly. Nothing the contract lets us do for
real is faked: API tokens are RS256 JWTs signed by the emulator's own key and checked on every call;
authorization follows the caller's role bindings on the target group or any ancestor; the STS verifies
a presented token against a static identity's registered ``issuerKeys``, or for a ``claimMatch``
identity against the keys it fetches from the issuer's discovery document, reached through
``issuer_routes`` (the tests' DNS). Everything time-based reads the injected ``clock`` so tests can
fast-forward. A token from :meth:`ChainguardEmulator.mint_api_token` whose subject is not an identity
belongs to a *root admin* allowed everything: that is how a test bootstraps without seeding bindings.

What the contract marks *unknown* is a constructor switch, and its default is the strict reading: a
static identity's ``expirationTime`` may be at most 365 days after its creation (the v2 protos'
"Defaults to / Maximum of 365 days after creation"), an update past that answers 400
FailedPrecondition, and ``expiry_overrun="clamp"`` models a server that silently stores the limit
instead. Failures are injected through ``faults`` (a :class:`FaultInjector`). Besides failures
*before* the handler (an error status, 429 with ``Retry-After``, a slow answer, a 403 while
permissions propagate), a fault may strike *after* the handler committed — the answer replaced by a
500/502/504, the connection dropped, or the answer held past the client's timeout — because that is
the case a client must never answer by re-sending a write. A seeded ``faults.policy`` decides per
request for randomized tests, ``faults.injected`` records what was injected, and
:meth:`ChainguardEmulator.writes` counts the mutations that were committed, so a test can prove that
nothing was applied twice.

Role bindings are answered with the flat ``identityUid``/``roleUid`` the protos define beside the
hydrated ``identity`` (uid, name, description, subject, issuer, email — never keys), ``group`` and
``role``. They are kept in a :class:`RoleBindingStore`, which indexes them by identity so that an
authorization check reads only the caller's bindings instead of every binding (at a thousand
identities that scan made every request quadratic); the index follows direct edits of the store.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import json
import logging
import re
import secrets
import ssl
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeGuard, get_args
from urllib.parse import urlsplit

import aiohttp
import jwt
from aiohttp import web
from aiohttp.typedefs import Handler
from cryptography.hazmat.primitives.asymmetric import rsa
from multidict import MultiDict, MultiMapping

from chainguard_identity_operator.chainguard.types import DEFAULT_AUDIENCE, format_time, parse_time

logger = logging.getLogger(__name__)

API_AUDIENCE = "https://console-api.enforce.dev"
STS_ISSUER = "https://issuer.enforce.dev"
EXCHANGED_TOKEN_LIFETIME = datetime.timedelta(hours=1)
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
NBF_LEEWAY = datetime.timedelta(minutes=5)  # go-oidc's allowance for a "not before" in the future

UIDP_RE = re.compile(r"^[0-9a-f]{40}(/[0-9a-f]{16})*$")
NAME_RE = re.compile(r"^[a-z0-9 ._-]{1,}$")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

# gRPC codes the emulator answers with, and the grpc-gateway's mapping to HTTP statuses.
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
ALREADY_EXISTS = 6
PERMISSION_DENIED = 7
FAILED_PRECONDITION = 9
UNIMPLEMENTED = 12
INTERNAL = 13
UNAUTHENTICATED = 16
HTTP_STATUS_FOR_CODE: Mapping[int, int] = {
    2: 500,
    3: 400,
    4: 504,
    5: 404,
    6: 409,
    7: 403,
    8: 429,
    9: 400,
    10: 409,
    11: 400,
    12: 501,
    13: 500,
    14: 503,
    16: 401,
}
CODE_FOR_HTTP_STATUS: Mapping[int, int] = {
    400: 3,
    401: 16,
    403: 7,
    404: 5,
    405: 12,
    409: 10,
    429: 8,
    500: 13,
    501: 12,
    502: 14,
    503: 14,
    504: 4,
}

# Capabilities, by the dotted names chainctl shows. Built-in roles are sets of them; a custom role's
# capabilities are whatever the test gives (unknown names simply grant nothing).
IAM_READ = ("identity.list", "role_bindings.list", "roles.list", "groups.list")
IAM_WRITE = (
    "identity.create",
    "identity.update",
    "identity.delete",
    "role_bindings.create",
    "role_bindings.delete",
)
REGISTRY_READ = ("repo.list", "registry.pull")
OWNER_ONLY = ("registry.push", "apk.list", "apk.pull", "groups.create", "groups.update", "groups.delete")
BUILTIN_ROLES: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "owner": ("Full access to the group", IAM_READ + IAM_WRITE + REGISTRY_READ + OWNER_ONLY),
    "editor": ("Read and write identities and role bindings", IAM_READ + IAM_WRITE + REGISTRY_READ),
    "viewer": ("Read-only access", (*IAM_READ, "repo.list")),
    "registry.pull": ("Pull images from the registry", REGISTRY_READ),
    "registry.push": ("Push and pull images", (*REGISTRY_READ, "registry.push")),
    "registry.pull_token_creator": (
        "Create pull tokens",
        ("identity.create", "identity.list", "role_bindings.create", "roles.list", *REGISTRY_READ),
    ),
    "apk.pull": ("Pull APKs", ("apk.list", "apk.pull")),
}

# Identity fields by their JSON names; requests may also use the proto (snake_case) names.
IDENTITY_FIELDS = ("name", "description", "claimMatch", "staticKeys", "awsIdentity", "servicePrincipal")
IDENTITY_KINDS = ("claimMatch", "staticKeys", "awsIdentity", "servicePrincipal")  # one oneof
CLAIM_MATCH_FIELDS = (
    "issuer",
    "issuerPattern",
    "subject",
    "subjectPattern",
    "audience",
    "audiencePattern",
    "claims",
    "claimPatterns",
)
CLAIM_MATCH_ONEOFS = (
    ("issuer", "issuerPattern"),
    ("subject", "subjectPattern"),
    ("audience", "audiencePattern"),
)
STATIC_KEYS_FIELDS = ("issuer", "subject", "issuerKeys", "expirationTime", "audiences")
NESTED_FIELDS: Mapping[str, tuple[str, ...]] = {
    "claimMatch": CLAIM_MATCH_FIELDS,
    "staticKeys": STATIC_KEYS_FIELDS,
}

# Signature only: PyJWT checks exp/nbf/iat against the real time, the emulator against its clock.
_SIGNATURE_ONLY: jwt.types.Options = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
}
_SUBJECT = web.RequestKey("subject", str)
_DROPPED = web.RequestKey("dropped", bool)

Lose = Literal["status", "drop", "hold"]
ExpiryOverrun = Literal["refuse", "clamp"]


class ApiError(Exception):
    """An error answer in the gateway's format ``{"code", "message", "details"}`` with its HTTP status."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else HTTP_STATUS_FOR_CODE.get(code, 500)
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        body = {"code": self.code, "message": self.message, "details": []}
        return web.json_response(body, status=self.status, headers=self.headers)


def _invalid(message: str) -> ApiError:
    return ApiError(INVALID_ARGUMENT, message)


def _refuse(message: str) -> ApiError:
    """An STS refusal: every failed verification is 403 PermissionDenied."""
    return ApiError(PERMISSION_DENIED, message)


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """One request the emulator answered (faults included), for asserting API call counts."""

    method: str
    path: str
    query: Mapping[str, tuple[str, ...]]
    status: int
    subject: str = ""  # the ``sub`` of a verified API token; "" for STS calls and rejected tokens


@dataclasses.dataclass(frozen=True)
class ExchangeRecord:
    """One STS exchange: never the presented token, only what was asked and how it ended."""

    identity: str
    audiences: tuple[str, ...]
    status: int
    message: str  # "" on success, else the refusal


@dataclasses.dataclass(kw_only=True)
class Fault:
    """A failure to inject into the next ``remaining`` requests matching ``method`` and ``path``.

    Before the handler (``after_commit=False``): the request is held ``delay`` seconds if given, then
    answered ``status`` with a gateway error body (``grpc_code`` defaults from the status, a
    ``Retry-After`` header when ``retry_after`` is given), or, for a ``status`` below 400, served
    normally (it was only slow); ``lose="drop"`` closes the connection instead of answering. After
    the handler (``after_commit=True``) the real handler runs and commits, then its answer is lost:
    ``lose="status"`` answers the error ``status`` instead (500, 502, 504: what a gateway or load
    balancer says when it gave up), ``"drop"`` closes the connection without an answer, ``"hold"``
    holds the answer ``delay`` seconds (more than the client's timeout). Build one for
    ``faults.policy`` as ``Fault(status=503)`` or ``Fault(after_commit=True, lose="drop")``.
    """

    status: int = 0
    method: str = "*"
    path: re.Pattern[str] = dataclasses.field(default_factory=lambda: re.compile(""))
    remaining: int = 1
    retry_after: float | None = None
    delay: float | None = None
    grpc_code: int | None = None
    after_commit: bool = False
    lose: Lose = "status"
    hits: int = 0

    def __post_init__(self) -> None:
        if self.lose not in get_args(Lose):
            raise ValueError(f"lose must be one of {', '.join(get_args(Lose))}, not {self.lose!r}")
        if self.remaining < 1:
            raise ValueError("times must be at least 1")
        if self.lose == "hold" and not self.after_commit:
            raise ValueError('lose="hold" holds a committed answer: use delay for a slow request')
        if self.lose == "hold" and not self.delay:
            raise ValueError('lose="hold" needs a delay (seconds, more than the client timeout)')
        if self.lose == "status" and self.after_commit and not 400 <= self.status <= 599:
            raise ValueError("status: a lost answer is replaced by an error status (500, 502, 504)")
        if self.lose == "status" and not self.after_commit and self.status <= 0:
            raise ValueError("status is required for a fault before the handler")

    @property
    def kind(self) -> str:
        """What the client gets: ``status`` (an error answer), ``slow``, ``drop`` or ``hold``."""
        if self.lose != "status":
            return self.lose
        return "status" if self.status >= 400 else "slow"

    def matches(self, method: str, path: str) -> bool:
        return self.method in ("*", method.upper()) and self.path.search(path) is not None


@dataclasses.dataclass(frozen=True)
class InjectedFault:
    """One fault that struck a request: ``kind`` is ``status``, ``slow``, ``drop``, ``hold`` or
    ``propagation`` (a 403 of ``forbid_fresh``); ``status`` what was answered (0 for none)."""

    kind: str
    method: str
    path: str
    status: int
    after_commit: bool


FaultPolicy = Callable[[str, str], Fault | None]


class FaultInjector:
    """Failures to inject: pending ones in the order added, then a policy, then propagation delays.

    ``add`` queues a :class:`Fault` for the next ``times`` requests whose method matches (``"*"`` for
    any) and whose path (without the query) matches ``path_regex`` (``re.search``); see
    :class:`Fault` for the other options. ``policy``, when set, is asked ``policy(method, path)`` for
    every request no pending fault matches and may return a :class:`Fault` for that request alone —
    a randomized test passes a function drawing from its own ``random.Random(seed)``.
    ``forbid_fresh`` models permissions propagating after a create: creating a role binding for an
    identity created through the API answers 403 for its first ``requests`` attempts and while the
    identity is younger than ``seconds`` by the emulator's clock; and creating an identity answers
    403 for the first ``identity_creates`` attempts under each parent group (a group just made),
    before anything is stored. ``hide_from_listings`` leaves identities out of listings while GET
    still finds them (a paged listing that skipped them). ``injected`` lists every fault that struck,
    for a test to report or check; ``clear`` stops all injection but keeps that history.
    """

    def __init__(self) -> None:
        self.pending: list[Fault] = []
        self.policy: FaultPolicy | None = None
        self.injected: list[InjectedFault] = []
        self.fresh_requests = 0
        self.fresh_seconds = 0.0
        self.fresh_identity_creates = 0
        self.create_attempts: collections.Counter[str] = collections.Counter()  # by parent group
        self.hidden: set[str] = set()  # identity UIDPs that listings leave out; a GET still finds them

    def hide_from_listings(self, *uids: str) -> None:
        """Leave these identities out of every listing (plain and by name) while GET still answers them:
        what an offset-paged listing read while others delete does to a live object it skips, or an
        eventually consistent index that has not caught up."""
        self.hidden.update(uids)

    def add(
        self,
        method: str,
        path_regex: str,
        *,
        status: int | None = None,
        times: int = 1,
        retry_after: float | None = None,
        delay: float | None = None,
        grpc_code: int | None = None,
        after_commit: bool = False,
        lose: Lose = "status",
    ) -> Fault:
        if times < 1:
            raise ValueError("times must be at least 1")
        fault = Fault(
            method=method.upper(),
            path=re.compile(path_regex),
            status=status or 0,
            remaining=times,
            retry_after=retry_after,
            delay=delay,
            grpc_code=grpc_code,
            after_commit=after_commit,
            lose=lose,
        )
        self.pending.append(fault)
        return fault

    def forbid_fresh(self, *, requests: int = 0, seconds: float = 0.0, identity_creates: int = 0) -> None:
        self.fresh_requests = requests
        self.fresh_seconds = seconds
        self.fresh_identity_creates = identity_creates
        self.create_attempts.clear()

    def clear(self) -> None:
        self.pending.clear()
        self.policy = None
        self.fresh_requests = 0
        self.fresh_seconds = 0.0
        self.fresh_identity_creates = 0
        self.create_attempts.clear()
        self.hidden.clear()

    def take(self, method: str, path: str) -> Fault | None:
        """The fault for this request (a pending one, counted as used, else the policy's), recorded."""
        chosen: Fault | None = None
        for fault in self.pending:
            if fault.matches(method, path):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.pending.remove(fault)
                chosen = fault
                break
        else:
            if self.policy is not None:
                chosen = self.policy(method.upper(), path)
        if chosen is not None:
            chosen.hits += 1
            answered = chosen.status if chosen.kind == "status" else 0
            self.record(chosen.kind, method, path, answered, after_commit=chosen.after_commit)
        return chosen

    def record(self, kind: str, method: str, path: str, status: int, *, after_commit: bool = False) -> None:
        self.injected.append(InjectedFault(kind, method.upper(), path, status, after_commit))


def _binding_ref(binding: Mapping[str, Any], flat: str, nested: str) -> str:
    """A role binding's identity or role UID: the flat field first, then the nested object's."""
    value = binding.get(flat)
    if isinstance(value, str) and value:
        return value
    inner = binding.get(nested)
    uid = inner.get("uid") if isinstance(inner, Mapping) else None
    return uid if isinstance(uid, str) else ""


def _binding_identity(binding: Mapping[str, Any]) -> str:
    return _binding_ref(binding, "identityUid", "identity")


def _binding_role(binding: Mapping[str, Any]) -> str:
    return _binding_ref(binding, "roleUid", "role")


def _binding_group(binding: Mapping[str, Any]) -> str:
    """The group of a binding: the nested ``group.uid``, else the parent of its UIDP (no flat field)."""
    inner = binding.get("group")
    uid = inner.get("uid") if isinstance(inner, Mapping) else None
    if isinstance(uid, str) and uid:
        return uid
    return _parent_of(str(binding.get("uid", "")))


class RoleBindingStore(MutableMapping[str, dict[str, Any]]):
    """The emulator's role bindings by UIDP (wire form), with an index by identity.

    A mapping like a dict; every way of adding, replacing or removing a binding keeps the index
    right, so tests may edit the store directly. :meth:`uids_of` answers from the index, in the
    store's order, and skips (and re-files) a binding whose identity was edited in place since.
    Editing a binding in place to point *to* an identity is not seen: replace the binding instead.
    """

    def __init__(self, bindings: Mapping[str, dict[str, Any]] | None = None) -> None:
        self._data: dict[str, dict[str, Any]] = {}
        self._order: dict[str, int] = {}  # key -> when it was first stored, for the store's order
        self._next = 0
        self._by_identity: dict[str, set[str]] = {}
        if bindings:
            self.update(bindings)

    def __getitem__(self, key: str) -> dict[str, Any]:
        return self._data[key]

    def __setitem__(self, key: str, binding: dict[str, Any]) -> None:
        if key in self._data:
            self._unindex(key)
        else:
            self._order[key] = self._next
            self._next += 1
        self._data[key] = binding
        self._by_identity.setdefault(_binding_identity(binding), set()).add(key)

    def __delitem__(self, key: str) -> None:
        self._unindex(key)
        del self._data[key]
        del self._order[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __repr__(self) -> str:
        return f"RoleBindingStore({self._data!r})"

    def clear(self) -> None:
        self._data.clear()
        self._order.clear()
        self._by_identity.clear()

    def uids_of(self, identity_uid: str) -> list[str]:
        """The keys of the bindings of ``identity_uid``, without looking at anybody else's."""
        keys = self._by_identity.get(identity_uid, set())
        moved = [key for key in keys if _binding_identity(self._data[key]) != identity_uid]
        for key in moved:  # edited in place since it was stored: file it where it belongs now
            self._unindex(key, identity_uid)
            self._by_identity.setdefault(_binding_identity(self._data[key]), set()).add(key)
        return sorted(keys, key=self._order.__getitem__)

    def _unindex(self, key: str, identity_uid: str | None = None) -> None:
        if identity_uid is None:
            identity_uid = _binding_identity(self._data[key])
        keys = self._by_identity.get(identity_uid)
        if keys is None or key not in keys:
            # Edited in place: find it wherever it was filed.
            keys = next((found for found in self._by_identity.values() if key in found), None)
            if keys is None:
                return
        keys.discard(key)


@dataclasses.dataclass
class _Caller:
    subject: str
    root: bool


@dataclasses.dataclass
class _Fresh:
    created: datetime.datetime
    attempts: int = 0


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class ChainguardEmulator:
    """The Chainguard API, STS and registry listing on one loopback port; see the module docstring.

    Switches for what the contract leaves unknown, strict by default: ``max_static_lifetime``
    (default 365 days) bounds a static identity's ``expirationTime``, counted from its ``createTime``
    (``max_lifetime_from_creation=True``: an update past it answers 400 FailedPrecondition) or, with
    ``max_lifetime_from_creation=False``, from *now* (the lenient reading: an update may always
    extend). ``expiry_overrun="clamp"`` makes the server store the limit instead of refusing an
    expiration past it, answering 200 with the clamped value, as a server that silently shortens
    would; ``"refuse"`` (the default) answers the error. An expiration left out defaults to the
    maximum, as the v2 protos say. ``cascade_deletes`` makes deleting an identity delete its role
    bindings; off by default, so tests prove the operator removes its bindings itself.
    ``signing_key`` (RSA) signs the tokens the emulator mints; a fresh one is made when not given
    (pass one to save the ~0.1 s). ``issuer_ssl`` is what the STS trusts when it fetches an issuer's
    discovery document and JWKS over https (a real API server's own CA); None: the system's CAs.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], datetime.datetime] | None = None,
        max_static_lifetime: datetime.timedelta = datetime.timedelta(days=365),
        max_lifetime_from_creation: bool = True,
        expiry_overrun: ExpiryOverrun = "refuse",
        issuer_routes: Mapping[str, str] | None = None,
        cascade_deletes: bool = False,
        signing_key: rsa.RSAPrivateKey | None = None,
        issuer_ssl: ssl.SSLContext | None = None,
    ) -> None:
        if expiry_overrun not in get_args(ExpiryOverrun):
            raise ValueError(f"expiry_overrun must be 'refuse' or 'clamp', not {expiry_overrun!r}")
        self._clock = clock or _utcnow
        self.max_static_lifetime = max_static_lifetime
        self.max_lifetime_from_creation = max_lifetime_from_creation
        self.expiry_overrun: ExpiryOverrun = expiry_overrun
        self.cascade_deletes = cascade_deletes
        self.issuer_routes: dict[str, str] = dict(issuer_routes or {})
        self.issuer_ssl = issuer_ssl
        self.identities: dict[str, dict[str, Any]] = {}
        self._role_bindings = RoleBindingStore()
        self.groups: dict[str, dict[str, Any]] = {}
        self.roles: dict[str, dict[str, Any]] = {}
        self.repos: dict[str, list[dict[str, Any]]] = {}  # group UIDP -> [{"id", "name"}]
        self.requests: list[RecordedRequest] = []
        self.exchanges: list[ExchangeRecord] = []
        self.faults = FaultInjector()
        self._root_subjects: set[str] = set()
        self._fresh: dict[str, _Fresh] = {}  # identities created through the API, for forbid_fresh
        self._writes: collections.Counter[str] = collections.Counter()
        self._key = signing_key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._kid = secrets.token_hex(8)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stopping = asyncio.Event()
        self._url = ""
        for name, (description, capabilities) in BUILTIN_ROLES.items():
            # Built-in roles are fixed root UIDPs in Chainguard; derive ours from the name so they are
            # the same in every run.
            uid = hashlib.sha256(f"chainguard-emulator/role/{name}".encode()).hexdigest()[:40]
            self.roles[uid] = {
                "uid": uid,
                "name": name,
                "description": description,
                "capabilities": list(capabilities),
            }

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Serve on ``host:port`` (0: any free port) in the running event loop."""
        if self._runner is not None:
            raise RuntimeError("the Chainguard emulator is already running")
        self._stopping = asyncio.Event()
        app = web.Application(middlewares=[self._middleware])
        self._add_routes(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        bound_port = runner.addresses[0][1]
        self._runner = runner
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        self._url = f"http://[{host}]:{bound_port}" if ":" in host else f"http://{host}:{bound_port}"
        logger.debug("Chainguard emulator listening on %s", self._url)

    async def stop(self) -> None:
        """Stop serving; requests held by a ``delay`` fault are released at once."""
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> ChainguardEmulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        if not self._url:
            raise RuntimeError("the Chainguard emulator is not started")
        return self._url

    @property
    def api_url(self) -> str:
        return self.url

    @property
    def sts_url(self) -> str:
        return self.url

    # -- seeding and inspection ---------------------------------------------------------------------

    @property
    def role_bindings(self) -> RoleBindingStore:
        """The role bindings by UIDP, in wire form; edit freely (assigning a plain dict works too)."""
        return self._role_bindings

    @role_bindings.setter
    def role_bindings(self, bindings: Mapping[str, dict[str, Any]]) -> None:
        self._role_bindings = (
            bindings if isinstance(bindings, RoleBindingStore) else RoleBindingStore(bindings)
        )

    def writes(self) -> dict[str, int]:
        """The mutations committed through the API, by kind (``identity.create``, ``identity.update``,
        ``identity.delete``, ``role_binding.create``, ``role_binding.delete``); seeding is not counted.
        A write whose answer a fault lost is counted: it was committed."""
        return dict(self._writes)

    def add_group(
        self, name: str, *, verified: bool = True, parent: str | None = None, description: str = ""
    ) -> str:
        """Add an organization (``parent=None``, a 40-hex root) or a folder under ``parent``; its UIDP."""
        if parent is not None and parent not in self.groups:
            raise KeyError(f"no group {parent}")
        uid = self._new_uid(parent)
        now = format_time(self._clock())
        self.groups[uid] = {
            "uid": uid,
            "name": name,
            "description": description,
            "verified": verified,
            "createTime": now,
            "updateTime": now,
        }
        return uid

    def add_repo(self, group_uid: str, name: str) -> None:
        if group_uid not in self.groups:
            raise KeyError(f"no group {group_uid}")
        self.repos.setdefault(group_uid, []).append({"id": self._new_uid(group_uid), "name": name})

    def builtin_role_uid(self, name: str) -> str:
        for uid, role in self.roles.items():
            if "/" not in uid and role["name"] == name:
                return uid
        raise KeyError(f"no built-in role {name!r}")

    def add_custom_role(self, group_uid: str, name: str, capabilities: Sequence[str]) -> str:
        """Add a role defined in ``group_uid`` (it may share a built-in role's name); its UIDP."""
        if group_uid not in self.groups:
            raise KeyError(f"no group {group_uid}")
        uid = self._new_uid(group_uid)
        self.roles[uid] = {"uid": uid, "name": name, "description": "", "capabilities": list(capabilities)}
        return uid

    def add_identity(self, parent: str, body: Mapping[str, Any]) -> str:
        """Store an identity as if created earlier (e.g. the operator's own); its UIDP.

        The body is validated like a create (``ValueError`` with the API's message) except for the
        expiration bounds, so a test may seed an identity that has already expired.
        """
        if parent not in self.groups:
            raise KeyError(f"no group {parent}")
        try:
            stored = self._validate_identity(_canonical_identity(body))
        except ApiError as error:
            raise ValueError(error.message) from None
        return self._store_identity(parent, stored)

    def add_operator_identity(
        self,
        parent: str,
        *,
        issuer: str,
        subject: str,
        jwks: Mapping[str, Any] | str,
        expires: datetime.datetime,
        name: str = "chainguard-identity-operator",
        description: str = "the operator's own identity (bootstrap)",
    ) -> str:
        """The private-cluster bootstrap of the README: the operator's own static identity, made by hand
        from the cluster's JWKS and bound as ``owner`` in ``parent``; its UIDP."""
        identity = self.add_identity(
            parent,
            {
                "name": name,
                "description": description,
                "staticKeys": {
                    "issuer": issuer,
                    "subject": subject,
                    "issuerKeys": jwks if isinstance(jwks, str) else json.dumps(jwks),
                    "expirationTime": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                },
            },
        )
        self.bind(identity, parent, "owner")
        return identity

    def bind(self, identity_uid: str, group_uid: str, role_name_or_uid: str) -> str:
        """Bind a role (built-in name, custom role name in the group's tree, or UIDP); the binding UIDP."""
        if identity_uid not in self.identities:
            raise KeyError(f"no identity {identity_uid}")
        if group_uid not in self.groups:
            raise KeyError(f"no group {group_uid}")
        return self._store_binding(group_uid, identity_uid, self._resolve_role(role_name_or_uid, group_uid))

    def mint_api_token(
        self,
        subject: str,
        *,
        audience: str = API_AUDIENCE,
        lifetime: datetime.timedelta = datetime.timedelta(hours=1),
    ) -> str:
        """A Chainguard token as the STS would mint it. A subject that is not an identity is a root admin."""
        if subject not in self.identities:
            self._root_subjects.add(subject)
        now = self._clock()
        return self._sign(
            {
                "iss": STS_ISSUER,
                "sub": subject,
                "aud": audience,
                "iat": int(now.timestamp()),
                "exp": int((now + lifetime).timestamp()),
            }
        )

    def jwks(self) -> dict[str, Any]:
        """The public key the emulator signs its tokens with, as a JWKS (to verify them in tests)."""
        key = jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        return {"keys": [{**key, "kid": self._kid, "alg": "RS256", "use": "sig"}]}

    def now(self) -> datetime.datetime:
        """The emulator's clock: what its tokens' ``iat``/``exp`` and its expiry checks read."""
        return self._clock()

    def can(self, subject: str, capability: str, group: str) -> bool:
        """Whether ``subject`` (an identity, or a root admin of :meth:`mint_api_token`) holds
        ``capability`` on ``group`` through a role bound there or on an ancestor."""
        return self._can(_Caller(subject=subject, root=subject in self._root_subjects), capability, group)

    # -- plumbing -------------------------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        router = app.router
        router.add_get("/iam/v2/identities", self._list_identities)
        router.add_post("/iam/v2/identities/{uidp:.+}", self._create_identity)
        router.add_get("/iam/v2/identities/{uidp:.+}", self._get_identity)
        router.add_patch("/iam/v2/identities/{uidp:.+}", self._update_identity)
        router.add_delete("/iam/v2/identities/{uidp:.+}", self._delete_identity)
        router.add_get("/iam/v2/roles", self._list_roles)
        router.add_get("/iam/v2/groups", self._list_groups)
        router.add_get("/iam/v2/roleBindings", self._list_role_bindings)
        router.add_post("/iam/v2/roleBindings/{uidp:.+}", self._create_role_binding)
        router.add_delete("/iam/v2/roleBindings/{uidp:.+}", self._delete_role_binding)
        router.add_get("/registry/v1/repos", self._list_repos)
        router.add_get("/sts/exchange", self._exchange)
        router.add_post("/sts/exchange", self._exchange)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Inject faults, turn errors into gateway error bodies, record every request."""
        fault = self.faults.take(request.method, request.path)
        if fault is None:
            response = await self._answer(request, handler)
        elif fault.after_commit:
            response = await self._lose(fault, request, await self._answer(request, handler))
        else:
            response = await self._inject(fault, request, handler)
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                query={key: tuple(request.query.getall(key)) for key in request.query},
                status=0 if request.get(_DROPPED, False) else response.status,
                subject=request.get(_SUBJECT, ""),
            )
        )
        logger.debug("Chainguard emulator: %s %s -> %d", request.method, request.path, response.status)
        return response

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The handler's answer, its errors as gateway error bodies."""
        try:
            return await handler(request)
        except ApiError as error:
            return error.response()
        except web.HTTPException as error:
            code = CODE_FOR_HTTP_STATUS.get(error.status, UNKNOWN)
            return ApiError(code, error.reason, status=error.status).response()
        except Exception:
            logger.exception("Chainguard emulator failed on %s %s", request.method, request.path)
            return ApiError(INTERNAL, "internal error in the emulator").response()

    async def _hold(self, seconds: float | None) -> None:
        # Wait on the stop event rather than plain sleeping, so stop() never waits for a fault.
        if seconds:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), seconds)

    @staticmethod
    def _drop(request: web.Request) -> None:
        """Close the connection: the client gets no answer at all."""
        request[_DROPPED] = True
        if request.transport is not None:
            request.transport.close()

    def _fault_response(self, fault: Fault, *, message: str) -> web.Response:
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = _seconds(fault.retry_after)
        code = (
            fault.grpc_code
            if fault.grpc_code is not None
            else CODE_FOR_HTTP_STATUS.get(fault.status, UNKNOWN)
        )
        return ApiError(code, message, status=fault.status, headers=headers).response()

    async def _inject(self, fault: Fault, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A fault before the handler: nothing is done, whatever the client is told."""
        await self._hold(fault.delay)
        if fault.lose == "drop":
            self._drop(request)
            return web.Response(status=204)  # never sent
        if fault.status < 400:
            return await self._answer(request, handler)
        return self._fault_response(fault, message=f"injected fault (HTTP {fault.status})")

    async def _lose(
        self, fault: Fault, request: web.Request, committed: web.StreamResponse
    ) -> web.StreamResponse:
        """A fault after the handler: what it did stays done, its answer never reaches the client."""
        if fault.lose == "drop":
            self._drop(request)
            return committed
        if fault.lose == "hold":
            await self._hold(fault.delay)
            return committed
        return self._fault_response(fault, message=f"upstream answer lost (HTTP {fault.status})")

    def _caller(self, request: web.Request) -> _Caller:
        """Authenticate an API call: a token this emulator minted, for the API audience, not expired."""
        token = _bearer(request)
        if token is None:
            raise ApiError(UNAUTHENTICATED, "missing bearer token")
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, self._key.public_key(), algorithms=["RS256"], options=_SIGNATURE_ONLY)
        except jwt.PyJWTError:
            raise ApiError(UNAUTHENTICATED, "invalid token: not signed by this issuer") from None
        if header.get("kid") != self._kid or claims.get("iss") != STS_ISSUER:
            raise ApiError(UNAUTHENTICATED, "invalid token: not issued by this issuer")
        if API_AUDIENCE not in _audiences(claims):
            raise ApiError(UNAUTHENTICATED, f"invalid token: audience is not {API_AUDIENCE}")
        if not _unexpired(claims, self._clock()):
            raise ApiError(UNAUTHENTICATED, "invalid token: token is expired")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise ApiError(UNAUTHENTICATED, "invalid token: no subject")
        request[_SUBJECT] = subject
        return _Caller(subject=subject, root=subject in self._root_subjects)

    def _can(self, caller: _Caller, capability: str, group: str) -> bool:
        """Whether a role bound to the caller on ``group`` or an ancestor grants ``capability``."""
        if caller.root:
            return True
        for key in self.role_bindings.uids_of(caller.subject):  # the caller's only: see RoleBindingStore
            binding = self.role_bindings[key]
            if not _within(group, _binding_group(binding)):
                continue
            role = self.roles.get(_binding_role(binding))
            if role is not None and capability in role["capabilities"]:
                return True
        return False

    def _require(self, caller: _Caller, capability: str, group: str) -> None:
        if not self._can(caller, capability, group):
            raise ApiError(PERMISSION_DENIED, f"permission denied: {capability} on {group}")

    def _new_uid(self, parent: str | None) -> str:
        while True:
            uid = f"{parent}/{secrets.token_hex(8)}" if parent else secrets.token_hex(20)
            taken = (self.groups, self.identities, self.roles, self.role_bindings)
            if not any(uid in store for store in taken):
                return uid

    def _sign(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(dict(claims), self._key, algorithm="RS256", headers={"kid": self._kid})

    def _resolve_role(self, name_or_uid: str, group: str) -> str:
        if name_or_uid in self.roles:
            return name_or_uid
        with contextlib.suppress(KeyError):
            return self.builtin_role_uid(name_or_uid)
        for uid, role in self.roles.items():
            if "/" in uid and role["name"] == name_or_uid and _within(group, _parent_of(uid)):
                return uid
        raise KeyError(f"no role {name_or_uid!r} in {group}")

    # -- identities -----------------------------------------------------------------------------------

    def _validate_identity(
        self, identity: Mapping[str, Any], *, created: datetime.datetime | None = None
    ) -> dict[str, Any]:
        """Check a canonical identity against the contract; its stored form, zero values filled in.

        ``created`` is the identity's ``createTime`` for an update (``None``: being created now).
        """
        name = identity.get("name", "")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or not 3 <= len(name) <= 63:
            raise _invalid("name: must match ^[a-z0-9 ._-]{1,}$ and be 3 to 63 characters long")
        description = identity.get("description", "")
        if not isinstance(description, str):
            raise _invalid("description: must be a string")
        if any(char in description for char in "\n\r\t"):
            raise _invalid("description: must not contain newlines or tabs")
        if len(description) > 512:
            raise _invalid("description: must be at most 512 characters long")
        kinds = [kind for kind in IDENTITY_KINDS if kind in identity]
        if len(kinds) > 1:
            raise _invalid(f"identity: only one of {', '.join(map(_snake, kinds))} may be set")
        if not kinds:
            raise _invalid("identity: one of claim_match or static_keys is required")
        kind = kinds[0]
        stored: dict[str, Any] = {"name": name, "description": description}
        if kind == "claimMatch":
            stored[kind] = _validate_claim_match(identity[kind])
        elif kind == "staticKeys":
            stored[kind] = self._validate_static_keys(identity[kind], created=created)
        else:
            stored[kind] = copy.deepcopy(identity[kind])  # not used by the operator: kept as sent
        return stored

    def _validate_static_keys(
        self, static: Mapping[str, Any], *, created: datetime.datetime | None
    ) -> dict[str, Any]:
        stored: dict[str, Any] = {}
        for key in ("issuer", "subject", "issuerKeys"):
            value = static.get(key)
            if not isinstance(value, str) or not value:
                raise _invalid(f"static_keys.{_snake(key)}: is required")
            stored[key] = value
        _check_public_jwks(stored["issuerKeys"])
        expiration = static.get("expirationTime")
        if expiration is None:
            # v2: "Defaults to / Maximum of 365 days after creation".
            expires = (created or self._clock()) + self.max_static_lifetime
        else:
            try:
                parsed = parse_time(expiration) if isinstance(expiration, str) else None
            except ValueError:
                parsed = None
            if parsed is None:
                raise _invalid("static_keys.expiration_time: must be an RFC 3339 timestamp")
            expires = parsed
        stored["expirationTime"] = format_time(expires)
        audiences = static.get("audiences", [])
        if not isinstance(audiences, list) or not all(isinstance(a, str) and a for a in audiences):
            raise _invalid("static_keys.audiences: must be a list of non-empty strings")
        if len(audiences) > 1:
            raise _invalid("static_keys.audiences: at most one audience may be set")
        stored["audiences"] = list(audiences)
        return stored

    def _bound_expiration(
        self, static: Mapping[str, Any], *, created: datetime.datetime | None
    ) -> dict[str, Any]:
        """The lifetime rules for an ``expirationTime`` being set, on create (``created=None``) or
        update; the static keys to store — clamped to the limit under ``expiry_overrun="clamp"``."""
        expires = parse_time(static["expirationTime"])
        assert expires is not None  # validated before
        now = self._clock()
        maximum = _describe(self.max_static_lifetime)
        if expires <= now:
            raise _invalid("static_keys.expiration_time: must be in the future")
        from_creation = created is not None and self.max_lifetime_from_creation
        limit = ((created or now) if from_creation else now) + self.max_static_lifetime
        if expires <= limit:
            return dict(static)
        if self.expiry_overrun == "clamp":
            return {**static, "expirationTime": format_time(limit)}
        if from_creation:
            raise ApiError(
                FAILED_PRECONDITION,
                f"static_keys.expiration_time: may not be later than create_time + {maximum} "
                f"({format_time(limit)}); create a new identity instead",
            )
        raise _invalid(f"static_keys.expiration_time: must be at most {maximum} from now")

    def _store_identity(self, parent: str, stored: Mapping[str, Any]) -> str:
        uid = self._new_uid(parent)
        now = format_time(self._clock())
        self.identities[uid] = {
            "uid": uid,
            **copy.deepcopy(dict(stored)),
            "createTime": now,
            "updateTime": now,
            "lastSeenTime": None,
        }
        return uid

    async def _create_identity(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        parent = _path_uidp(request)
        self._require(caller, "identity.create", parent)
        if self._parent_still_propagating(parent):
            self.faults.record("propagation", request.method, request.path, 403)
            raise ApiError(PERMISSION_DENIED, f"permission denied: identity.create on {parent}")
        if parent not in self.groups:
            raise ApiError(NOT_FOUND, f"parent group {parent} not found")
        stored = self._validate_identity(_canonical_identity(await _json_object(request)))
        if "staticKeys" in stored:
            stored["staticKeys"] = self._bound_expiration(stored["staticKeys"], created=None)
        uid = self._store_identity(parent, stored)
        self._fresh[uid] = _Fresh(created=self._clock())
        self._writes["identity.create"] += 1
        return _json(self.identities[uid])

    def _parent_still_propagating(self, parent: str) -> bool:
        """``faults.forbid_fresh(identity_creates=N)``: the first N creates under each parent fail."""
        if self.faults.fresh_identity_creates <= 0:
            return False
        self.faults.create_attempts[parent] += 1
        return self.faults.create_attempts[parent] <= self.faults.fresh_identity_creates

    async def _get_identity(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        uid = _path_uidp(request)
        self._require(caller, "identity.list", _scope(uid))
        identity = self.identities.get(uid)
        if identity is None:
            raise ApiError(NOT_FOUND, f"identity {uid} not found")
        return _json(identity)

    async def _list_identities(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        query = request.query
        children_of = _query(query, "uidp.childrenOf")
        descendants_of = _query(query, "uidp.descendantsOf")
        name = _query(query, "name")
        for scope in (children_of, descendants_of):
            if scope:
                _check_uidp(scope, "uidp")
                self._require(caller, "identity.list", scope)
        matches = [
            identity
            for uid, identity in self.identities.items()
            if (not children_of or _parent_of(uid) == children_of)
            and (not descendants_of or (uid != descendants_of and _within(uid, descendants_of)))
            and (not name or identity.get("name") == name)
            and uid not in self.faults.hidden
            and self._can(caller, "identity.list", _scope(uid))
        ]
        page, next_token = _paginate(matches, query)
        return _json({"identities": page, "nextPageToken": next_token, "totalCount": str(len(matches))})

    async def _update_identity(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        uid = _path_uidp(request)
        self._require(caller, "identity.update", _scope(uid))
        current = self.identities.get(uid)
        if current is None:
            raise ApiError(NOT_FOUND, f"identity {uid} not found")
        patch = _canonical_identity(await _json_object(request))
        paths = _update_paths(request.query, patch)
        editable = {key: value for key, value in current.items() if key in IDENTITY_FIELDS}
        created = parse_time(current.get("createTime"))
        stored = self._validate_identity(_apply_mask(editable, patch, paths), created=created)
        sets_expiration = any(path in ("*", "staticKeys", "staticKeys.expirationTime") for path in paths)
        if "staticKeys" in stored and sets_expiration:
            stored["staticKeys"] = self._bound_expiration(stored["staticKeys"], created=created)
        updated = {
            "uid": uid,
            **stored,
            "createTime": current.get("createTime"),
            "updateTime": format_time(self._clock()),
            "lastSeenTime": current.get("lastSeenTime"),
        }
        self.identities[uid] = updated
        self._writes["identity.update"] += 1
        for key in self.role_bindings.uids_of(uid):
            self.role_bindings[key]["identity"] = _identity_view(updated)
        return _json(updated)

    async def _delete_identity(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        uid = _path_uidp(request)
        self._require(caller, "identity.delete", _scope(uid))
        if self.identities.pop(uid, None) is None:
            raise ApiError(NOT_FOUND, f"identity {uid} not found")
        self._fresh.pop(uid, None)
        self._writes["identity.delete"] += 1
        if self.cascade_deletes:
            for key in self.role_bindings.uids_of(uid):
                del self.role_bindings[key]
        return _json({})

    # -- roles, groups, role bindings --------------------------------------------------------------

    async def _list_roles(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        name = _query(request.query, "name")
        matches = [
            role
            for uid, role in self.roles.items()
            if (not name or role["name"] == name)
            and ("/" not in uid or self._can(caller, "roles.list", _parent_of(uid)))
        ]
        page, next_token = _paginate(matches, request.query)
        return _json({"roles": page, "nextPageToken": next_token})

    async def _list_groups(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        name = _query(request.query, "name")
        matches = [
            group
            for uid, group in self.groups.items()
            if (not name or group["name"] == name) and self._can(caller, "groups.list", uid)
        ]
        page, next_token = _paginate(matches, request.query)
        return _json({"groups": page, "nextPageToken": next_token})

    def _store_binding(self, group_uid: str, identity_uid: str, role_uid: str) -> str:
        """Store a binding in its wire form: the flat UIDs a create sets, and the hydrated views."""
        uid = self._new_uid(group_uid)
        group, role = self.groups[group_uid], self.roles[role_uid]
        self.role_bindings[uid] = {
            "uid": uid,
            "identity": _identity_view(self.identities[identity_uid]),
            "group": {key: group.get(key, "") for key in ("uid", "name", "description")},
            "role": {key: role.get(key, "") for key in ("uid", "name", "description")},
            "createTime": format_time(self._clock()),
            "identityUid": identity_uid,
            "roleUid": role_uid,
        }
        return uid

    def _still_propagating(self, identity_uid: str) -> bool:
        """``faults.forbid_fresh``: whether a new identity's permissions are still 'propagating'."""
        fresh = self._fresh.get(identity_uid)
        if fresh is None:
            return False
        fresh.attempts += 1
        if fresh.attempts <= self.faults.fresh_requests:
            return True
        age = self._clock() - fresh.created
        return age < datetime.timedelta(seconds=self.faults.fresh_seconds)

    async def _create_role_binding(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        parent = _path_uidp(request)
        self._require(caller, "role_bindings.create", parent)
        if parent not in self.groups:
            raise ApiError(NOT_FOUND, f"group {parent} not found")
        body = await _json_object(request)
        identity_uid, role_uid = _pick(body, "identityUid"), _pick(body, "roleUid")
        for field, value in (("identity_uid", identity_uid), ("role_uid", role_uid)):
            if not isinstance(value, str) or not value:
                raise _invalid(f"{field}: is required")
        assert isinstance(identity_uid, str)
        assert isinstance(role_uid, str)
        if identity_uid not in self.identities:
            raise ApiError(NOT_FOUND, f"identity {identity_uid} not found")
        if role_uid not in self.roles:
            raise ApiError(NOT_FOUND, f"role {role_uid} not found")
        if "/" in role_uid and not _within(parent, _parent_of(role_uid)):
            raise _invalid(f"role_uid: custom role {role_uid} is not defined in {parent} or its ancestors")
        if self._still_propagating(identity_uid):
            self.faults.record("propagation", request.method, request.path, 403)
            raise ApiError(PERMISSION_DENIED, f"permission denied: role_bindings.create on {parent}")
        for key in self.role_bindings.uids_of(identity_uid):
            binding = self.role_bindings[key]
            if (_binding_group(binding), _binding_role(binding)) == (parent, role_uid):
                raise ApiError(ALREADY_EXISTS, f"role binding {key} already exists")
        uid = self._store_binding(parent, identity_uid, role_uid)
        self._writes["role_binding.create"] += 1
        return _json(self.role_bindings[uid])

    async def _list_role_bindings(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        query = request.query
        identity, group, role = (_query(query, key) for key in ("identity", "group", "role"))
        if group:
            _check_uidp(group, "group")
            self._require(caller, "role_bindings.list", group)
        candidates = (
            [self.role_bindings[key] for key in self.role_bindings.uids_of(identity)]
            if identity
            else list(self.role_bindings.values())
        )
        matches = [
            binding
            for binding in candidates
            if (not group or _binding_group(binding) == group)
            and (not role or _binding_role(binding) == role)
            and self._can(caller, "role_bindings.list", _binding_group(binding))
        ]
        page, next_token = _paginate(matches, query)
        return _json({"roleBindings": page, "nextPageToken": next_token})

    async def _delete_role_binding(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        uid = _path_uidp(request)
        self._require(caller, "role_bindings.delete", _scope(uid))
        # Idempotent (AIP-135, as the v2 protos say): deleting a missing binding succeeds.
        if self.role_bindings.pop(uid, None) is not None:
            self._writes["role_binding.delete"] += 1
        return _json({})

    # -- registry -----------------------------------------------------------------------------------

    async def _list_repos(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        visible = [uid for uid in self.groups if self._can(caller, "repo.list", uid)]
        if not visible:
            raise ApiError(PERMISSION_DENIED, "permission denied: repo.list")
        items = [copy.deepcopy(repo) for uid in visible for repo in self.repos.get(uid, [])]
        return _json({"items": items})

    # -- STS ----------------------------------------------------------------------------------------

    async def _exchange(self, request: web.Request) -> web.Response:
        params: MultiDict[str] = MultiDict(request.query)
        if request.method == "POST" and request.content_type == "application/x-www-form-urlencoded":
            for key, value in (await request.post()).items():
                if isinstance(value, str):
                    params.add(key, value)
        audiences = tuple(aud for aud in params.getall("aud", []) if aud)
        identity_uid = params.get("identity", "")
        if not audiences:
            raise _invalid("audience must be specified")
        if not identity_uid:
            raise _invalid("identity must be specified")
        _check_uidp(identity_uid, "identity")
        try:
            token = _bearer(request)
            if token is None:
                raise ApiError(UNAUTHENTICATED, "missing bearer token")
            presented = await self._verify_presented(identity_uid, token)
        except ApiError as error:
            self.exchanges.append(ExchangeRecord(identity_uid, audiences, error.status, error.message))
            raise
        now = self._clock()
        expires = now + EXCHANGED_TOKEN_LIFETIME
        exchanged = self._sign(
            {
                "iss": STS_ISSUER,
                "sub": identity_uid,
                "aud": audiences[0] if len(audiences) == 1 else list(audiences),
                "iat": int(now.timestamp()),
                "exp": int(expires.timestamp()),
                "act": {key: presented[key] for key in ("iss", "sub", "aud") if key in presented},
            }
        )
        identity = self.identities.get(identity_uid)
        if identity is not None:
            identity["lastSeenTime"] = format_time(now)
        self.exchanges.append(ExchangeRecord(identity_uid, audiences, 200, ""))
        return _json(
            {"token": exchanged, "refreshToken": secrets.token_urlsafe(32), "expiry": format_time(expires)}
        )

    async def _verify_presented(self, identity_uid: str, token: str) -> dict[str, Any]:
        """Verify the presented token for the identity; its claims, or a 403 ApiError saying why."""
        identity = self.identities.get(identity_uid)
        if identity is None:
            raise _refuse(f"identity {identity_uid} not found")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _refuse("verifying token: oidc: malformed jwt") from None
        now = self._clock()
        static, claim_match = identity.get("staticKeys"), identity.get("claimMatch")
        if isinstance(static, Mapping):
            expires = parse_time(static.get("expirationTime"))
            if expires is not None and now >= expires:
                raise _refuse("verifying token: identity keys expired")
            if unverified.get("iss") != static.get("issuer"):
                raise _refuse("verifying token: oidc: id token issued by a different provider")
            try:
                keys = jwt.PyJWKSet.from_json(str(static.get("issuerKeys", "")))
            except (jwt.PyJWTError, ValueError):
                raise _refuse("verifying token: the identity's issuer keys are unusable") from None
            claims = _verify_signature(token, header, keys)
            audiences = static.get("audiences") or [DEFAULT_AUDIENCE]
            _check_claims(
                claims,
                now,
                subject=lambda sub: sub == static.get("subject"),
                audience=lambda aud: aud == audiences[0],
            )
            return claims
        if isinstance(claim_match, Mapping):
            issuer = unverified.get("iss")
            if not isinstance(issuer, str) or not _matches(claim_match, "issuer", issuer):
                raise _refuse("verifying token: the token's issuer does not match the identity")
            keys = await self._fetch_issuer_keys(issuer)
            claims = _verify_signature(token, header, keys)
            _check_claims(
                claims,
                now,
                subject=lambda sub: _matches(claim_match, "subject", sub),
                audience=lambda aud: _matches(claim_match, "audience", aud),
            )
            _check_custom_claims(claims, claim_match)
            return claims
        raise _refuse("verifying token: this kind of identity cannot be assumed with an OIDC token")

    async def _fetch_issuer_keys(self, issuer: str) -> jwt.PyJWKSet:
        """The issuer's keys, by its discovery document, as Chainguard's STS fetches them (no cache)."""
        discovery = await self._fetch_json(issuer.rstrip("/") + "/.well-known/openid-configuration")
        if discovery.get("issuer") != issuer:
            raise _refuse("verifying token: oidc: issuer did not match the issuer returned by provider")
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise _refuse("failed to fetch keys: the discovery document has no jwks_uri")
        try:
            return jwt.PyJWKSet.from_dict(await self._fetch_json(jwks_uri))
        except jwt.PyJWTError:
            raise _refuse("failed to fetch keys: the issuer's JWKS has no usable keys") from None

    async def _fetch_json(self, url: str) -> dict[str, Any]:
        target = self._route(url)
        if target is None:
            host = urlsplit(url).netloc
            raise _refuse(f"failed to fetch keys: {host} is not reachable (no issuer_routes entry)")
        if self._session is None:
            raise RuntimeError("the Chainguard emulator is not started")
        try:
            async with self._session.get(target, ssl=self.issuer_ssl or True) as response:
                if response.status != 200:
                    raise _refuse(f"failed to fetch keys: {url} answered HTTP {response.status}")
                data = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise _refuse(f"failed to fetch keys: {url}: {type(error).__name__}") from None
        if not isinstance(data, dict):
            raise _refuse(f"failed to fetch keys: {url} did not answer a JSON object")
        return data

    def _route(self, url: str) -> str | None:
        """Where to fetch ``url``: through the longest matching ``issuer_routes`` prefix, or loopback."""
        for prefix in sorted(self.issuer_routes, key=len, reverse=True):
            base = prefix.rstrip("/")
            if url == base or url.startswith(base + "/"):
                return self.issuer_routes[prefix].rstrip("/") + url[len(base) :]
        if urlsplit(url).hostname in LOOPBACK_HOSTS:
            return url
        return None


# -- helpers -------------------------------------------------------------------------------------------


def _identity_view(identity: Mapping[str, Any]) -> dict[str, Any]:
    """The identity as a role binding shows it (the protos' RoleBindingIdentity): never its keys."""
    claim_match = identity.get("claimMatch")
    claims: Mapping[str, Any] = claim_match if isinstance(claim_match, Mapping) else {}
    return {
        "uid": identity.get("uid", ""),
        "name": identity.get("name", ""),
        "description": identity.get("description", ""),
        "subject": claims.get("subject", ""),  # the exact values of a claim match ("from ClaimMatch")
        "issuer": claims.get("issuer", ""),
        "email": identity.get("email", ""),
    }


def _snake(name: str) -> str:
    return re.sub(r"[A-Z]", lambda match: "_" + match.group(0).lower(), name)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _pick(data: Mapping[str, Any], camel: str) -> Any:
    """A request field by its JSON (camelCase) or proto (snake_case) name; ``null`` means unset."""
    value = data.get(camel)
    return data.get(_snake(camel)) if value is None else value


def _query(query: MultiMapping[str], camel: str) -> str:
    """A query parameter by its JSON or proto name (``uidp.childrenOf`` = ``uidp.children_of``)."""
    return query.get(camel) or query.get(_snake(camel)) or ""


def _canonical_identity(body: Mapping[str, Any]) -> dict[str, Any]:
    """The identity fields of a request body under their JSON names; unknown fields are dropped."""
    canonical: dict[str, Any] = {}
    for field in IDENTITY_FIELDS:
        value = _pick(body, field)
        if value is None:
            continue
        nested = NESTED_FIELDS.get(field)
        if nested is not None:
            if not isinstance(value, Mapping):
                raise _invalid(f"{_snake(field)}: must be an object")
            value = {key: sub for key in nested if (sub := _pick(value, key)) is not None}
        canonical[field] = value
    return canonical


def _validate_claim_match(claim_match: Mapping[str, Any]) -> dict[str, Any]:
    stored: dict[str, Any] = {}
    for exact, pattern in CLAIM_MATCH_ONEOFS:
        present = [key for key in (exact, pattern) if key in claim_match]
        if len(present) == 2:
            raise _invalid(f"claim_match: only one of {exact} and {_snake(pattern)} may be set")
        if not present:
            if exact == "audience":  # optional; issuer.enforce.dev is applied at exchange
                continue
            raise _invalid(f"claim_match.{exact}: one of {exact} or {_snake(pattern)} is required")
        key = present[0]
        value = claim_match[key]
        if not isinstance(value, str) or not value:
            raise _invalid(f"claim_match.{_snake(key)}: must be a non-empty string")
        if key == pattern:
            _check_pattern(f"claim_match.{_snake(key)}", value)
        stored[key] = value
    for key in ("claims", "claimPatterns"):
        value = claim_match.get(key, {})
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise _invalid(f"claim_match.{_snake(key)}: must map strings to strings")
        if key == "claimPatterns":
            for claim, claim_pattern in value.items():
                _check_pattern(f"claim_match.claim_patterns[{claim}]", claim_pattern)
        stored[key] = dict(value)
    return stored


def _check_pattern(field: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error:
        raise _invalid(f"{field}: is not a valid regular expression") from None


def _check_public_jwks(text: str) -> None:
    """``issuerKeys`` must be a JWKS of usable public keys; its messages never echo key material."""
    field = "static_keys.issuer_keys"
    try:
        data = json.loads(text)
    except ValueError:
        raise _invalid(f"{field}: is not valid JSON") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not keys:
        raise _invalid(f'{field}: must be a JWKS with a non-empty "keys" list')
    for index, key in enumerate(keys):
        if not isinstance(key, dict):
            raise _invalid(f"{field}: key {index} is not a JSON object")
        if PRIVATE_JWK_MEMBERS & key.keys():
            raise _invalid(
                f"{field}: key {index} contains private key material; only public keys are allowed"
            )
        try:
            jwt.PyJWK(key)
        except jwt.PyJWTError as error:
            raise _invalid(
                f"{field}: key {index} is not a usable public key ({type(error).__name__})"
            ) from None


def _update_paths(query: MultiMapping[str], patch: Mapping[str, Any]) -> list[str]:
    """The update mask as JSON-name paths; without one, derived from the fields the body sets."""
    raw = query.getall("updateMask", []) + query.getall("update_mask", [])
    paths = [path.strip() for value in raw for path in value.split(",") if path.strip()]
    if not paths:
        for field, value in patch.items():
            if field in NESTED_FIELDS and value:
                paths.extend(f"{field}.{sub}" for sub in value)
            else:
                paths.append(field)
    return [path if path == "*" else ".".join(_camel(part) for part in path.split(".")) for path in paths]


def _apply_mask(current: Mapping[str, Any], patch: Mapping[str, Any], paths: Sequence[str]) -> dict[str, Any]:
    """Field-mask semantics: each path is replaced by the patch's value, or cleared if it has none.

    Setting a member of a oneof (the identity kind, or issuer/issuer_pattern …) clears its siblings.
    """
    result = copy.deepcopy(dict(current))
    for path in paths:
        if path == "*":
            result = copy.deepcopy(dict(patch))
            continue
        head, _, sub = path.partition(".")
        if head in ("name", "description") and not sub:
            if head in patch:
                result[head] = patch[head]
            else:
                result.pop(head, None)
        elif head in IDENTITY_KINDS and not sub:
            for kind in IDENTITY_KINDS:
                result.pop(kind, None)
            if head in patch:
                result[head] = copy.deepcopy(patch[head])
        elif head in NESTED_FIELDS and sub in NESTED_FIELDS[head]:
            target = result.get(head)
            if not isinstance(target, dict):  # switching the identity kind to this one
                for kind in IDENTITY_KINDS:
                    result.pop(kind, None)
                target = result[head] = {}
            for group in CLAIM_MATCH_ONEOFS if head == "claimMatch" else ():
                if sub in group:
                    for member in group:
                        target.pop(member, None)
            value = (patch.get(head) or {}).get(sub)
            if value is None:
                target.pop(sub, None)
            else:
                target[sub] = copy.deepcopy(value)
        else:
            raise _invalid(f"update_mask: {_snake(path)!r} is not an updatable field")
    return result


def _paginate(items: Sequence[dict[str, Any]], query: MultiMapping[str]) -> tuple[list[Any], str]:
    """One page of ``items`` and the opaque token of the next ("" on the last page)."""
    raw_size = _query(query, "pageSize")
    try:
        size = int(raw_size) if raw_size else 0
    except ValueError:
        raise _invalid("page_size: must be an integer") from None
    if size < 0:
        raise _invalid("page_size: must not be negative")
    size = min(size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    token = _query(query, "pageToken")
    start = 0
    if token:
        try:
            kind, _, offset = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
            start = int(offset)
        except ValueError:
            raise _invalid("page_token: is not a token this server issued") from None
        if kind != "offset" or start < 0:
            raise _invalid("page_token: is not a token this server issued")
    end = start + size
    next_token = base64.urlsafe_b64encode(f"offset:{end}".encode()).decode() if end < len(items) else ""
    return copy.deepcopy(list(items[start:end])), next_token


def _verify_signature(token: str, header: Mapping[str, Any], keys: jwt.PyJWKSet) -> dict[str, Any]:
    """The token's claims if a key of ``keys`` (the one named by ``kid``, or any) signed it."""
    kid = header.get("kid")
    candidates = [key for key in keys if kid is None or key.key_id == kid]
    if not candidates:
        raise _refuse(f"verifying token: failed to verify signature: no key with kid {kid!r}")
    for key in candidates:
        try:
            return jwt.decode(token, key=key, algorithms=[key.algorithm_name], options=_SIGNATURE_ONLY)
        except jwt.PyJWTError:
            continue
    raise _refuse("verifying token: failed to verify signature")


def _check_claims(
    claims: Mapping[str, Any],
    now: datetime.datetime,
    *,
    subject: Callable[[str], bool],
    audience: Callable[[str], bool],
) -> None:
    if not _unexpired(claims, now):
        raise _refuse("verifying token: oidc: token is expired")
    not_before = claims.get("nbf")
    if _is_number(not_before) and not_before > (now + NBF_LEEWAY).timestamp():
        raise _refuse("verifying token: oidc: current time before the nbf (not before) time")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not subject(sub):
        raise _refuse("verifying token: the token's subject does not match the identity")
    if not any(audience(aud) for aud in _audiences(claims)):
        raise _refuse("verifying token: the token's audience does not match the identity")


def _check_custom_claims(claims: Mapping[str, Any], claim_match: Mapping[str, Any]) -> None:
    for name, expected in (claim_match.get("claims") or {}).items():
        if claims.get(name) != expected:
            raise _refuse(f"verifying token: claim {name!r} does not match the identity")
    for name, pattern in (claim_match.get("claimPatterns") or {}).items():
        value = claims.get(name)
        if not isinstance(value, str) or not re.fullmatch(pattern, value):
            raise _refuse(f"verifying token: claim {name!r} does not match the identity")


def _matches(spec: Mapping[str, Any], field: str, value: str) -> bool:
    """``field`` of a claim match: exact, or the ``<field>Pattern`` as a full match; audience defaults."""
    exact, pattern = spec.get(field), spec.get(f"{field}Pattern")
    if isinstance(pattern, str) and pattern:
        return re.fullmatch(pattern, value) is not None
    if field == "audience" and not exact:
        exact = DEFAULT_AUDIENCE
    return value == exact


def _audiences(claims: Mapping[str, Any]) -> list[str]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    if isinstance(aud, list):
        return [item for item in aud if isinstance(item, str)]
    return []


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _unexpired(claims: Mapping[str, Any], now: datetime.datetime) -> bool:
    """A token without ``exp`` counts as expired, like go-oidc's zero expiry."""
    exp = claims.get("exp")
    return _is_number(exp) and now.timestamp() < exp


def _bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


async def _json_object(request: web.Request) -> dict[str, Any]:
    text = await request.text()
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        raise _invalid("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise _invalid("the request body must be a JSON object")
    return data


def _json(data: Mapping[str, Any]) -> web.Response:
    return web.json_response(copy.deepcopy(dict(data)))


def _check_uidp(value: str, field: str) -> None:
    if not UIDP_RE.fullmatch(value):
        raise _invalid(f"{field}: {value!r} is not a UIDP")


def _path_uidp(request: web.Request) -> str:
    value = request.match_info["uidp"]
    _check_uidp(value, "uidp")
    return value


def _parent_of(uidp: str) -> str:
    return uidp.rsplit("/", 1)[0] if "/" in uidp else ""


def _scope(uidp: str) -> str:
    """The group an object belongs to, for authorization (a root object is its own scope)."""
    return _parent_of(uidp) or uidp


def _within(uidp: str, ancestor: str) -> bool:
    return uidp == ancestor or uidp.startswith(ancestor + "/")


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _describe(delta: datetime.timedelta) -> str:
    if delta % datetime.timedelta(days=1):
        return str(delta)
    return f"{delta.days} days"
