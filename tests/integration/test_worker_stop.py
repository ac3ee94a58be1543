"""A resource deleted while its worker is in the middle of a pass: the pass ends on its own, the
finalizer runs after it, and nothing is cancelled mid-flight.

kopf cancelled the worker daemon the moment its object was marked for deletion (no
``cancellation_backoff``): "Daemon 'worker' is cancelled. Will escalate." 278-520 times per 1,000
deletions in the benchmark, and a Chainguard write cut off with its outcome unknown. Now the worker
returns at once, leaving its pass running, and the finalizer lets the pass's writes be answered (for at
most ``Runtime.stop_grace()``: 3 x CGID_REQUEST_TIMEOUT and a margin) before it deletes what it owns.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from cgid_testkit.harness import ORG_NAME, World, world
from chainguard_identity_operator import naming

pytestmark = pytest.mark.timeout(60)


def cr(name: str, namespace: str = "shop", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


def identities_named(w: World, name: str) -> list[str]:
    return [uid for uid, identity in w.chainguard.identities.items() if identity["name"] == name]


@pytest.mark.parametrize("names", ["parent", "parentName"])
async def test_a_resource_deleted_during_a_slow_create_is_finalized_after_it_without_cancelling(
    caplog: pytest.LogCaptureFixture, names: str
) -> None:
    caplog.set_level(logging.INFO)
    async with world() as w:
        # The create is slow (answered normally, two seconds late): the pass is inside it at deletion.
        slow = w.chainguard.faults.add("POST", r"^/iam/v2/identities/", status=200, delay=2)
        # By name too: then status.parent, written at the end of the pass, is all that says where to look.
        await w.apply(cr("puller", **({"parent": w.org} if names == "parent" else {"parentName": ORG_NAME})))

        async def in_flight() -> bool:
            return slow.hits > 0

        await w.wait_for(in_flight, what="the create to reach Chainguard")
        loop = asyncio.get_running_loop()
        deleted_at = loop.time()
        await w.delete("shop", "puller")

        async def gone() -> bool:
            return await w.get("shop", "puller") is None

        await w.wait_for(gone, what="shop/puller to be finalized and removed", timeout=20)
        # The finalizer waited for the create's answer (2 s), and not for the whole grace.
        assert loop.time() - deleted_at < 2 + 3
        assert not identities_named(w, naming.identity_name("sandbox", "shop", "puller"))
        deleted = [e for e in await w.events("shop") if e["reason"] == "Deleted"]
        assert deleted, "the finalizer deleted the identity the pass had created"
    text = caplog.text
    assert "is cancelled" not in text
    assert "escalate" not in text.lower()
    assert "did not exit in time" not in text
