"""Review findings (issue 7 change): failures that leave something behind. Each test FAILS while open."""

from __future__ import annotations

import pytest
from test_tenancy import cr, resync

from cgid_testkit.harness import World
from chainguard_identity_operator.cluster_errors import ClusterError

pytestmark = pytest.mark.timeout(60)


async def test_review_a_failed_delete_of_the_old_config_map_is_retried_not_forgotten(sandbox: World) -> None:
    """Rename spec.configMap.name; the new ConfigMap is written, deleting the old one fails once (a
    Kubernetes 500). The failed pass still records status.configMapName = the new name (next_status sets it
    whenever observed.config_map is not None), so no later pass knows the old name: it stays forever,
    naming an identity that the next replacement deletes."""
    w = sandbox
    await w.apply(cr("puller", parent=w.org))
    await w.wait_ready("shop", "puller")
    assert await w.config_map("shop", "puller-chainguard-identity") is not None
    assert w.runtime is not None
    cluster = w.runtime.cluster
    real_delete = cluster.delete_config_map
    failures: list[str] = []

    async def flaky_delete(ref, name):  # type: ignore[no-untyped-def]
        if not failures:
            failures.append(name)
            raise ClusterError(
                f"deleting ConfigMap {ref.namespace}/{name}: Kubernetes API answered 500", status=500
            )
        await real_delete(ref, name)

    cluster.delete_config_map = flaky_delete  # type: ignore[method-assign]
    await w.apply(cr("puller", parent=w.org, configMap={"name": "renamed"}))

    async def renamed() -> bool:
        return await w.config_map("shop", "renamed") is not None and bool(failures)

    await w.wait_for(renamed, what="the new ConfigMap, and one failed delete of the old")
    await resync(w, resources=1, rounds=3)
    obj = await w.get("shop", "puller")
    assert obj is not None
    assert failures == ["puller-chainguard-identity"]
    assert await w.config_map("shop", "puller-chainguard-identity") is None, (
        f"the old ConfigMap survives; status.configMapName={obj['status'].get('configMapName')!r}"
    )
