"""What Chainguard holds under each parent, read in bulk and shared by every resource.

A resync of N resources under one organization would cost 2N reads if each looked up its own
identity and bindings. Instead the directory lists a parent's identities and role bindings once (all
pages) and serves every resource from that listing until it is older than ``ttl``. The operator's
own writes go through the directory (write-through), so a pass never mistakes its own change for
drift and never repeats a write because it read a listing from before it.

Reads that decide whether something may be deleted or created (the finalizer, the name lookup
before a create) do not use the directory: they ask the API directly.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
from collections.abc import Callable

from chainguard_identity_operator.chainguard.client import ChainguardClient
from chainguard_identity_operator.chainguard.types import Identity, RoleBinding


@dataclasses.dataclass
class _Listing:
    read_at: datetime.datetime
    identities: dict[str, Identity]
    bindings: dict[str, RoleBinding]


class Directory:
    def __init__(
        self,
        client: ChainguardClient,
        *,
        ttl: datetime.timedelta,
        clock: Callable[[], datetime.datetime],
    ) -> None:
        self._client = client
        self._ttl = ttl
        self._clock = clock
        self._listings: dict[str, _Listing] = {}
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    async def _listing(self, parent: str) -> _Listing:
        async with self._locks[parent]:
            listing = self._listings.get(parent)
            now = self._clock()
            if listing is not None and now - listing.read_at < self._ttl:
                return listing
            identities = await self._client.list_identities(parent)
            bindings = await self._client.list_role_bindings(group=parent)
            listing = _Listing(
                read_at=now,
                identities={identity.uid: identity for identity in identities},
                bindings={binding.uid: binding for binding in bindings},
            )
            self._listings[parent] = listing
            return listing

    async def identity(self, uid: str) -> Identity | None:
        listing = await self._listing(uid.rsplit("/", 1)[0])
        return listing.identities.get(uid)

    async def bindings(self, identity: Identity) -> tuple[RoleBinding, ...]:
        """The identity's role bindings in its own parent (the only group the operator binds in)."""
        listing = await self._listing(identity.parent)
        return tuple(b for b in listing.bindings.values() if b.identity_uid == identity.uid)

    # -- write-through ------------------------------------------------------------------------------

    def put_identity(self, identity: Identity) -> None:
        listing = self._listings.get(identity.parent)
        if listing is not None:
            listing.identities[identity.uid] = identity

    def drop_identity(self, uid: str) -> None:
        listing = self._listings.get(uid.rsplit("/", 1)[0])
        if listing is not None:
            listing.identities.pop(uid, None)
            for binding_uid in [b.uid for b in listing.bindings.values() if b.identity_uid == uid]:
                del listing.bindings[binding_uid]

    def put_binding(self, binding: RoleBinding) -> None:
        listing = self._listings.get(binding.group_uid)
        if listing is not None:
            listing.bindings[binding.uid] = binding

    def drop_binding(self, uid: str) -> None:
        for listing in self._listings.values():
            listing.bindings.pop(uid, None)
