"""A listing is a hint, not proof of absence. An offset-paged listing read while other finalizers delete
can skip a live identity (the bench saw 3 of 1,000 leak that way); so can an index that lags. An
identity the resource knows by ID — status names it, current or retiring — and that a listing does not
show is looked up before the operator concludes it is gone: the finalizer still deletes it, and a
resync neither forgets it nor makes a second one."""

from __future__ import annotations

import pytest
from test_tenancy import cr, resync

from cgid_testkit.harness import World

pytestmark = pytest.mark.timeout(60)


def owned_by(w: World, name: str) -> list[str]:
    marker = f"shop/{name}"
    return sorted(uid for uid, i in w.chainguard.identities.items() if marker in i.get("description", ""))


@pytest.mark.parametrize("mode", ["ClaimMatch", "Static"])
async def test_a_resync_whose_listing_skips_the_identity_keeps_it_and_makes_no_other(
    sandbox: World, mode: str
) -> None:
    w = sandbox
    await w.apply(cr("puller", parent=w.org, mode=mode))
    uid = (await w.wait_ready("shop", "puller"))["status"]["identityId"]
    w.chainguard.faults.hide_from_listings(uid)
    await resync(w, resources=1, rounds=2)  # each past the listing's lifetime: read afresh, without it
    obj = await w.wait_ready("shop", "puller")
    assert obj["status"]["identityId"] == uid
    assert owned_by(w, "puller") == [uid]
    published = await w.config_map("shop", "puller-chainguard-identity")
    assert published is not None
    assert published["CHAINGUARD_IDENTITY"] == uid


async def test_the_finalizer_deletes_an_identity_its_listing_skipped(sandbox: World) -> None:
    w = sandbox
    await w.apply(cr("puller", parent=w.org))
    uid = (await w.wait_ready("shop", "puller"))["status"]["identityId"]
    w.chainguard.faults.hide_from_listings(uid)
    w.advance(w.settings.resync_interval)  # the listing the operator holds is too old to trust
    await w.delete("shop", "puller")

    async def gone() -> bool:
        return await w.get("shop", "puller") is None

    await w.wait_for(gone, what="the resource to be finalized")
    assert uid not in w.chainguard.identities, "the identity leaked"
    assert not [b for b in w.chainguard.role_bindings.values() if b["identity"]["uid"] == uid]


async def test_a_retiring_identity_a_listing_skips_is_still_deleted_when_due(sandbox: World) -> None:
    w = sandbox
    await w.apply(cr("puller", parent=w.org, mode="ClaimMatch"))
    first = (await w.wait_ready("shop", "puller"))["status"]["identityId"]
    await w.apply(cr("puller", parent=w.org, mode="Static"))  # a mode change replaces the identity

    async def replaced() -> dict[str, object] | None:
        obj = await w.get("shop", "puller")
        status = (obj or {}).get("status", {})
        retiring = [r.get("identityId") for r in status.get("retiring", [])]
        return obj if status.get("identityId") not in (None, first) and first in retiring else None

    await w.wait_for(replaced, what="the replacement, with the first identity retiring")
    w.chainguard.faults.hide_from_listings(first)
    await resync(w, resources=1, rounds=2)  # past the grace period, from listings without it
    assert first not in w.chainguard.identities, "the retired identity leaked"
