"""The real client against the emulator under seeded random faults: a write is never applied twice.

A seeded policy decides per request whether it fails before the handler (503, 429, 500) or after it
committed (the answer lost as a 500/502/504, or the connection dropped). The callers here do what
the contract asks of the operator: look the object up before (re)writing it, and adopt what a lost
answer already created. Whatever the faults, each identity and each binding must exist exactly once,
and the emulator must have committed exactly one create for each. Sleeping is injected, so the
retries cost no time.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from cgid_testkit.chainguard import ChainguardEmulator, Fault
from chainguard_identity_operator.chainguard import (
    ChainguardClient,
    ChainguardError,
    ClaimMatch,
    Identity,
    OutcomeUnknown,
    RetryPolicy,
    RoleBinding,
)

ISSUER = "https://oidc.cluster.example"
NAMES = [f"team-{index}.puller" for index in range(12)]
T = TypeVar("T")


class RootToken:
    def __init__(self, token: str) -> None:
        self._token = token

    async def token(self) -> str:
        return self._token

    def invalidate(self) -> None:
        pass


def seeded_policy(seed: int) -> Callable[[str, str], Fault | None]:
    rng = random.Random(seed)

    def policy(method: str, path: str) -> Fault | None:
        roll = rng.random()
        if method == "GET":
            if roll < 0.15:
                return Fault(status=rng.choice([500, 502, 503, 504]))
            if roll < 0.2:
                return Fault(status=429, retry_after=1)
            return None
        if roll < 0.15:
            return Fault(status=rng.choice([503, 429]), retry_after=rng.choice([None, 2]))
        if roll < 0.25:
            return Fault(status=500)  # refused before the handler: nothing happened, but who knows
        if roll < 0.4:
            return Fault(status=rng.choice([500, 502, 504]), after_commit=True)
        if roll < 0.5:
            return Fault(after_commit=True, lose="drop")
        return None

    return policy


@pytest.fixture(scope="module")
def emulator_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def cg(emulator_key: rsa.RSAPrivateKey) -> AsyncIterator[ChainguardEmulator]:
    async with ChainguardEmulator(signing_key=emulator_key) as emulator:
        yield emulator


async def until_settled(step: Callable[[], Awaitable[T]], unknown: list[OutcomeUnknown]) -> T:
    """Repeat ``step`` the way the operator's next passes would, at most 50 times."""
    for _ in range(50):
        try:
            return await step()
        except OutcomeUnknown as error:
            unknown.append(error)  # the next pass looks before it writes
        except ChainguardError as error:
            if not error.transient:
                raise
    raise AssertionError("never settled")


async def ensure_identity(
    client: ChainguardClient, parent: str, name: str, unknown: list[OutcomeUnknown]
) -> Identity:
    async def step() -> Identity:
        found = await client.list_identities(parent, name=name)  # look before writing
        if found:
            return found[0]
        claim_match = ClaimMatch(issuer=ISSUER, subject=f"system:serviceaccount:{name}")
        return await client.create_identity(parent, Identity(uid="", name=name, claim_match=claim_match))

    return await until_settled(step, unknown)


async def ensure_binding(
    client: ChainguardClient, parent: str, identity: str, role: str, unknown: list[OutcomeUnknown]
) -> RoleBinding:
    async def step() -> RoleBinding:
        found = await client.find_role_binding(parent, identity=identity, role=role)
        if found is not None:
            return found  # adopt what a lost answer created
        return await client.create_role_binding(parent, identity=identity, role=role)

    return await until_settled(step, unknown)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_no_write_is_applied_twice_under_random_faults(cg: ChainguardEmulator, seed: int) -> None:
    org = cg.add_group("my-org.example")
    role = cg.builtin_role_uid("registry.pull")
    cg.faults.policy = seeded_policy(seed)
    cg.faults.forbid_fresh(requests=1)  # and every new identity's first bind is refused as propagating
    sleeps: list[float] = []
    unknown: list[OutcomeUnknown] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    async with ChainguardClient(
        cg.api_url,
        RootToken(cg.mint_api_token("admin@example.com")),
        retry=RetryPolicy(attempts=3),
        sleep=sleep,
    ) as client:
        for name in NAMES:
            identity = await ensure_identity(client, org, name, unknown)
            await ensure_binding(client, org, identity.uid, role, unknown)

    injected = cg.faults.injected
    lost = [fault for fault in injected if fault.after_commit and fault.method != "GET"]
    print(f"seed {seed}: {len(injected)} faults injected, {len(lost)} committed writes lost their answer")
    assert lost  # the seed exercised lost answers ...
    assert len(unknown) >= len(lost)  # ... and the client never took one for a failure to re-send
    assert {error.cause for error in unknown} <= {"HTTP 500", "HTTP 502", "HTTP 504", "RemoteProtocolError"}
    assert sorted(identity["name"] for identity in cg.identities.values()) == sorted(NAMES)
    bound = sorted((b["identityUid"], b["roleUid"]) for b in cg.role_bindings.values())
    assert bound == sorted((uid, role) for uid in cg.identities)
    assert cg.writes() == {"identity.create": len(NAMES), "role_binding.create": len(NAMES)}
    assert sleeps  # retries happened, through the injected sleep
