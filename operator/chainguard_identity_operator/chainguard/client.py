"""The client of the Chainguard API (IAM v2 identities, roles, role bindings, groups; registry repos).

One method per operation in ``chainguard-api.md``; each builds a path from a route template
(``/iam/v2/identities/{uid}``, UIDPs with their ``/`` kept), sends it through one retry loop and
turns the JSON answer into the wire dataclasses of :mod:`.types`.

Writes are not reads. A read (GET) is retried with jittered exponential backoff, up to
``RetryPolicy.attempts`` tries, on 429 (honouring ``Retry-After``), 500, 502, 503, 504 and transport
errors. A mutation (POST, PATCH, DELETE) is re-sent only on an answer proving nothing was done —
503 Unavailable and 429 ResourceExhausted, under the same policy — or when the connection could not
even be made (nothing was sent). After a timeout or a connection lost once the request was sent, or
an answer of 500, 502 or 504, the write may have been committed, so re-sending it could apply it
twice (a second identity of the same name, say): the client raises
:class:`~.errors.OutcomeUnknown` at once and the caller looks the object up before writing again
(:meth:`ChainguardClient.find_role_binding` adopts a binding a lost answer created). Chainguard's
Terraform provider and SDK draw the same line.

A 401 makes the token source forget its token and the request is tried once more. A 403 on
creating an identity or a role binding is retried like the Terraform provider does while a new
group's permissions propagate (5 attempts in all, 2, 4, 8, 16 s apart, no jitter) — a 403 proves
nothing was done, so re-sending is safe. The token source's own failures are
:class:`~.errors.CredentialsError`, never an API answer, so a refused STS exchange is never taken
for that propagation delay; a transient one is retried like a failed read, as nothing was sent.

Every request holds a slot of :class:`~.flow.FlowControl` while it is in flight (``max_in_flight``,
and as many pooled connections), so the pool never queues, and a 429 or 503 with ``Retry-After``
pauses the whole client for that long. Sleeping goes through an injected ``sleep`` so tests never
wait, and every HTTP try is reported to
an optional ``on_request`` hook (for metrics) with its route template, never its concrete path.
Errors are those of :mod:`.errors`; the bearer token is only ever put in a request header, never in
a log line, an exception or ``repr``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx

from .auth import TokenSource
from .errors import (
    APIError,
    ChainguardError,
    CredentialsError,
    NotFound,
    OutcomeUnknown,
    PermissionDenied,
    RateLimited,
    ServerError,
    TransportError,
    Unauthenticated,
    as_credentials_error,
    error_from_response,
)
from .flow import CURRENT_WRITES, DEFAULT_LIMIT, FlowControl
from .types import Group, Identity, Role, RoleBinding

logger = logging.getLogger(__name__)

RequestHook = Callable[[str, str, int | None], None]
"""Called after every HTTP try: (method, route template, HTTP status or ``None`` on a transport error)."""

PAGE_SIZE = 200  # the API's maximum

# Answers worth asking again as they are: for a read, any transient status; for a write, only
# those proving nothing was done. Any other 5xx to a write (500, 502, 504, …) is ambiguous — except
# 501, which says the method does not exist, so nothing happened and nothing will.
_READ_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_WRITE_RETRY_STATUSES = frozenset({429, 503})
_NOT_AMBIGUOUS_5XX = frozenset({501, 503})
# Transport errors raised before a connection existed: not one byte of the request was sent.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)

# Path parameters are UIDPs; refuse anything that could change the meaning of the URL.
_PATH_UIDP = re.compile(r"^[0-9A-Za-z]+(/[0-9A-Za-z]+)*$")
_MASK_PATH = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How hard the client tries.

    ``attempts`` counts every try of a request that fails transiently, the first one included;
    the delay before retry *n* is ``base_delay * 2**(n-1)`` capped at ``max_delay``, jittered
    down to as little as half of it, or the server's ``Retry-After`` (capped at ``max_delay``).
    ``forbidden_attempts`` counts every try, the first one included, of an identity or role-binding
    create answered 403, as Chainguard's Terraform provider does: 5 in all, ``forbidden_base_delay``
    doubling up to ``forbidden_max_delay`` (2, 4, 8, 16 s), without jitter.
    """

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 16.0
    forbidden_attempts: int = 5
    forbidden_base_delay: float = 2.0
    forbidden_max_delay: float = 16.0

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """The pause before the ``retry``-th retry (1-based) of a transient failure."""
        if retry_after is not None:
            return min(retry_after, self.max_delay)
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** (retry - 1))
        # "Equal jitter": spreads clients that failed together without ever retrying at once.
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def forbidden_delay(self, retry: int) -> float:
        """The pause before the ``retry``-th retry (1-based) of a create answered 403."""
        return min(self.forbidden_max_delay, self.forbidden_base_delay * 2.0 ** (retry - 1))


def _check_uidp(name: str, value: str) -> str:
    if not _PATH_UIDP.match(value):
        raise ValueError(f"{name}={value!r} is not a UIDP")
    return value


def _path(route: str, **params: str) -> str:
    return route.format(**{name: _check_uidp(name, value) for name, value in params.items()})


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part.capitalize() for part in rest)


def masked_body(wire: Mapping[str, Any], mask: Sequence[str]) -> dict[str, Any]:
    """The part of ``wire`` (camelCase) named by the snake_case field ``mask``.

    A masked field absent from ``wire`` is left out of the body: with the field in the mask, the
    server then clears it, which is what an unset field in the dataclass means.
    """
    if "*" in mask:
        return dict(wire)
    body: dict[str, Any] = {}
    for path in mask:
        keys = [_camel(part) for part in path.split(".")]
        source: Any = wire
        for key in keys[:-1]:
            source = source.get(key) if isinstance(source, Mapping) else None
        if not isinstance(source, Mapping) or keys[-1] not in source:
            continue
        target = body
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = source[keys[-1]]
    return body


def _first(data: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if data.get(key):
            return data[key]
    return None


class ChainguardClient:
    """The Chainguard API. Use as ``async with`` or call :meth:`aclose`."""

    def __init__(
        self,
        api_url: str,
        tokens: TokenSource,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy = RetryPolicy(),
        on_request: RequestHook | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_in_flight: int = DEFAULT_LIMIT,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.retry = retry
        self._tokens = tokens
        self._on_request = on_request
        self._sleep = sleep
        self.flow = FlowControl(max_in_flight, sleep=sleep)
        # As many connections as calls may be in flight: no request ever waits inside the pool.
        limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
        self._http = httpx.AsyncClient(
            base_url=self.api_url,
            transport=transport,
            timeout=httpx.Timeout(timeout),
            limits=limits,
            follow_redirects=False,
            headers={"Accept": "application/json"},
        )

    def __repr__(self) -> str:
        return f"ChainguardClient({self.api_url!r})"

    async def __aenter__(self) -> ChainguardClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- identities ---------------------------------------------------------------------------

    async def get_identity(self, uid: str) -> Identity | None:
        """The identity, or ``None`` if it does not exist."""
        route = "/iam/v2/identities/{uid}"
        try:
            data = await self._request("GET", route, _path(route, uid=uid))
        except NotFound:
            return None
        return Identity.from_wire(data)

    async def list_identities(self, parent: str, *, name: str | None = None) -> list[Identity]:
        """The identities directly under ``parent`` (all pages), optionally only those named ``name``."""
        query: dict[str, str] = {"uidp.childrenOf": _check_uidp("parent", parent)}
        if name is not None:
            query["name"] = name
        items = await self._list("/iam/v2/identities", ("identities",), query, paged=True)
        return [Identity.from_wire(item) for item in items]

    async def create_identity(self, parent: str, identity: Identity) -> Identity:
        """Create ``identity`` under ``parent``. A 403 is retried per the policy, as a new parent
        group's permissions take a moment to propagate; :class:`OutcomeUnknown` means it may exist
        now, so look the name up before creating it again."""
        route = "/iam/v2/identities/{parent}"
        data = await self._request(
            "POST", route, _path(route, parent=parent), body=identity.to_wire(), retry_forbidden=True
        )
        return Identity.from_wire(data)

    async def update_identity(self, uid: str, identity: Identity, mask: Sequence[str]) -> Identity:
        """Update the fields named by ``mask`` (snake_case proto paths such as
        ``static_keys.issuer_keys``) to their values in ``identity``; only those are sent."""
        if not mask:
            raise ValueError("an update needs a non-empty field mask")
        for path in mask:
            if path != "*" and not _MASK_PATH.match(path):
                raise ValueError(f"{path!r} is not a snake_case field path")
        route = "/iam/v2/identities/{uid}"
        data = await self._request(
            "PATCH",
            route,
            _path(route, uid=uid),
            query={"updateMask": ",".join(mask)},
            body=masked_body(identity.to_wire(), mask),
        )
        return Identity.from_wire(data)

    async def delete_identity(self, uid: str) -> None:
        """Delete the identity; one that does not exist counts as deleted."""
        route = "/iam/v2/identities/{uid}"
        try:
            await self._request("DELETE", route, _path(route, uid=uid))
        except NotFound:
            logger.debug("identity %s was already gone", uid)

    # --- roles, groups, role bindings -----------------------------------------------------------

    async def find_roles(self, name: str) -> list[Role]:
        """Roles called ``name``: built-in ones (root UIDPs) and custom ones of any visible org."""
        items = await self._list("/iam/v2/roles", ("roles",), {"name": name}, paged=False)
        return [Role.from_wire(item) for item in items]

    async def find_groups(self, name: str) -> list[Group]:
        """Groups called ``name`` (names are not unique)."""
        items = await self._list("/iam/v2/groups", ("groups",), {"name": name}, paged=False)
        return [Group.from_wire(item) for item in items]

    async def list_role_bindings(
        self, *, identity: str | None = None, group: str | None = None
    ) -> list[RoleBinding]:
        """The role bindings of ``identity``, or in ``group``, or both (all pages)."""
        if identity is None and group is None:
            raise ValueError("list_role_bindings needs an identity or a group")
        query: dict[str, str] = {}
        if identity is not None:
            query["identity"] = _check_uidp("identity", identity)
        if group is not None:
            query["group"] = _check_uidp("group", group)
        items = await self._list("/iam/v2/roleBindings", ("roleBindings", "role_bindings"), query, paged=True)
        return [RoleBinding.from_wire(item) for item in items]

    async def find_role_binding(self, parent: str, *, identity: str, role: str) -> RoleBinding | None:
        """The binding of ``role`` to ``identity`` in the group ``parent``, or ``None``.

        For adopting a binding that a create whose answer was lost (:class:`OutcomeUnknown`) or
        that answered 409 already made, instead of creating it again.
        """
        _check_uidp("parent", parent)
        _check_uidp("role", role)
        for binding in await self.list_role_bindings(identity=identity):
            if binding.group_uid == parent and binding.role_uid == role:
                return binding
        return None

    async def create_role_binding(self, parent: str, *, identity: str, role: str) -> RoleBinding:
        """Bind ``role`` to ``identity`` in the group ``parent``. A 403 is retried per the policy,
        as a fresh identity's permissions take a moment to propagate; after
        :class:`OutcomeUnknown`, :meth:`find_role_binding` tells whether it was made."""
        route = "/iam/v2/roleBindings/{parent}"
        data = await self._request(
            "POST",
            route,
            _path(route, parent=parent),
            body={"identityUid": _check_uidp("identity", identity), "roleUid": _check_uidp("role", role)},
            retry_forbidden=True,
        )
        return RoleBinding.from_wire(data)

    async def delete_role_binding(self, uid: str) -> None:
        """Delete the role binding; one that does not exist counts as deleted."""
        route = "/iam/v2/roleBindings/{uid}"
        try:
            await self._request("DELETE", route, _path(route, uid=uid))
        except NotFound:
            logger.debug("role binding %s was already gone", uid)

    # --- registry -------------------------------------------------------------------------------

    async def list_repos(self) -> list[str]:
        """The names of the registry repositories the token can see."""
        items = await self._list("/registry/v1/repos", ("items",), {}, paged=False)
        return [item["name"] for item in items if isinstance(item.get("name"), str) and item["name"]]

    # --- the machinery --------------------------------------------------------------------------

    async def _list(
        self, route: str, keys: tuple[str, ...], query: Mapping[str, str], *, paged: bool
    ) -> list[Mapping[str, Any]]:
        """Every item of a list answer, following ``nextPageToken`` until it is empty.

        ``paged`` adds ``pageSize`` for the endpoints the contract documents with paging; the
        others are still followed if they ever answer with a next-page token.
        """
        items: list[Mapping[str, Any]] = []
        page_token = ""
        seen: set[str] = set()
        while True:
            params = dict(query)
            if paged:
                params["pageSize"] = str(PAGE_SIZE)
            if page_token:
                params["pageToken"] = page_token
            page = await self._request("GET", route, route, query=params)
            found = _first(page, *keys) or []
            items.extend(item for item in found if isinstance(item, Mapping))
            page_token = _first(page, "nextPageToken", "next_page_token") or ""
            if not isinstance(page_token, str) or not page_token:
                return items
            if page_token in seen:  # a server bug must not make us loop forever
                raise ChainguardError(f"GET {route}: the API repeated a page token")
            seen.add(page_token)

    async def _request(
        self,
        method: str,
        route: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        retry_forbidden: bool = False,
    ) -> dict[str, Any]:
        """Send one API request with the retry policy; return the JSON object of the answer."""
        policy = self.retry
        write = method != "GET"
        failures = 0  # tries that failed transiently
        forbidden = 0  # tries of a create answered 403
        reauthenticated = False
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._send(method, route, path, query, body, attempt)
            except Unauthenticated:
                if reauthenticated:
                    raise
                # Our cached token may have been revoked or expired early: get a fresh one, once.
                reauthenticated = True
                self._tokens.invalidate()
                continue
            except PermissionDenied:
                forbidden += 1
                if not retry_forbidden or forbidden >= policy.forbidden_attempts:
                    raise
                delay = policy.forbidden_delay(forbidden)
            except (CredentialsError, RateLimited, ServerError, TransportError) as error:
                # A CredentialsError comes before anything was sent: retried as a read is.
                statuses = _WRITE_RETRY_STATUSES if write else _READ_RETRY_STATUSES
                retryable = error.transient and (not isinstance(error, APIError) or error.status in statuses)
                failures += 1
                if not retryable or failures >= policy.attempts:
                    raise
                delay = policy.delay(failures, error.retry_after)
            logger.debug("%s %s: retrying in %.2fs (attempt %d)", method, route, delay, attempt)
            paused = self.flow.paused_for()
            await self._sleep(delay)
            if paused:
                self.flow.waited(delay)

    async def _send(
        self,
        method: str,
        route: str,
        path: str,
        query: Mapping[str, str] | None,
        body: Mapping[str, Any] | None,
        attempt: int,
    ) -> dict[str, Any]:
        request = f"{method} {path}"
        write = method != "GET"
        try:
            token = await self._tokens.token()
        except ChainguardError as error:
            # Whatever the token source raised (its STS's PermissionDenied, say) is not an answer
            # of the API to this request.
            raise as_credentials_error(error, "the token source failed") from None
        writes = CURRENT_WRITES.get() if write else None
        try:
            async with self.flow.slot():
                # Counted from before the request is handed to httpx (no await between): from here on,
                # cancelling the pass would leave the write's outcome unknown.
                with writes.sending() if writes is not None else contextlib.nullcontext():
                    response = await self._http.request(
                        method,
                        path,
                        params=query,
                        json=body,
                        headers={"Authorization": f"Bearer {token}"},
                    )
        except httpx.RequestError as exc:
            self._report(method, route, None, attempt)
            # httpx's exception carries the request and its Authorization header: keep only its kind.
            if write and not isinstance(exc, _NOT_SENT):
                raise OutcomeUnknown(request, type(exc).__name__) from None
            raise TransportError(f"{request}: {type(exc).__name__}") from None
        self._report(method, route, response.status_code, attempt)
        if not response.is_success:
            answer = error_from_response(
                response.status_code,
                response.content,
                request=request,
                retry_after=response.headers.get("Retry-After"),
                secrets=(token,),
            )
            status = response.status_code
            if status in (429, 503) and answer.retry_after is not None:
                # The server asked every caller to wait, not this one alone.
                self.flow.pause(min(answer.retry_after, self.retry.max_delay))
            if write and status >= 500 and status not in _NOT_AMBIGUOUS_5XX:
                raise OutcomeUnknown(request, f"HTTP {status}", status=status) from answer
            raise answer
        if not response.content.strip():
            return {}  # a delete may answer with an empty body instead of {}
        try:
            data = response.json()
            cause = f"HTTP {response.status_code} whose body is not a JSON object"
        except ValueError:
            data = None
            cause = f"HTTP {response.status_code} without a JSON body"
        if not isinstance(data, dict):
            if write:  # it succeeded, but what it made cannot be read: look it up
                raise OutcomeUnknown(request, cause, status=response.status_code)
            raise ChainguardError(f"{request}: {cause}")
        return data

    def _report(self, method: str, route: str, status: int | None, attempt: int) -> None:
        logger.debug(
            "%s %s -> %s (attempt %d)", method, route, status if status is not None else "error", attempt
        )
        if self._on_request is not None:
            self._on_request(method, route, status)
