"""Review finding (issue 7 change): the operator's token source follows its own replacement only when
the ConfigMap write *answers*. A write that commits and loses its answer is never repeated (the next pass
sees the ConfigMap already right), so ``Runtime._published`` never runs, ``AssumedIdentity.follow`` is
never called, and the operator keeps exchanging for the replaced identity until that one expires — then
it is locked out until someone restarts it. FAILS while open."""

from __future__ import annotations

import datetime
import pathlib
from collections.abc import Mapping

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from cgid_testkit.chainguard import ChainguardEmulator
from cgid_testkit.harness import Clock
from cgid_testkit.kube import KubeEmulator
from cgid_testkit.memory import Driver, MemoryCluster
from chainguard_identity_operator.cluster import ConfigMapState, ObjectRef
from chainguard_identity_operator.cluster_errors import ClusterError
from chainguard_identity_operator.config import Settings

pytestmark = pytest.mark.timeout(120)

ISSUER = "https://kubernetes.default.svc.cluster.local"
OPERATOR_NAMESPACE = "chainguard-system"
OPERATOR_SA = "chainguard-identity-operator"
OWN_CONFIG_MAP = "operator-chainguard-identity"


class LosesOneAnswer(MemoryCluster):
    """The API server commits the first write of the operator's own ConfigMap that names a *new*
    identity, and the answer is lost (a timeout, as ``kubernetes`` raises it)."""

    def __init__(self, kube: KubeEmulator) -> None:
        super().__init__(kube)
        self.bootstrap: str | None = None
        self.lost: list[str] = []

    async def write_config_map(
        self, ref: ObjectRef, name: str, data: Mapping[str, str], current: ConfigMapState | None
    ) -> None:
        await super().write_config_map(ref, name, data, current)
        own = (ref.namespace, name) == (OPERATOR_NAMESPACE, OWN_CONFIG_MAP)
        if own and not self.lost and data["CHAINGUARD_IDENTITY"] != self.bootstrap:
            self.lost.append(data["CHAINGUARD_IDENTITY"])
            raise ClusterError(f"updating ConfigMap {ref.namespace}/{name}: ReadTimeoutError")


async def test_review_the_operator_follows_its_replacement_even_when_the_config_map_answer_is_lost(
    tmp_path: pathlib.Path,
) -> None:
    clock = Clock()
    kube = KubeEmulator(issuer=ISSUER, clock=clock)
    kube.add_service_account(OPERATOR_NAMESPACE, OPERATOR_SA)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    async with ChainguardEmulator(clock=clock, signing_key=key) as chainguard:
        org = chainguard.add_group("my-org.example", verified=True)
        own = chainguard.add_operator_identity(
            org,
            issuer=ISSUER,
            subject=f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SA}",
            jwks=kube.jwks(),
            expires=clock() + datetime.timedelta(days=30),
            description="made by hand (bootstrap)",
        )
        settings = Settings(
            cluster_name="review",
            api_url=chainguard.api_url,
            issuer_url=chainguard.sts_url,
            identity=own,
            identity_token_path=tmp_path / "token",
            identity_config_map=OWN_CONFIG_MAP,
            operator_namespace=OPERATOR_NAMESPACE,
            issuer=ISSUER,
            metrics_port=0,
            # The operator's own reading of the lifetime rule: replace rather than renew past 40 days.
            max_static_lifetime=datetime.timedelta(days=40),
        )
        cluster = LosesOneAnswer(kube)
        cluster.bootstrap = own
        driver = Driver(
            settings,
            cluster,
            clock=clock,
            token_path=tmp_path / "token",
            operator_namespace=OPERATOR_NAMESPACE,
            operator_service_account=OPERATOR_SA,
        )
        cluster.apply(
            OPERATOR_NAMESPACE,
            "operator",
            {
                "parent": org,
                "adopt": own,
                "serviceAccountName": OPERATOR_SA,
                "roles": ["viewer"],
                "deletionPolicy": "Orphan",
                "mode": "Static",
                "static": {"validFor": "720h", "renewBefore": "240h"},
            },
        )
        try:
            await driver.reconcile(OPERATOR_NAMESPACE, "operator")
            # Day 21: renewal is due, and renewing to day 51 would pass the 40-day limit: replacement.
            log: list[str] = []
            for day in range(21, 36):
                clock.advance(datetime.timedelta(days=1) if day > 21 else datetime.timedelta(days=21))
                driver.refresh_token(force=True)
                outcome = await driver.reconcile(OPERATOR_NAMESPACE, "operator")
                assert driver.runtime is not None
                assert driver.runtime.own_identity is not None
                reason = outcome.health.reason if outcome is not None else "crash"
                log.append(f"day {day}: {reason}, authenticates as {driver.runtime.own_identity.identity}")
        finally:
            await driver.stop()
        published = cluster.config_maps[(OPERATOR_NAMESPACE, OWN_CONFIG_MAP)]["data"]["CHAINGUARD_IDENTITY"]
        assert cluster.lost == [published]  # the fault happened: the successor was published, answer lost
        assert "authenticates as " + own not in log[-1], "\n".join(log)
