"""Flow control toward Chainguard: a bound on calls in flight, and one pause for everyone.

The operator may run a thousand reconcile workers; without a bound they would all queue inside httpx's
connection pool, where a request cancelled or timed out while waiting for a slot can leak a half-made
connection (encode/httpcore#1093) until the pool behaves as full for good. So the bound is taken
*before* a request reaches httpx: at most ``limit`` requests are ever handed to the pool, the pool holds
``limit`` connections, and no request waits inside it. Waiting here is an ``asyncio.Semaphore``, which a
cancelled waiter leaves cleanly, and a wait for capacity is never reported as an API failure.

A 429 or 503 with ``Retry-After`` is the server speaking to the whole client, not to one request:
``pause`` holds every new request until then, so a thousand workers do not each find out on their own.

``Writes`` counts the writes one reconcile pass has on the wire (``CURRENT_WRITES`` follows the pass's
task): a pass cancelled while it counts none has cut nothing off — it was reading, or waiting here — and
one that counts some is let finish them first (``Runtime``, when its object is deleted).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

DEFAULT_LIMIT = 20


class Writes:
    """The writes one pass has sent and not yet seen answered; once ``closed`` (its resource is being
    finalized), the pass may send no more: a write it starts now would be one the finalizer cuts off."""

    def __init__(self) -> None:
        self.count = 0
        self.closed = False
        self._none = asyncio.Event()
        self._none.set()

    @contextlib.contextmanager
    def sending(self) -> Iterator[None]:
        if self.closed:
            raise asyncio.CancelledError("the resource is being finalized: no new write")
        self.count += 1
        self._none.clear()
        try:
            yield
        finally:
            self.count -= 1
            if not self.count:
                self._none.set()

    async def none_in_flight(self) -> None:
        await self._none.wait()


# The pass whose task makes a call; unset (None) for calls made outside a pass.
CURRENT_WRITES: contextvars.ContextVar[Writes | None] = contextvars.ContextVar("cgid_writes", default=None)


class FlowControl:
    def __init__(
        self,
        limit: int = DEFAULT_LIMIT,
        *,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if limit < 1:
            raise ValueError("the limit of calls in flight must be at least 1")
        self.limit = limit
        self.in_flight = 0
        self.peak = 0  # the most calls in flight at once since start (for the bench and metrics)
        self._slots = asyncio.Semaphore(limit)
        self._clock = clock
        self._sleep = sleep
        self._resume_at = 0.0
        self._served = 0.0  # a pause up to here has been waited out (by someone who slept through it)

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def pause(self, seconds: float) -> None:
        """Hold every request that has not started yet for ``seconds`` (a server's Retry-After)."""
        self._resume_at = max(self._resume_at, self._now() + seconds)

    def paused_for(self) -> float:
        """Seconds left of the current pause (0 when there is none)."""
        return max(0.0, self._resume_at - max(self._now(), self._served))

    def waited(self, seconds: float) -> None:
        """The caller has just slept ``seconds`` for a pause it caused: it need not wait again."""
        self._served = max(self._served, min(self._resume_at, self._now() + seconds))

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One call in flight: waits out a pause, then for capacity."""
        target = self._resume_at
        if target > self._served:
            wait = target - self._now()
            if wait > 0:
                await self._sleep(wait)
            self._served = max(self._served, target)
        async with self._slots:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                yield
            finally:
                self.in_flight -= 1
