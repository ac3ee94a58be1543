"""Randomized schedules: faults, kills and edits across a resource's whole life, then the invariants.

Each schedule is drawn from a seeded generator: resources are created, edited (roles, mode, ConfigMap
name), renewed, replaced when the strict lifetime runs out, rotated by annotation, re-keyed when the
cluster's signing keys change, and deleted — while the Chainguard emulator fails a share of the requests
before they commit (503, 429 with Retry-After, 500, a dropped connection) or *after* (the write happens,
its answer is lost as a 500/502/504, a dropped connection or an answer held past the client's timeout),
reading the JWKS fails now and then, and the operator is killed after an arbitrary request and started
afresh with nothing in memory.

The operator is the real ``Runtime`` (reconcile, decide, fold, the Chainguard client and STS exchange of
its own token), driven one pass at a time by ``cgid_testkit.memory.Driver`` against an in-memory cluster,
so hundreds of schedules take seconds. After the faults stop and time passes the grace period, every
schedule must show: no duplicate identity, no orphan identity or binding, no resource without its
identity, every resource Ready or Stalled for a reason, no identity managed by two resources, and
every pod able to exchange its token. ``CGID_SCHEDULES`` runs more (the default keeps the suite fast).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import os
import pathlib
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from cgid_testkit.chainguard import ChainguardEmulator, Fault
from cgid_testkit.harness import Clock
from cgid_testkit.kube import KubeEmulator
from cgid_testkit.memory import Driver, IssuerServer, MemoryCluster, ssl_context
from chainguard_identity_operator import naming
from chainguard_identity_operator.config import Settings

pytestmark = pytest.mark.timeout(300)

SCHEDULES = int(os.environ.get("CGID_SCHEDULES", "200"))
STEPS = 24
ISSUER = "https://oidc.schedules.example"
NAMESPACE = "shop"
NAMES = ("alpha", "beta", "gamma")
OPERATOR_NAMESPACE = "chainguard-system"
OPERATOR_SA = "chainguard-identity-operator"
GRACE = datetime.timedelta(minutes=10)
TIMEOUT = datetime.timedelta(milliseconds=300)  # a held answer costs the client this much real time


@dataclasses.dataclass
class Tally:
    schedules: int = 0
    faults: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    crashes: int = 0
    steps: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    counts = Tally()
    yield counts
    print(
        f"\nschedules: {counts.schedules}, faults injected: {sum(counts.faults.values())} "
        f"({dict(counts.faults)}), operator kills: {counts.crashes}, steps: {dict(counts.steps)}"
    )


def fault_policy(rng: random.Random, rate: float) -> Any:
    def policy(method: str, path: str) -> Fault | None:
        if rng.random() >= rate:
            return None
        if method == "GET":
            return rng.choice([Fault(status=503), Fault(status=500), Fault(status=429, retry_after=1)])
        choices = [
            Fault(status=503),
            Fault(status=429, retry_after=2),
            Fault(status=500),  # before the handler: nothing happened, but the client cannot know
            Fault(lose="drop"),
            Fault(status=504, after_commit=True),
            Fault(status=502, after_commit=True),
            Fault(status=500, after_commit=True),
            Fault(after_commit=True, lose="drop"),
        ]
        if rng.random() < 0.1:
            choices = [Fault(after_commit=True, lose="hold", delay=TIMEOUT.total_seconds() * 2)]
        return rng.choice(choices)

    return policy


def random_spec(rng: random.Random) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "parent": "",  # filled in with the organization
        "mode": rng.choice(["Static", "Static", "ClaimMatch"]),
        "roles": rng.sample(["registry.pull", "viewer", "apk.pull"], rng.randint(1, 2)),
        "static": {"validFor": rng.choice(["720h", "240h"])},
    }
    if rng.random() < 0.3:
        spec["configMap"] = {"name": rng.choice(["published", "published-2"])}
    if rng.random() < 0.05:
        spec["roles"] = ["owner"]  # not allowed: Stalled with the reason, nothing lost
    return spec


class Schedule:
    def __init__(
        self, seed: int, kube: KubeEmulator, kube_url: str, key: rsa.RSAPrivateKey, workdir: pathlib.Path
    ) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.kube = kube
        self.kube_url = kube_url
        self.key = key
        self.workdir = workdir
        self.clock = Clock()
        self.deleting: set[str] = set()

    async def run(self, tally: Tally) -> None:
        self.kube.clock = self.clock
        async with ChainguardEmulator(clock=self.clock, signing_key=self.key) as chainguard:
            chainguard.issuer_routes[ISSUER] = self.kube_url
            self.chainguard = chainguard
            org = chainguard.add_group("my-org.example", verified=True)
            chainguard.add_repo(org, "python")
            own = chainguard.add_identity(
                org,
                {
                    "name": "chainguard-identity-operator",
                    "claimMatch": {
                        "issuer": ISSUER,
                        "subject": f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SA}",
                    },
                },
            )
            chainguard.bind(own, org, "owner")
            self.org, self.own = org, own
            cluster = MemoryCluster(self.kube)
            self.cluster = cluster
            settings = Settings(
                cluster_name="schedules",
                api_url=chainguard.api_url,
                issuer_url=chainguard.sts_url,
                identity=own,
                identity_token_path=self.workdir / "token",
                issuer=ISSUER,
                resync_interval=datetime.timedelta(minutes=10),
                request_timeout=TIMEOUT,
                replacement_grace=GRACE,
                metrics_port=0,
            )
            driver = Driver(
                settings,
                cluster,
                clock=self.clock,
                token_path=self.workdir / "token",
                operator_namespace=OPERATOR_NAMESPACE,
                operator_service_account=OPERATOR_SA,
            )
            self.driver = driver
            try:
                chainguard.faults.policy = fault_policy(self.rng, rate=self.rng.choice([0.1, 0.25, 0.4]))
                for _ in range(STEPS):
                    await self.step(tally)
                chainguard.faults.policy = None
                tally.faults.update(
                    f"{f.kind}{' after commit' if f.after_commit else ''}" for f in chainguard.faults.injected
                )
                self.cluster.jwks_failing = False
                await self.settle()
                self.clock.advance(GRACE + datetime.timedelta(minutes=1))
                await self.settle()
                await self.check()
                await self.delete_everything()
            finally:
                tally.crashes += driver.crashes
                await driver.stop()

    # -- the schedule --------------------------------------------------------------------------------

    async def step(self, tally: Tally) -> None:
        rng = self.rng
        live = [n for n in NAMES if (NAMESPACE, n) in self.cluster.resources]
        kind = rng.choices(
            ["apply", "pass", "pass", "pass", "advance", "rotate-keys", "delete", "kill", "annotate", "jwks"],
            weights=[3, 4, 4, 4, 2, 1, 1, 2, 1, 1],
        )[0]
        tally.steps[kind] += 1
        if kind == "apply":
            name = rng.choice(NAMES)
            if name in self.deleting:
                return
            spec = random_spec(rng)
            spec["parent"] = self.org
            self.cluster.apply(NAMESPACE, name, spec)
        elif kind == "pass":
            for name in live:
                await self.one_pass(name)
        elif kind == "advance":
            self.clock.advance(
                rng.choice(
                    [
                        datetime.timedelta(minutes=1),
                        GRACE,
                        datetime.timedelta(days=rng.randint(5, 25)),
                        datetime.timedelta(days=rng.randint(60, 200)),  # towards the strict lifetime
                    ]
                )
            )
        elif kind == "rotate-keys":
            self.kube.rotate_signing_key(keep_previous=rng.random() < 0.5)
        elif kind == "delete" and live:
            self.deleting.add(rng.choice(live))
        elif kind == "kill":
            self.driver.crash_after(rng.randint(1, 6))
        elif kind == "annotate" and live:
            name = rng.choice(live)
            self.cluster.apply(
                NAMESPACE,
                name,
                self.cluster.resources[(NAMESPACE, name)]["spec"],
                {"iam.chainguard.dev/rotate": str(rng.randint(1, 10**6))},
            )
        elif kind == "jwks":
            self.cluster.jwks_failing = not self.cluster.jwks_failing
            if self.driver.runtime is not None:
                await self.driver.runtime.facts.refresh()

    async def one_pass(self, name: str) -> None:
        if name in self.deleting:
            if await self.driver.finalize(NAMESPACE, name):
                self.deleting.discard(name)
            return
        await self.driver.reconcile(NAMESPACE, name)

    async def settle(self) -> None:
        """Passes until every resource is quiet (nothing written) and every deletion finished."""
        last: dict[str, object] = {}
        self.driver.refresh_token(force=True)  # the kubelet, some minutes on, after a key rotation
        for _ in range(20):
            if self.driver.runtime is not None:
                await self.driver.runtime.facts.refresh()  # what the poller does a few seconds on
            quiet = True
            for name in NAMES:
                if (NAMESPACE, name) not in self.cluster.resources:
                    continue
                if name in self.deleting:
                    quiet = False
                    await self.one_pass(name)
                    continue
                outcome = await self.driver.reconcile(NAMESPACE, name)
                if outcome is None or outcome.patch or outcome.events or outcome.transient:
                    quiet = False
                    last[name] = outcome and (outcome.health, outcome.patch, outcome.events)
            if quiet:
                return
        pytest.fail(f"seed {self.seed}: the operator did not settle after the faults stopped: {last}")

    # -- the invariants ----------------------------------------------------------------------------------

    async def check(self) -> None:
        seed = f"seed {self.seed}"
        identities = self.chainguard.identities
        bindings = self.chainguard.role_bindings
        marked: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
        for uid, stored in identities.items():
            owner = naming.parse_marker(stored.get("description", ""))
            if owner is not None:
                marked[(owner.namespace, owner.name)].append(uid)
        live = {name for (_ns, name) in self.cluster.resources}
        for (namespace, name), uids in marked.items():
            assert name in live, f"{seed}: orphan identities {uids} of deleted {namespace}/{name}"
            status = self.cluster.resources[(namespace, name)].get("status") or {}
            stalled = any(c["type"] == "Stalled" and c["status"] == "True" for c in status["conditions"])
            # Stalled on a spec it cannot satisfy, a resource changes nothing (what it owns is removed
            # when it is fixed or deleted: see ``delete_everything``); otherwise it owns exactly one.
            if not stalled:
                assert len(uids) == 1, f"{seed}: {namespace}/{name} owns {len(uids)} identities: {uids}"
        for uid, binding in bindings.items():
            assert binding["identity"]["uid"] in identities, f"{seed}: orphan binding {uid}"
        named_by: dict[str, str] = {}
        for name in sorted(live):
            obj = self.cluster.resources[(NAMESPACE, name)]
            status = obj.get("status") or {}
            ready = next(c for c in status["conditions"] if c["type"] == "Ready")
            stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
            assert ready["status"] == "True" or (stalled["status"] == "True" and stalled["reason"]), (
                f"{seed}: {name} is neither Ready nor Stalled for a reason: {ready}"
            )
            uid = status.get("identityId")
            if ready["status"] != "True":
                continue
            assert uid in identities, f"{seed}: {name} is Ready without its identity {uid}"
            assert marked[(NAMESPACE, name)] == [uid], f"{seed}: {name} status and marker disagree"
            assert uid not in named_by, f"{seed}: {uid} is managed by {named_by[uid]} and {name}"
            named_by[uid] = name
            published = self.cluster.config_maps[(NAMESPACE, status["configMapName"])]["data"]
            assert published["CHAINGUARD_IDENTITY"] == uid, f"{seed}: {name}'s ConfigMap is stale"
            spec_roles = set(obj["spec"]["roles"])
            bound = {b["role"]["name"] for b in bindings.values() if b["identity"]["uid"] == uid}
            assert bound == spec_roles, f"{seed}: {name} has roles {bound}, wants {spec_roles}"
            assert await self.exchange(uid), f"{seed}: {name}'s pod cannot exchange for {uid}"
        assert await self.exchange(self.own, OPERATOR_NAMESPACE, OPERATOR_SA), (
            f"{seed}: the operator is locked out"
        )

    async def delete_everything(self) -> None:
        """Delete every resource: nothing of theirs may be left in Chainguard, Stalled or not."""
        seed = f"seed {self.seed}"
        self.deleting |= {name for (_ns, name) in self.cluster.resources}
        for _ in range(10):
            for name in sorted(self.deleting):
                await self.one_pass(name)
        assert not self.cluster.resources, f"{seed}: deletions did not finish: {sorted(self.deleting)}"
        left = [
            uid
            for uid, stored in self.chainguard.identities.items()
            if naming.parse_marker(stored.get("description", "")) is not None
        ]
        assert not left, f"{seed}: identities left behind after deleting every resource: {left}"
        for uid, binding in self.chainguard.role_bindings.items():
            assert binding["identity"]["uid"] in self.chainguard.identities, f"{seed}: orphan binding {uid}"

    async def exchange(self, identity: str, namespace: str = NAMESPACE, sa: str = "default") -> bool:
        token = self.kube.mint_token(namespace, sa, audiences=["issuer.enforce.dev"], expiration_seconds=600)
        async with httpx.AsyncClient(timeout=5, verify=ssl_context()) as client:
            response = await client.post(
                f"{self.chainguard.sts_url}/sts/exchange",
                data={"aud": "https://console-api.enforce.dev", "identity": identity},
                headers={"Authorization": f"Bearer {token}"},
            )
        return response.status_code == 200


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize("batch", range(4))
async def test_random_schedules_keep_every_invariant(
    batch: int, tally: Tally, signing_key: rsa.RSAPrivateKey, tmp_path: pathlib.Path
) -> None:
    kube = KubeEmulator(issuer=ISSUER)  # its keys, tokens and service accounts; it serves nothing here
    kube.add_namespace(NAMESPACE)
    kube.add_service_account(OPERATOR_NAMESPACE, OPERATOR_SA)
    ran = 0
    async with IssuerServer(kube) as issuer:
        for seed in range(batch, SCHEDULES, 4):
            await Schedule(seed, kube, issuer.url, signing_key, tmp_path).run(tally)
            ran += 1
    tally.schedules += ran
    assert ran == len(range(batch, SCHEDULES, 4))
