"""Review finding (issue 7 change): a pass cancelled while a create is in flight (kopf cancels a daemon
``cancellation_timeout`` seconds after its object is marked for deletion) leaves an identity the
directory does not know about — CancelledError is not among ``health.FAILURES``, so nothing invalidates
the parent — and the finalizer that runs next lists the parent from that cached listing, finishes, and the
identity (with no resource left to find it) is orphaned forever. FAILS while open."""

from __future__ import annotations

import asyncio
import datetime
import json
import pathlib

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from cgid_testkit.chainguard import ChainguardEmulator
from cgid_testkit.harness import Clock
from cgid_testkit.kube import KubeEmulator
from cgid_testkit.memory import Driver, MemoryCluster
from chainguard_identity_operator.config import Settings

pytestmark = pytest.mark.timeout(60)

ISSUER = "https://kubernetes.default.svc.cluster.local"
OPERATOR_NAMESPACE = "chainguard-system"
OPERATOR_SA = "chainguard-identity-operator"


async def test_review_a_create_cancelled_in_flight_is_not_orphaned_by_the_finalizer(
    tmp_path: pathlib.Path,
) -> None:
    clock = Clock()
    kube = KubeEmulator(issuer=ISSUER, clock=clock)
    kube.add_namespace("shop")
    kube.add_service_account(OPERATOR_NAMESPACE, OPERATOR_SA)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    async with ChainguardEmulator(clock=clock, signing_key=key) as chainguard:
        org = chainguard.add_group("my-org.example", verified=True)
        own = chainguard.add_identity(
            org,
            {
                "name": "chainguard-identity-operator",
                "description": "bootstrap",
                "staticKeys": {
                    "issuer": ISSUER,
                    "subject": f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SA}",
                    "issuerKeys": json.dumps(kube.jwks()),
                    "expirationTime": (clock() + datetime.timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                },
            },
        )
        chainguard.bind(own, org, "owner")
        settings = Settings(
            cluster_name="review",
            api_url=chainguard.api_url,
            issuer_url=chainguard.sts_url,
            identity=own,
            identity_token_path=tmp_path / "token",
            operator_namespace=OPERATOR_NAMESPACE,
            issuer=ISSUER,
            metrics_port=0,
            request_timeout=datetime.timedelta(seconds=5),
        )
        cluster = MemoryCluster(kube)
        driver = Driver(
            settings,
            cluster,
            clock=clock,
            token_path=tmp_path / "token",
            operator_namespace=OPERATOR_NAMESPACE,
            operator_service_account=OPERATOR_SA,
        )
        runtime = await driver.start()
        try:
            # A first resource warms the parent's listing, as any busy organization has it.
            cluster.apply("shop", "other", {"parent": org, "mode": "Static"})
            await driver.reconcile("shop", "other")
            cluster.apply("shop", "puller", {"parent": org, "mode": "Static"})
            before = set(chainguard.identities)
            chainguard.faults.add("POST", r"^/iam/v2/identities/", after_commit=True, lose="hold", delay=3)
            task = asyncio.create_task(runtime.run_once(cluster.body("shop", "puller")))
            for _ in range(200):
                if set(chainguard.identities) - before:
                    break
                await asyncio.sleep(0.01)
            made = set(chainguard.identities) - before
            assert made, "the create did not commit"
            # The object is deleted; kopf stops the daemon and cancels the pass still waiting for the answer.
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await driver.finalize("shop", "puller")
        finally:
            await driver.stop()
        left = [uid for uid in made if uid in chainguard.identities]
        assert not left, f"identity {left} of the deleted shop/puller is orphaned in Chainguard"
