"""The Kubernetes API going away and coming back, as a restarting API server does: the real operator on
the Kubernetes emulator.

While an API server restarts it refuses connections and cuts the ones it had; once it listens again, its
authorizer denies requests for a moment (RBAC caches still filling). Neither is a reason to stop trying:
every pass that meets one is retried on the jittered backoff (at most CGID_MAX_BACKOFF, far less than a
resync here), with a warning and no traceback, and the resource is Ready again soon after the server is.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import pytest

# kmock 0.8 (pinned) exports Response without listing it in __all__ (as cgid_testkit.kube notes).
from kmock._internal.rendering import Response

from cgid_testkit.harness import World, world
from cgid_testkit.kube import write_kubeconfig

pytestmark = pytest.mark.timeout(60)

# Long enough that only the backoff, never a resync or a max_backoff wait, can bring a resource back
# within the tests' timeouts.
SLOW = {
    "resync_interval": datetime.timedelta(minutes=10),
    "max_backoff": datetime.timedelta(minutes=5),
}


def cr(name: str, namespace: str = "shop", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


class Gate:
    """A TCP proxy between the operator (kopf's watches and its own client) and the cluster that can go
    down like a restarting API server: it stops listening (new connections are refused) and cuts every
    connection it carries; ``up`` listens on the same port again."""

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        assert parsed.hostname is not None
        assert parsed.port is not None
        self._upstream = (parsed.hostname, parsed.port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        assert self._server is not None
        self._server.close()
        self._server = None
        for writer in list(self._writers):
            writer.transport.abort()  # a reset, as a killed server's kernel answers
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


@contextlib.asynccontextmanager
async def gated_world(**options: Any) -> AsyncIterator[tuple[World, Gate]]:
    """A World whose operator reaches the Kubernetes emulator only through a ``Gate``."""
    async with world(start=False, **options) as w:
        gate = Gate(w.kube_url)
        await gate.up()
        write_kubeconfig(w.kubeconfig, gate.url)
        await w.start_operator()
        try:
            yield w, gate
        finally:
            await w.stop_operator()
            with contextlib.suppress(AssertionError):
                await gate.down()


def operator_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("chainguard_identity_operator")]


def assert_no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    text = caplog.text
    assert "failed unexpectedly" not in text
    assert "Traceback" not in text
    assert not [r.getMessage() for r in operator_records(caplog) if r.exc_info]


async def test_a_restarting_api_server_is_retried_on_the_backoff_without_tracebacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with gated_world(settings_overrides=SLOW) as (w, gate):
        await w.apply(cr("puller", parent=w.org))
        await w.wait_ready("shop", "puller")
        runtime = w.runtime
        assert runtime is not None

        async def first_pass_done() -> bool:  # its events too, which come after the status
            return runtime.metrics.total("chainguard_identity_reconciles_total") >= 1

        await w.wait_for(first_pass_done, what="the first pass to end")
        await gate.down()
        # Removed while the server is away: only a pass after it is back can write it again.
        async with w.client() as client:
            response = await client.delete("/api/v1/namespaces/shop/configmaps/puller-chainguard-identity")
            assert response.status_code == 200, response.text
        runtime.wake_all()

        async def failed_pass() -> list[logging.LogRecord]:
            return [
                r
                for r in operator_records(caplog)
                if r.name.endswith(".runtime")
                and r.levelno == logging.WARNING
                and "no answer from the Kubernetes API" in r.getMessage()
            ]

        await w.wait_for(failed_pass, what="a pass to fail on the unreachable API server", timeout=10)
        await gate.up()

        async def published() -> dict[str, str] | None:
            return await w.config_map("shop", "puller-chainguard-identity")

        # The retry comes on the backoff (0.2 s, doubling), not after CGID_MAX_BACKOFF or a resync.
        await w.wait_for(published, what="the ConfigMap written again once the server is back", timeout=10)
        await w.wait_ready("shop", "puller")
    assert_no_tracebacks(caplog)


class Denial:
    """The next ``times`` requests matching ``criterion`` are refused with 403, as by an API server whose
    authorizer has not loaded its RBAC yet; later ones reach the emulator."""

    def __init__(self, w: World, criterion: str, *, times: int) -> None:
        self.left = times
        self.hits = 0

        def react() -> Any:
            if self.left <= 0:
                return NotImplemented  # the emulator answers
            self.left -= 1
            self.hits += 1
            return Response(status=403, reason="Forbidden")

        w.kube[criterion] << react


async def test_a_forbidden_read_right_after_a_restart_is_retried_before_the_next_resync(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with world(settings_overrides=SLOW) as w:
        denial = Denial(w, "get /api/v1/namespaces/shop/serviceaccounts/default", times=3)
        await w.apply(cr("puller", parent=w.org))
        stalled = await w.wait_condition("shop", "puller", "Stalled", "True", reason="ClusterForbidden")
        ready = next(c for c in stalled["status"]["conditions"] if c["type"] == "Ready")
        assert "deploy/" in ready["message"]  # what an admin does if it lasts
        # No clock is moved: the resync is ten minutes away, so only the backoff can get it here.
        await w.wait_ready("shop", "puller", timeout=15)
        assert denial.hits == 3
    assert_no_tracebacks(caplog)
