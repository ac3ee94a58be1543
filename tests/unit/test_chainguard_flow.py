"""Flow control toward Chainguard: calls in flight are bounded before httpx, cancellation under
contention leaks nothing, and a Retry-After pauses the whole client."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from cgid_testkit.chainguard import ChainguardEmulator
from chainguard_identity_operator.chainguard.client import ChainguardClient, RetryPolicy
from chainguard_identity_operator.chainguard.flow import FlowControl

ORG = "c95870ebffa72a258df087ea727ee92daf177e29"


class StaticToken:
    def __init__(self, token: str = "t") -> None:
        self._token = token

    async def token(self) -> str:
        return self._token

    def invalidate(self) -> None:
        pass


class GatedTransport(httpx.AsyncBaseTransport):
    """Answers every request once the gate opens, and counts how many it holds at once."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.held = 0
        self.most = 0
        self.answered = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.held += 1
        self.most = max(self.most, self.held)
        try:
            await self.gate.wait()
        finally:
            self.held -= 1
        self.answered += 1
        return httpx.Response(200, content=json.dumps({"roles": []}).encode())


async def test_no_more_calls_reach_httpx_than_the_limit() -> None:
    transport = GatedTransport()
    async with ChainguardClient(
        "https://api.test", StaticToken(), transport=transport, max_in_flight=5
    ) as client:
        calls = [asyncio.create_task(client.find_roles("viewer")) for _ in range(60)]
        await _until(lambda: transport.held == 5)
        assert client.flow.in_flight == 5
        transport.gate.set()
        await asyncio.gather(*calls)
    assert transport.most == 5
    assert client.flow.peak == 5
    assert transport.answered == 60


async def test_cancelling_calls_under_contention_leaves_the_client_whole() -> None:
    transport = GatedTransport()
    async with ChainguardClient(
        "https://api.test", StaticToken(), transport=transport, max_in_flight=4
    ) as client:
        calls = [asyncio.create_task(client.find_roles("viewer")) for _ in range(40)]
        await _until(lambda: transport.held == 4)
        for call in calls:  # some hold a slot, most wait for one
            call.cancel()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        assert client.flow.in_flight == 0
        transport.gate.set()
        # Every slot came back: as many calls as the limit run at once again, and finish.
        again = [asyncio.create_task(client.find_roles("viewer")) for _ in range(8)]
        assert await asyncio.gather(*again) == [[]] * 8
        assert client.flow.in_flight == 0


async def test_cancelled_and_timed_out_calls_over_real_connections_do_not_exhaust_the_pool() -> None:
    """httpcore#1093: requests cancelled while waiting for a pool slot leaked half-made connections.
    With the bound taken before httpx, no request waits in the pool, and the client keeps working."""
    async with ChainguardEmulator() as chainguard:
        token = chainguard.mint_api_token("root-admin")
        chainguard.faults.add("GET", r"^/iam/v2/roles$", status=200, delay=1.0, times=30)  # slow answers
        client = ChainguardClient(
            chainguard.api_url,
            StaticToken(token),
            timeout=0.3,
            retry=RetryPolicy(attempts=1),
            max_in_flight=3,
        )
        async with client:
            calls = [asyncio.create_task(client.find_roles("viewer")) for _ in range(30)]
            await _until(lambda: client.flow.in_flight == 3)  # three in flight, the rest behind them
            for call in calls[::2]:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)  # the rest time out
            assert client.flow.in_flight == 0
            chainguard.faults.clear()
            answers = await asyncio.gather(*(client.find_roles("viewer") for _ in range(10)))
            assert all(len(found) == 1 for found in answers)
            assert client.flow.peak <= 3


async def test_a_retry_after_pauses_every_caller_not_just_the_one_told() -> None:
    sleeps: list[float] = []

    async def record(seconds: float) -> None:
        sleeps.append(round(seconds, 1))

    answers = iter([429, 200, 200])

    async def handler(request: httpx.Request) -> httpx.Response:
        status = next(answers)
        if status == 429:
            return httpx.Response(429, headers={"Retry-After": "4"}, json={"code": 8, "message": "slow down"})
        return httpx.Response(200, json={"roles": []})

    client = ChainguardClient(
        "https://api.test", StaticToken(), transport=httpx.MockTransport(handler), sleep=record
    )
    async with client:
        await client.find_roles("viewer")  # told to wait 4 s: it sleeps 4 s, then succeeds
        assert sleeps == [4.0]
        assert client.flow.paused_for() == pytest.approx(0.0, abs=0.5)  # it waited the pause out itself
        client.flow.pause(4.0)  # as if another caller had just been told
        await client.find_roles("viewer")
        assert sleeps == [4.0, 4.0]  # this one waits too, without having asked


def test_the_limit_is_at_least_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        FlowControl(0)


async def _until(condition: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition never held")
        await asyncio.sleep(0.001)  # let the tasks run; the condition decides
