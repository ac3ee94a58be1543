"""A simulated year and a half under the strict lifetime rule: every exchange keeps working, and the
operator outlives its own identity.

The Chainguard emulator's default is the strict reading of the v2 protos: a static identity may not
live past its creation time plus 365 days, and an update that would move it further is refused. So
every static identity — the tenants' and the operator's own, which it adopted at bootstrap and
authenticates as — must be replaced once per lifetime, and the operator must follow its own
replacement (through the ConfigMap its own resource writes) before the old identity is deleted.

The year is stepped a day at a time with the real ``Runtime`` (``cgid_testkit.memory.Driver``): each
step reconciles every resource once and then checks that a pod of every resource, and the operator
itself, can exchange a fresh projected token at the STS for the identity its ConfigMap names. Along
the way the cluster rotates its signing keys six times, the operator is restarted four times, and the
Chainguard API is down for 24 hours twice (the STS stays up, as it is a separate service).
"""

from __future__ import annotations

import collections
import datetime
import json
import pathlib

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from cgid_testkit.chainguard import ChainguardEmulator, Fault
from cgid_testkit.harness import Clock
from cgid_testkit.kube import KubeEmulator
from cgid_testkit.memory import Driver, MemoryCluster, ssl_context
from chainguard_identity_operator.config import Settings

pytestmark = pytest.mark.timeout(240)

ISSUER = "https://kubernetes.default.svc.cluster.local"  # private: the STS cannot reach it
OPERATOR_NAMESPACE = "chainguard-system"
OPERATOR_SA = "chainguard-identity-operator"
OWN_CONFIG_MAP = "operator-chainguard-identity"
STEP = datetime.timedelta(days=1)
DAYS = 540
ROTATIONS = {60, 120, 180, 240, 300, 420}  # days on which the cluster's signing key rotates
RESTARTS = {45, 170, 330, 350}
OUTAGES = {(100, 101), (352, 353)}  # [start, end) in days: the API answers 503, the STS still works
STATIC = {"mode": "Static", "static": {"validFor": "720h", "renewBefore": "240h"}}


async def test_a_year_and_a_half_under_the_strict_rule(tmp_path: pathlib.Path) -> None:
    clock = Clock()
    kube = KubeEmulator(issuer=ISSUER, clock=clock)
    for namespace in ("shop", "default"):
        kube.add_namespace(namespace)
    kube.add_service_account(OPERATOR_NAMESPACE, OPERATOR_SA)
    kube.add_service_account("default", "builder")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    async with (
        ChainguardEmulator(clock=clock, signing_key=key) as chainguard,
        httpx.AsyncClient(timeout=5, verify=ssl_context()) as http,
    ):
        assert chainguard.max_lifetime_from_creation  # the strict reading is the default
        org = chainguard.add_group("my-org.example", verified=True)
        chainguard.add_repo(org, "python")
        # The private-cluster bootstrap: a static identity made by hand from the cluster's JWKS.
        own = chainguard.add_operator_identity(
            org,
            issuer=ISSUER,
            subject=f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SA}",
            jwks=kube.jwks(),
            expires=clock() + datetime.timedelta(days=30),
            description="made by hand (bootstrap)",
        )
        settings = Settings(
            cluster_name="year",
            api_url=chainguard.api_url,
            issuer_url=chainguard.sts_url,
            identity=own,
            identity_token_path=tmp_path / "token",
            identity_config_map=OWN_CONFIG_MAP,
            operator_namespace=OPERATOR_NAMESPACE,
            issuer=ISSUER,
            metrics_port=0,
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
        resources = {
            (OPERATOR_NAMESPACE, "operator"): {
                "parent": org,
                "adopt": own,
                "serviceAccountName": OPERATOR_SA,
                "roles": ["viewer"],
                "deletionPolicy": "Orphan",
                **STATIC,
            },
            ("shop", "puller"): {"parent": org, **STATIC},
            ("default", "builder"): {"parent": org, "serviceAccountName": "builder", **STATIC},
        }
        for (namespace, name), spec in resources.items():
            cluster.apply(namespace, name, spec)

        async def exchange(namespace: str, service_account: str, identity: str) -> bool:
            token = kube.mint_token(namespace, service_account, audiences=["issuer.enforce.dev"])
            response = await http.post(
                f"{chainguard.sts_url}/sts/exchange",
                data={"aud": "https://console-api.enforce.dev", "identity": identity},
                headers={"Authorization": f"Bearer {token}"},
            )
            return response.status_code == 200

        outcomes: collections.Counter[str] = collections.Counter()
        failures: list[str] = []
        try:
            steps = int(datetime.timedelta(days=DAYS) / STEP)
            for step in range(steps):
                if step:
                    clock.advance(STEP)
                day = step * STEP / datetime.timedelta(days=1)
                # The kubelet refreshes the operator's projected token (1 h, at 80 %); a rotation then
                # happens between two polls of the JWKS, so the next pass still holds an old-key token.
                driver.refresh_token()
                if day in ROTATIONS:
                    kube.rotate_signing_key(keep_previous=True)
                if day - 1 in ROTATIONS:
                    kube.retire_previous_keys()  # the overlap is over: old tokens stop verifying
                if day in RESTARTS:
                    await driver.restart()
                down = any(start <= day < end for start, end in OUTAGES)
                chainguard.faults.policy = _api_down if down else None
                if driver.runtime is not None:
                    await driver.runtime.facts.refresh()  # what the poller does every few minutes
                for namespace, name in resources:
                    await driver.reconcile(namespace, name)
                chainguard.faults.policy = None
                for (namespace, name), spec in resources.items():
                    published = cluster.config_maps.get((namespace, f"{name}-chainguard-identity"))
                    if published is None:
                        failures.append(f"day {day}: {namespace}/{name} has no ConfigMap")
                        continue
                    identity = published["data"]["CHAINGUARD_IDENTITY"]
                    account = spec.get("serviceAccountName", "default")
                    ok = await exchange(namespace, str(account), identity)
                    outcomes["ok" if ok else "failed"] += 1
                    if not ok:
                        failures.append(f"day {day}: {namespace}/{name}'s pod cannot exchange for {identity}")
                # The operator itself: its own token, for the identity it follows.
                assert driver.runtime is not None
                assert driver.runtime.own_identity is not None
                own_now = driver.runtime.own_identity.identity
                ok = await exchange(OPERATOR_NAMESPACE, OPERATOR_SA, own_now)
                outcomes["operator ok" if ok else "operator failed"] += 1
                if not ok:
                    failures.append(f"day {day}: the operator cannot exchange for its own {own_now}")
        finally:
            await driver.stop()

        print(f"\n{steps} steps over {DAYS} days: {dict(outcomes)}")  # the figures of the run
        assert not failures, "\n".join(failures[:20])
        creates = [
            r for r in chainguard.requests if r.method == "POST" and r.path.startswith("/iam/v2/identities/")
        ]
        committed = [r for r in creates if r.status == 200]
        # Three static identities (the operator's own and two tenants') each live one lifetime of 365
        # days from creation and are replaced once in 540 days. So: two tenant identities created at the
        # start, and one replacement for each of the three.
        assert len(committed) == 2 + 3, [r.path for r in committed]
        own_now = cluster.config_maps[(OPERATOR_NAMESPACE, OWN_CONFIG_MAP)]["data"]["CHAINGUARD_IDENTITY"]
        assert own_now != own  # the operator's identity was replaced ...
        assert own not in chainguard.identities  # ... and the old one deleted once it moved on
        owner_role = chainguard.builtin_role_uid("owner")
        assert any(
            b["identity"]["uid"] == own_now and b["role"]["uid"] == owner_role
            for b in chainguard.role_bindings.values()
        ), "the replacement of the operator's identity must keep the owner role it inherited"
        refused = [r for r in chainguard.requests if r.method == "PATCH" and r.status == 400]
        assert refused == [], "a renewal past the lifetime is a replacement, never a refused update"


def _api_down(method: str, path: str) -> Fault | None:
    return None if path.startswith("/sts/") else Fault(status=503)


def _json(value: object) -> str:
    return json.dumps(value)
