"""What Chainguard holds under each parent, read in bulk and shared by every resource.

A resync of N resources under one organization would cost 2N reads if each looked up its own identity
and bindings. Instead the directory lists a parent's identities and role bindings once (all pages) and
serves every resource from that listing until it is older than ``ttl``. The operator's own writes go
through the directory (write-through), so a pass never mistakes its own change for drift and never
repeats a write because it read a listing from before it. A write made while a listing is being read
is journalled and replayed onto the new listing — the listing may or may not have seen it, and every
write-through is idempotent — so an overlapping refresh never drops the operator's own writes.

When a write's outcome is unknown (the answer was lost), the caller ``invalidate``s the parent: the next
pass reads the truth before it decides anything, which is how a lost create is found instead of re-sent.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
from collections.abc import Callable

from chainguard_identity_operator import naming
from chainguard_identity_operator.chainguard.client import ChainguardClient
from chainguard_identity_operator.chainguard.types import Identity, RoleBinding


@dataclasses.dataclass
class _Listing:
    """One parent's identities and bindings, indexed the two ways every pass asks: by the object an
    identity's marker names (so a pass looks at its own few identities, not the parent's thousand —
    each marker is parsed once, when the identity enters the listing) and bindings by identity."""

    read_at: datetime.datetime
    identities: dict[str, Identity] = dataclasses.field(default_factory=dict)
    bindings: dict[str, RoleBinding] = dataclasses.field(default_factory=dict)
    marked: dict[tuple[str, str], set[str]] = dataclasses.field(default_factory=dict)  # (ns, name) → uids
    bound: dict[str, set[str]] = dataclasses.field(default_factory=dict)  # identity uid → binding uids

    def put_identity(self, identity: Identity) -> None:
        self.drop_identity(identity.uid, bindings=False)  # its marker may have changed
        self.identities[identity.uid] = identity
        marker = naming.parse_marker(identity.description)
        if marker is not None:
            self.marked.setdefault((marker.namespace, marker.name), set()).add(identity.uid)

    def drop_identity(self, uid: str, *, bindings: bool = True) -> None:
        old = self.identities.pop(uid, None)
        marker = naming.parse_marker(old.description) if old is not None else None
        if marker is not None:
            uids = self.marked.get((marker.namespace, marker.name), set())
            uids.discard(uid)
            if not uids:
                self.marked.pop((marker.namespace, marker.name), None)
        if bindings:
            for binding_uid in self.bound.pop(uid, set()):
                self.bindings.pop(binding_uid, None)

    def put_binding(self, binding: RoleBinding) -> None:
        self.drop_binding(binding.uid)
        self.bindings[binding.uid] = binding
        self.bound.setdefault(binding.identity_uid, set()).add(binding.uid)

    def drop_binding(self, uid: str) -> None:
        old = self.bindings.pop(uid, None)
        if old is not None:
            uids = self.bound.get(old.identity_uid, set())
            uids.discard(uid)
            if not uids:
                self.bound.pop(old.identity_uid, None)


_Write = Callable[[_Listing], None]


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
        self._journals: dict[str, list[_Write]] = {}  # writes made while the parent's listing is read
        self._stale_on_arrival: set[str] = set()  # parents invalidated while their listing was read
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    async def _listing(self, parent: str) -> _Listing:
        async with self._locks[parent]:
            listing = self._listings.get(parent)
            now = self._clock()
            if listing is not None and now - listing.read_at < self._ttl:
                return listing
            journal = self._journals[parent] = []
            try:
                identities = await self._client.list_identities(parent)
                bindings = await self._client.list_role_bindings(group=parent)
            finally:
                del self._journals[parent]
            listing = _Listing(read_at=now)
            for identity in identities:
                listing.put_identity(identity)
            for binding in bindings:
                listing.put_binding(binding)
            for write in journal:
                write(listing)
            if parent in self._stale_on_arrival:
                # Invalidated while it was being read: it may predate what the invalidation was for,
                # so it serves the reader that asked, and the next read asks the API again.
                self._stale_on_arrival.discard(parent)
                return listing
            self._listings[parent] = listing
            return listing

    async def identities(self, parent: str) -> tuple[Identity, ...]:
        return tuple((await self._listing(parent)).identities.values())

    async def marked(self, parent: str, namespace: str, name: str) -> tuple[Identity, ...]:
        """The parent's identities whose marker names the object ``namespace/name`` — of any cluster and
        either marker form: whose they are is for ``policy.claim_of`` to say. No other identity can be
        that object's, so a pass need not look at the rest."""
        listing = await self._listing(parent)
        uids = sorted(listing.marked.get((namespace, name), ()))
        return tuple(listing.identities[uid] for uid in uids)

    async def identity(self, uid: str) -> Identity | None:
        listing = await self._listing(uid.rsplit("/", 1)[0])
        return listing.identities.get(uid)

    async def bindings(self, identity: Identity) -> tuple[RoleBinding, ...]:
        """The identity's role bindings in its own parent (the only group the operator binds in)."""
        listing = await self._listing(identity.parent)
        return tuple(listing.bindings[uid] for uid in sorted(listing.bound.get(identity.uid, ())))

    def invalidate(self, parent: str) -> None:
        """Forget the parent's listing: the next read asks the API (after a write whose outcome is unknown).
        A listing being read right now is not kept either."""
        self._listings.pop(parent, None)
        if parent in self._journals:
            self._stale_on_arrival.add(parent)

    # -- write-through ------------------------------------------------------------------------------

    def _write(self, parent: str, write: _Write) -> None:
        listing = self._listings.get(parent)
        if listing is not None:
            write(listing)
        journal = self._journals.get(parent)
        if journal is not None:
            journal.append(write)

    def put_identity(self, identity: Identity) -> None:
        self._write(identity.parent, lambda listing: listing.put_identity(identity))

    def drop_identity(self, uid: str) -> None:
        self._write(uid.rsplit("/", 1)[0], lambda listing: listing.drop_identity(uid))

    def put_binding(self, binding: RoleBinding) -> None:
        self._write(binding.group_uid, lambda listing: listing.put_binding(binding))

    def drop_binding(self, uid: str) -> None:
        for parent in {*self._listings, *self._journals}:
            self._write(parent, lambda listing: listing.drop_binding(uid))
