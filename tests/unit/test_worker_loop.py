"""The per-object worker loop (``Runtime.run_worker``) with its pass replaced: how it stops, and how it
backs off when a pass's status cannot be written. No cluster, no Chainguard: ``run_once`` is a stub."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import pathlib
from typing import Any

import kubernetes.client
import pytest

from chainguard_identity_operator import runtime as runtime_module
from chainguard_identity_operator.chainguard.auth import StaticTokenFile
from chainguard_identity_operator.chainguard.client import ChainguardClient
from chainguard_identity_operator.chainguard.flow import CURRENT_WRITES
from chainguard_identity_operator.cluster_errors import ClusterError
from chainguard_identity_operator.config import Settings
from chainguard_identity_operator.runtime import Runtime

pytestmark = pytest.mark.timeout(10)

BODY = {"metadata": {"namespace": "shop", "name": "puller", "uid": "u-1"}}
# kopf's live view once the object is marked for deletion, as the worker sees it when stopped for it.
DELETED = {"metadata": {**BODY["metadata"], "deletionTimestamp": "2026-12-02T10:00:00Z"}}


class Stop:
    """kopf's ``DaemonStopped``, as far as the worker uses it."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def __bool__(self) -> bool:
        return self.event.is_set()

    async def wait(self, timeout: float | None = None) -> None:
        await self.event.wait()


@pytest.fixture
async def runtime(tmp_path: pathlib.Path) -> Any:
    settings = Settings(
        token_file=tmp_path / "token",
        metrics_port=0,
        base_backoff=datetime.timedelta(seconds=1),
        max_backoff=datetime.timedelta(minutes=5),
        resync_interval=datetime.timedelta(minutes=10),
    )
    chainguard = ChainguardClient(settings.api_url, StaticTokenFile(settings.token_file or tmp_path))
    made = Runtime(settings, kube_configuration=kubernetes.client.Configuration(), chainguard=chainguard)
    yield made
    await chainguard.aclose()
    made.cluster.close()


def finalizer_seeing(seen: list[list[str]], finished: list[str]) -> Any:
    """A stand-in for reconcile.finalize that records which passes had ended when it ran."""

    async def finalize(context: Any, resource: Any) -> list[Any]:
        seen.append(list(finished))
        return []

    return finalize


async def test_a_pass_in_flight_when_the_object_is_deleted_is_let_end_and_the_finalizer_waits_for_it(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    stop, started, release, finished, seen = Stop(), asyncio.Event(), asyncio.Event(), [], []

    async def slow_pass(body: Any) -> Any:
        writes = CURRENT_WRITES.get()
        assert writes is not None, "a pass runs with its own count of writes"
        with writes.sending():  # as the Chainguard client counts a write on the wire
            started.set()
            await release.wait()  # answered after the stop
        finished.append(body["metadata"]["uid"])
        return None, 60.0

    monkeypatch.setattr(runtime, "run_once", slow_pass)
    monkeypatch.setattr(runtime_module, "finalize", finalizer_seeing(seen, finished))
    worker = asyncio.create_task(runtime.run_worker(DELETED, stop))
    await started.wait()
    stop.event.set()
    # The worker leaves at once, as kopf expects of a stopped daemon; the pass is not cut off.
    await asyncio.wait_for(worker, timeout=1)
    assert finished == []
    finalizing = asyncio.create_task(runtime.finalize(DELETED))
    await asyncio.sleep(0)  # let the finalizer start: it must be waiting, not finalizing
    assert seen == []
    release.set()
    await asyncio.wait_for(finalizing, timeout=runtime.stop_grace())
    assert seen == [["u-1"]], "the finalizer ran before the pass in flight had ended"


def stuck(started: asyncio.Event, cancelled: list[bool], *, writing: bool = True) -> Any:
    """A pass that never ends: inside a write on the wire, or (``writing=False``) waiting before one."""

    async def stuck_pass(body: Any) -> Any:
        writes = CURRENT_WRITES.get()
        assert writes is not None
        with writes.sending() if writing else contextlib.nullcontext():
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

    return stuck_pass


async def test_a_pass_with_no_write_on_the_wire_is_cancelled_at_once_by_the_finalizer(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A resync pass queued behind a thousand deletions' calls: cutting it off loses nothing, and the
    # finalizer must not wait the grace for it.
    monkeypatch.setattr(runtime, "stop_grace", lambda: 60.0)
    stop, started, cancelled, seen = Stop(), asyncio.Event(), [], []
    monkeypatch.setattr(runtime, "run_once", stuck(started, cancelled, writing=False))
    monkeypatch.setattr(runtime_module, "finalize", finalizer_seeing(seen, []))
    worker = asyncio.create_task(runtime.run_worker(DELETED, stop))
    await started.wait()
    stop.event.set()
    await asyncio.wait_for(worker, timeout=1)
    await asyncio.wait_for(runtime.finalize(DELETED), timeout=1)
    assert cancelled == [True]
    assert seen == [[]]


async def test_a_write_that_outlasts_the_grace_is_cut_off_by_the_finalizer(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(runtime, "stop_grace", lambda: 0.1)
    stop, started, cancelled, seen = Stop(), asyncio.Event(), [], []
    monkeypatch.setattr(runtime, "run_once", stuck(started, cancelled))
    monkeypatch.setattr(runtime_module, "finalize", finalizer_seeing(seen, []))
    worker = asyncio.create_task(runtime.run_worker(DELETED, stop))
    await started.wait()
    stop.event.set()
    await asyncio.wait_for(worker, timeout=1)  # returns, does not raise
    assert cancelled == []
    await asyncio.wait_for(runtime.finalize(DELETED), timeout=2)
    assert cancelled == [True]
    assert seen == [[]]
    assert "shop/puller: a Chainguard write still unanswered" in caplog.text


async def test_an_operator_that_stops_cancels_the_pass_at_once(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not deleted: a stop is a crash the next start recovers from, and a stopping pod waits on nothing.
    monkeypatch.setattr(runtime, "stop_grace", lambda: 60.0)
    stop, started, cancelled = Stop(), asyncio.Event(), []
    monkeypatch.setattr(runtime, "run_once", stuck(started, cancelled))
    worker = asyncio.create_task(runtime.run_worker(BODY, stop))
    await started.wait()
    stop.event.set()
    await asyncio.wait_for(worker, timeout=2)
    assert cancelled == [True]


async def test_a_status_that_cannot_be_written_is_retried_on_the_backoff_with_a_warning(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    stop, delays, passes = Stop(), [], []

    async def failing_pass(body: Any) -> Any:
        passes.append(1)
        raise ClusterError(
            "patching status of shop/puller: no answer from the Kubernetes API (ProtocolError)"
        )

    async def sleep(wake: Any, stopped: Any, delay: float) -> None:
        delays.append(delay)
        if len(delays) == 3:
            stop.event.set()

    monkeypatch.setattr(runtime, "run_once", failing_pass)
    monkeypatch.setattr(runtime, "_sleep", sleep)
    await asyncio.wait_for(runtime.run_worker(BODY, stop), timeout=2)
    # 1 s, 2 s, 4 s (each ±20 %): the transient backoff, not CGID_MAX_BACKOFF (5 min).
    for delay, expected in zip(delays, (1.0, 2.0, 4.0), strict=True):
        assert expected * 0.8 <= delay <= expected * 1.2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert all("shop/puller" in r.getMessage() and r.exc_info is None for r in warnings)
    assert "failed unexpectedly" not in caplog.text


async def test_a_pass_that_fails_unexpectedly_is_reported_by_the_worker_and_leaves_no_failed_task(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # kopf awaits every task of the loop when it exits and re-raises their errors ("the operator failed"):
    # the pass's own task must end with its failure as a result, which the worker logs.
    stop = Stop()

    async def broken_pass(body: Any) -> Any:
        raise RuntimeError("Cannot send a request, as the client has been closed.")

    async def sleep(wake: Any, stopped: Any, delay: float) -> None:
        stop.event.set()

    passes: list[asyncio.Task[Any]] = []
    guarded = runtime._guarded

    async def recorded(body: Any) -> Any:
        task = asyncio.current_task()
        assert task is not None
        passes.append(task)
        return await guarded(body)

    monkeypatch.setattr(runtime, "run_once", broken_pass)
    monkeypatch.setattr(runtime, "_guarded", recorded)
    monkeypatch.setattr(runtime, "_sleep", sleep)
    await asyncio.wait_for(runtime.run_worker(BODY, stop), timeout=2)
    assert len(passes) == 1
    assert passes[0].done()
    assert passes[0].exception() is None
    assert "reconcile of u-1 failed unexpectedly" in caplog.text


async def test_a_pass_cancelled_by_another_resources_deletion_does_not_end_the_worker(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # kopf never restarts a daemon that returned on its own: a worker that returns while not stopped
    # leaves its resource unreconciled (no renewal, no drift repair) until the operator restarts.
    stop, passes, delays = Stop(), [], []

    async def cancelled_pass(body: Any) -> Any:
        passes.append(1)
        if len(passes) == 1:
            raise asyncio.CancelledError  # e.g. from something shared with a pass that was cut off
        return None, 60.0

    async def sleep(wake: Any, stopped: Any, delay: float) -> None:
        delays.append(delay)
        if len(delays) == 2:
            stop.event.set()

    monkeypatch.setattr(runtime, "run_once", cancelled_pass)
    monkeypatch.setattr(runtime, "_sleep", sleep)
    await asyncio.wait_for(runtime.run_worker(BODY, stop), timeout=2)
    assert passes == [1, 1], "the worker returned after a cancelled pass though nobody stopped it"
    assert 0.8 <= delays[0] <= 1.2  # the transient backoff (1 s), not a resync
    assert "shop/puller: the pass was cancelled" in caplog.text


def test_the_grace_outlasts_the_request_timeout(runtime: Runtime) -> None:
    # A write may be answered as late as CGID_REQUEST_TIMEOUT: cutting it off sooner leaves it in doubt.
    assert runtime.stop_grace() > runtime.settings.request_timeout.total_seconds()


async def test_a_deleted_resources_pass_starts_no_new_write_once_the_finalizer_waits(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Its write on the wire is let land; the next one — which would run into the grace's end and be cut
    # off in doubt — is never sent.
    stop, on_wire, answer, sent, seen = Stop(), asyncio.Event(), asyncio.Event(), [], []

    async def two_writes(body: Any) -> Any:
        writes = CURRENT_WRITES.get()
        assert writes is not None
        for n in (1, 2):
            with writes.sending():
                sent.append(n)
                on_wire.set()
                await answer.wait()
        return None, 60.0

    monkeypatch.setattr(runtime, "run_once", two_writes)
    monkeypatch.setattr(runtime_module, "finalize", finalizer_seeing(seen, []))
    worker = asyncio.create_task(runtime.run_worker(DELETED, stop))
    await on_wire.wait()
    stop.event.set()
    await asyncio.wait_for(worker, timeout=1)
    finalizing = asyncio.create_task(runtime.finalize(DELETED))
    await asyncio.sleep(0)  # the finalizer is waiting on the write on the wire
    assert seen == []
    answer.set()
    await asyncio.wait_for(finalizing, timeout=2)
    assert sent == [1], "the pass sent a new write after its resource's finalizer had started"
    assert seen == [[]]
    assert "cut off" not in caplog.text
