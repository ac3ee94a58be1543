"""Role and organization lookups: cached, and shared while under way (single flight)."""

from __future__ import annotations

import asyncio
import datetime
import logging
import traceback

import pytest

from chainguard_identity_operator.chainguard.types import Role
from chainguard_identity_operator.cli import quiet_logs
from chainguard_identity_operator.reconcile import LOOKUP_TTL, _Lookups

NOW = datetime.datetime(2026, 11, 23, 10, 0, tzinfo=datetime.UTC)


async def test_a_thousand_concurrent_lookups_of_one_role_ask_once() -> None:
    lookups, gate, calls = _Lookups(), asyncio.Event(), []

    async def fetch() -> list[Role]:
        calls.append(1)
        await gate.wait()
        return [Role(uid="1" * 40, name="registry.pull")]

    waiting = [asyncio.create_task(lookups.once("roles", "registry.pull", NOW, fetch)) for _ in range(1000)]
    await asyncio.sleep(0)  # let every task reach the lookup; the assertion is on the calls made
    gate.set()
    answers = await asyncio.gather(*waiting)
    assert len(calls) == 1
    assert {answer[0].uid for answer in answers} == {"1" * 40}
    # Cached for the TTL, then asked again.
    await lookups.once("roles", "registry.pull", NOW + LOOKUP_TTL, fetch)
    assert len(calls) == 1
    await lookups.once("roles", "registry.pull", NOW + LOOKUP_TTL + datetime.timedelta(seconds=1), fetch)
    assert len(calls) == 2


async def test_a_failed_lookup_fails_its_waiters_and_is_not_cached() -> None:
    lookups, gate, calls = _Lookups(), asyncio.Event(), []

    async def failing() -> list[Role]:
        calls.append(1)
        await gate.wait()
        raise RuntimeError("the API said no")

    waiting = [asyncio.create_task(lookups.once("roles", "viewer", NOW, failing)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert len(calls) == 1

    async def working() -> list[Role]:
        return []

    assert await lookups.once("roles", "viewer", NOW, working) == []


async def test_the_first_callers_cancellation_is_its_own_and_the_others_get_the_answer() -> None:
    # The first caller's pass may be cancelled at any await (its resource deleted) while others wait.
    lookups, gate, asking, asked = _Lookups(), asyncio.Event(), asyncio.Event(), []
    now = datetime.datetime(2026, 12, 2, tzinfo=datetime.UTC)

    async def fetch() -> str:
        asked.append(1)
        asking.set()
        await gate.wait()
        return "uidp"

    first = asyncio.create_task(lookups.once("role", "registry.pull", now, fetch))
    await asyncio.wait_for(asking.wait(), timeout=1)  # the first caller's fetch is under way
    joiner = asyncio.create_task(lookups.once("role", "registry.pull", now, fetch))
    first.cancel()
    await asyncio.wait({first})
    assert first.cancelled()
    gate.set()
    assert await asyncio.wait_for(joiner, timeout=1) == "uidp"
    assert asked == [1]
    # ... and the answer was cached for whoever asks next.
    assert await lookups.once("role", "registry.pull", now, fetch) == "uidp"
    assert asked == [1]


@pytest.mark.parametrize(("level", "quiet"), [("INFO", True), ("WARNING", True), ("DEBUG", False)])
def test_request_lines_are_logged_only_at_debug(level: str, quiet: bool) -> None:
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.NOTSET)
    quiet_logs(level)
    assert (logging.getLogger("httpx").level == logging.WARNING) is quiet


async def test_a_failed_lookup_shared_by_many_does_not_pile_their_frames_on_one_traceback() -> None:
    lookups, gate = _Lookups(), asyncio.Event()
    now = datetime.datetime(2026, 12, 2, tzinfo=datetime.UTC)

    async def fetch() -> str:
        await gate.wait()
        raise RuntimeError("Chainguard is away")

    waiters = [asyncio.create_task(lookups.once("role", "registry.pull", now, fetch)) for _ in range(50)]
    await asyncio.sleep(0)  # every waiter is parked on the one flight
    gate.set()
    await asyncio.wait(waiters)
    failure = waiters[-1].exception()
    assert isinstance(failure, RuntimeError)
    # The one exception object every waiter raised: its traceback is one waiter's, not fifty's.
    depth = len(traceback.extract_tb(failure.__traceback__))
    assert depth < 10, f"the waiters' frames piled up on the shared exception: {depth} entries"
