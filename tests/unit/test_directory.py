"""The per-parent directory: one listing serves every resource, and the operator's own writes are never
lost — not even when they happen while a listing is being read."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from typing import Any

from chainguard_identity_operator import naming
from chainguard_identity_operator.chainguard.types import ClaimMatch, Identity, RoleBinding
from chainguard_identity_operator.directory import Directory

ORG = "c95870ebffa72a258df087ea727ee92daf177e29"
NOW = datetime.datetime(2026, 11, 23, 10, 0, tzinfo=datetime.UTC)


def identity(n: int) -> Identity:
    return Identity(
        uid=f"{ORG}/{n:016x}",
        name=f"id-{n}",
        claim_match=ClaimMatch(issuer="https://issuer.example", subject="system:serviceaccount:a:b"),
    )


class SlowClient:
    """Lists what it holds; a list can be held open until the test lets it finish."""

    def __init__(self, identities: list[Identity]) -> None:
        self.identities = identities
        self.bindings: list[RoleBinding] = []
        self.hold: asyncio.Event | None = None
        self.listing = asyncio.Event()
        self.lists = 0

    async def list_identities(self, parent: str, **_: Any) -> list[Identity]:
        self.lists += 1
        snapshot = list(self.identities)  # what the server had when the request was answered
        self.listing.set()
        if self.hold is not None:
            await self.hold.wait()
        return snapshot

    async def list_role_bindings(self, **_: Any) -> list[RoleBinding]:
        return list(self.bindings)


def directory(client: SlowClient, clock: list[datetime.datetime]) -> Directory:
    return Directory(client, ttl=datetime.timedelta(minutes=5), clock=lambda: clock[0])  # type: ignore[arg-type]


async def test_one_listing_serves_every_lookup_until_it_is_stale() -> None:
    client, clock = SlowClient([identity(1), identity(2)]), [NOW]
    d = directory(client, clock)
    assert await d.identity(identity(1).uid) == identity(1)
    assert await d.identity(identity(2).uid) == identity(2)
    assert client.lists == 1
    clock[0] += datetime.timedelta(minutes=6)
    await d.identity(identity(1).uid)
    assert client.lists == 2


async def test_a_write_made_while_a_listing_is_read_is_kept() -> None:
    client, clock = SlowClient([identity(1)]), [NOW]
    d = directory(client, clock)
    client.hold = asyncio.Event()
    reading = asyncio.create_task(d.identities(ORG))
    await client.listing.wait()  # the server has answered without the new identity ...
    created = identity(2)
    d.put_identity(created)  # ... and the operator's create lands meanwhile
    d.drop_identity(identity(1).uid)  # as does a delete
    client.hold.set()
    listed = await reading
    assert created in listed
    assert identity(1) not in listed
    assert await d.identity(created.uid) == created  # never a spurious "identity missing"


async def test_invalidate_makes_the_next_read_ask_the_api() -> None:
    client, clock = SlowClient([identity(1)]), [NOW]
    d = directory(client, clock)
    await d.identities(ORG)
    client.identities.append(identity(2))  # committed by a write whose answer was lost
    assert await d.identity(identity(2).uid) is None  # the listing does not know yet
    d.invalidate(ORG)
    assert await d.identity(identity(2).uid) == identity(2)
    assert client.lists == 2


def marked(n: int, namespace: str, name: str, cluster_id: str = "c1") -> Identity:
    owner = naming.Owner("kubernetes", cluster_id, namespace, name)
    return dataclasses.replace(identity(n), description=naming.identity_description(owner))


async def test_a_pass_sees_only_the_identities_marked_for_its_object_and_the_index_follows_writes() -> None:
    theirs = marked(1, "shop", "puller", cluster_id="another-cluster")  # same object, other cluster
    ours = marked(2, "shop", "puller")
    other = marked(3, "shop", "pusher")
    client, clock = SlowClient([identity(4), theirs, ours, other]), [NOW]
    client.bindings = [RoleBinding(f"{ORG}/b{n}", identity(n).uid, ORG, "role") for n in (2, 3)]
    d = directory(client, clock)
    assert await d.marked(ORG, "shop", "puller") == (theirs, ours)  # whose they are is policy's to say
    assert await d.marked(ORG, "shop", "nobody") == ()
    assert [b.uid for b in await d.bindings(ours)] == [f"{ORG}/b2"]

    moved = marked(2, "shop", "pusher")  # an update that changes the marker moves it in the index
    d.put_identity(moved)
    assert await d.marked(ORG, "shop", "puller") == (theirs,)
    assert await d.marked(ORG, "shop", "pusher") == (moved, other)
    d.drop_identity(other.uid)  # and dropping an identity drops its bindings with it
    assert await d.marked(ORG, "shop", "pusher") == (moved,)
    assert await d.bindings(other) == ()
    d.drop_binding(f"{ORG}/b2")
    assert await d.bindings(moved) == ()
    assert client.lists == 1
