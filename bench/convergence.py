"""Convergence, API-call and memory figures for the operator, measured against both emulators.

Run: ``make bench`` (or ``.venv/bin/python bench/convergence.py --identities 50``). It prints figures and
asserts nothing: performance is measured here, not asserted in the test suite.

What it measures, for N ChainguardIdentities split between ClaimMatch and Static:
- time from applying all of them to all being Ready, and the p50/p95 per identity;
- Chainguard API requests per identity to converge, and for one full resync of all of them
  (the bulk directory should make a resync cost O(parents), not O(N));
- Chainguard writes caused by one cluster signing-key rotation (should be one per Static identity);
- peak resident memory of the whole process (operator and both emulators) while doing so.

Read the timings with care: the emulators share this process (and its GIL) with the operator, and
kmock matches every request against every request it has recorded so far, so past a few dozen
identities the wall-clock figures measure the Kubernetes emulator more than the operator. The API
call counts do not depend on that.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import resource
import statistics
import time
from typing import Any

from cgid_testkit.harness import World, world


def _cr(index: int, org: str) -> dict[str, Any]:
    mode = "Static" if index % 2 else "ClaimMatch"
    return {
        "metadata": {"name": f"bench-{index:04d}", "namespace": "shop"},
        "spec": {"parent": org, "mode": mode, "roles": ["registry.pull"]},
    }


async def _ready_times(w: World, names: list[str], started: float) -> dict[str, float]:
    """When each resource first reported Ready. One LIST per poll: polling must not starve the
    emulators, which share this process with the operator."""
    ready: dict[str, float] = {}

    async def all_ready() -> bool:
        async with w.client() as client:
            response = await client.get(
                "/apis/iam.chainguard.dev/v1alpha1/namespaces/shop/chainguardidentities"
            )
        for item in response.json().get("items", []):
            conditions = (item.get("status") or {}).get("conditions", [])
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                ready.setdefault(item["metadata"]["name"], time.perf_counter() - started)
        return all(name in ready for name in names)

    await w.wait_for(all_ready, timeout=600, what="every identity to be Ready")
    return ready


def _by_kind(requests: list[Any]) -> str:
    counts = collections.Counter(
        f"{r.method} {r.path.split('/')[3] if r.path.count('/') >= 3 else r.path}" for r in requests
    )
    return ", ".join(f"{key}: {value}" for key, value in sorted(counts.items()))


async def run(identities: int) -> None:
    async with world() as w:
        names = [f"bench-{i:04d}" for i in range(identities)]
        mark = len(w.chainguard.requests)
        started = time.perf_counter()
        for index in range(identities):
            await w.apply(_cr(index, w.org))
        ready = await _ready_times(w, names, started)
        converge = w.chainguard.requests[mark:]
        total = max(ready.values())
        per = sorted(ready.values())
        print(f"identities                     {identities} (half ClaimMatch, half Static)")
        print(f"all Ready after                {total:.2f} s")
        print(
            f"time to Ready p50 / p95        {statistics.median(per):.2f} s / {per[int(0.95 * (len(per) - 1))]:.2f} s"
        )
        print(
            f"API requests to converge       {len(converge)} ({len(converge) / identities:.1f} per identity)"
        )
        print(f"  by kind                      {_by_kind(converge)}")

        # One resync of everything: every listing is stale, every worker runs a pass.
        await asyncio.sleep(0.5)
        mark = len(w.chainguard.requests)
        patches = w.status_patches()
        w.advance(w.settings.resync_interval)

        async def resynced() -> bool:
            return w.status_patches() >= patches + identities

        await w.wait_for(resynced, timeout=120, what="every identity's resync pass")
        resync = w.chainguard.requests[mark:]
        print(
            f"API requests for one resync    {len(resync)} for {identities} identities ({_by_kind(resync)})"
        )

        # One signing-key rotation of the cluster. The old fingerprint is read before rotating: read after,
        # a fast operator may already have moved on.
        static = [n for i, n in enumerate(names) if i % 2]
        old = ((await w.get("shop", static[0])) or {})["status"]["keys"]["fingerprint"]
        mark = len(w.chainguard.requests)
        w.kube.rotate_signing_key()
        await w.poll_cluster()

        async def rekeyed() -> bool:
            async with w.client() as client:
                response = await client.get(
                    "/apis/iam.chainguard.dev/v1alpha1/namespaces/shop/chainguardidentities"
                )
            keys = {
                i["metadata"]["name"]: i["status"]["keys"]["fingerprint"]
                for i in response.json()["items"]
                if i["metadata"]["name"] in static
            }
            return len(keys) == len(static) and old not in keys.values()

        await w.wait_for(rekeyed, timeout=120, what="every Static identity's new keys")
        writes = [r for r in w.chainguard.requests[mark:] if r.method == "PATCH"]
        print(f"writes for one key rotation    {len(writes)} for {len(static)} Static identities")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    print(f"peak RSS of the process        {peak:.0f} MiB (operator, both emulators and the client together)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--identities", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(run(args.identities))


if __name__ == "__main__":
    main()
