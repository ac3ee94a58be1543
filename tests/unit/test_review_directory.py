"""Review finding (issue 7 change): ``Directory.invalidate`` does not reach a listing already being read.
A create whose answer was lost invalidates the parent so that the next pass "looks before it writes"; if
another resource's refresh of that parent was in flight (its answer taken before the create committed),
that refresh stores its pre-commit listing after the invalidation, and the next pass trusts it for a whole
TTL — so it does not see the identity the lost create made, and creates a second one. FAILS while open."""

from __future__ import annotations

import asyncio
import datetime

from test_directory import NOW, ORG, SlowClient, directory, identity


async def test_review_an_invalidation_during_a_listing_makes_the_next_read_ask_again() -> None:
    client, clock = SlowClient([]), [NOW]
    d = directory(client, clock)
    client.hold = asyncio.Event()
    refresh = asyncio.create_task(d.identities(ORG))  # another resource's pass refreshes the parent
    await client.listing.wait()  # ... and the server has answered it: nothing under the parent yet
    client.identities.append(identity(7))  # now a create commits, and its answer is lost:
    d.invalidate(ORG)  # the pass that made it says "look again before writing"
    client.hold.set()
    assert await refresh == ()
    clock[0] += datetime.timedelta(seconds=1)
    seen = await d.identities(ORG)  # the next pass of the resource whose create was lost
    assert identity(7) in seen, (
        "the listing read before the lost create committed was kept after invalidate()"
    )
