"""The operator's long-lived parts and the per-object reconcile worker.

``Runtime`` owns the clients, the shared cluster facts, and one small piece of state per resource: an
event that wakes its worker and a count of consecutive failures for the backoff. Each resource has
exactly one worker (a kopf daemon), so passes for one object never overlap; spec changes, key rotation
and schedules only wake it.

The worker sleeps until the earliest of: a wake-up (spec change, cluster keys changed), the next
scheduled renewal, the retry backoff after a transient failure, or the resync interval that catches
drift made outside the operator. When its object is deleted, the worker leaves at once (kopf expects a
stopped daemon to) but a pass under way is let finish, for at most ``stop_grace()``, rather than cancelled
with a write in flight: the finalizer waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import datetime
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import kubernetes.client

from chainguard_identity_operator.chainguard.auth import AssumedIdentity, StaticTokenFile, TokenSource
from chainguard_identity_operator.chainguard.client import ChainguardClient
from chainguard_identity_operator.chainguard.flow import CURRENT_WRITES, Writes
from chainguard_identity_operator.chainguard.sts import STSClient
from chainguard_identity_operator.cluster import (
    ClusterClient,
    ClusterFactsCache,
    ObjectRef,
    load_kube_configuration,
)
from chainguard_identity_operator.cluster_errors import ClusterError
from chainguard_identity_operator.conditions import Phase
from chainguard_identity_operator.config import Settings
from chainguard_identity_operator.metrics import Metrics, MetricsServer
from chainguard_identity_operator.reconcile import (
    Context,
    DeletionBlocked,
    Outcome,
    Resource,
    apply,
    deletion_blocked_status,
    finalize,
)
from chainguard_identity_operator.status import IdentityStatus

logger = logging.getLogger(__name__)

# How long a Chainguard write on the wire when its object is deleted may take to be answered before the
# finalizer cuts it off (``Runtime.stop_grace``): httpx gives connecting, sending and each read the whole
# CGID_REQUEST_TIMEOUT (a slot is taken before httpx, so no pool wait), and an answer cut off sooner than
# it may come is a write in doubt.
STOP_GRACE_TIMEOUTS = 3
STOP_GRACE_MARGIN = 1.0

T = TypeVar("T")


async def _call(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


class StopFlag(Protocol):
    """kopf's ``DaemonStopped``: truthy once stopping, and awaitable with a timeout."""

    def __bool__(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> Any: ...


@dataclasses.dataclass
class _Worker:
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    failures: int = 0
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    # The pass under way, if any, and the Chainguard writes it has on the wire: left running when the
    # object is deleted, for the finalizer to end (``Runtime._finish_pass``).
    running: asyncio.Future[tuple[Outcome, float] | Exception] | None = None
    # What the last pass that ended found or made (its parent, identity, retiring ones, pull secret), which
    # kopf's view of the object may not show yet, or ever if the status could not be written.
    last_status: IdentityStatus | None = None
    writes: Writes = dataclasses.field(default_factory=Writes)


def resource_from_body(body: Mapping[str, Any]) -> Resource:
    meta = body.get("metadata", {})
    return Resource(
        ref=ObjectRef(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"]),
        generation=int(meta.get("generation") or 0),
        spec=dict(body.get("spec") or {}),
        status=dict(body.get("status") or {}),
        annotations=dict(meta.get("annotations") or {}),
    )


class Runtime:
    def __init__(
        self,
        settings: Settings,
        *,
        kube_configuration: kubernetes.client.Configuration,
        chainguard: ChainguardClient,
        clock: Callable[[], datetime.datetime] | None = None,
        sts: STSClient | None = None,
        metrics: Metrics | None = None,
        own_identity: AssumedIdentity | None = None,
        cluster: ClusterClient | None = None,
    ) -> None:
        self.settings = settings
        self.own_identity = own_identity
        self.metrics = metrics or Metrics()
        self.metrics.gauge("chainguard_api_in_flight", lambda: chainguard.flow.in_flight)
        self.metrics.gauge("chainguard_api_in_flight_peak", lambda: chainguard.flow.peak)
        self._metrics_server: MetricsServer | None = None
        self.kube_configuration = kube_configuration
        # ``cluster`` lets a test put a double of the Kubernetes client in (testkit's MemoryCluster).
        self.cluster = cluster or ClusterClient(
            kubernetes.client.ApiClient(kube_configuration), timeout=settings.request_timeout.total_seconds()
        )
        clock = clock or (lambda: datetime.datetime.now(datetime.UTC))
        self.facts = ClusterFactsCache(self.cluster, settings, clock=clock)
        self.context = Context(
            settings=settings,
            chainguard=chainguard,
            cluster=self.cluster,
            facts=self.facts,
            clock=clock,
            own_identities=own_identity.identities if own_identity is not None else frozenset,
            on_published=self._published,
            sts=sts or STSClient(settings.issuer_url, timeout=settings.request_timeout.total_seconds()),
        )
        self._sts = sts
        self._workers: dict[str, _Worker] = {}
        self._poller: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Spread over a tenth of a poll interval, at most 30 s: the new keys reach every identity well
        # within one poll, and the API sees a ramp, not a wall.
        spread = min(30.0, settings.jwks_poll_interval.total_seconds() / 10)
        self.facts.on_keys_changed(lambda _old, _new: self.wake_all(spread=spread))

    @classmethod
    def from_settings(
        cls, settings: Settings, *, clock: Callable[[], datetime.datetime] | None = None
    ) -> Runtime:
        timeout = settings.request_timeout.total_seconds()
        sts = None
        tokens: TokenSource
        if settings.identity is not None:
            sts = STSClient(settings.issuer_url, timeout=timeout)
            tokens = AssumedIdentity(
                sts, identity=settings.identity, token_path=settings.identity_token_path, clock=clock
            )
        else:
            assert settings.token_file is not None  # validated by Settings
            tokens = StaticTokenFile(settings.token_file)
        metrics = Metrics()
        chainguard = ChainguardClient(
            settings.api_url,
            tokens,
            timeout=timeout,
            on_request=metrics.observe_api_request,
            max_in_flight=settings.max_in_flight,
        )
        return cls(
            settings,
            kube_configuration=load_kube_configuration(settings),
            chainguard=chainguard,
            clock=clock,
            sts=sts,
            metrics=metrics,
            own_identity=tokens if isinstance(tokens, AssumedIdentity) else None,
        )

    def _published(self, namespace: str, name: str, identity: str) -> None:
        """A ConfigMap in the operator's namespace was written: if it is the one naming the operator's
        own identity, authenticate as what it names from now on."""
        settings = self.settings
        if self.own_identity is None or settings.identity_config_map is None:
            return
        if (namespace, name) == (settings.operator_namespace, settings.identity_config_map):
            self.own_identity.follow(identity)

    async def start(self) -> None:
        """Learn the cluster's ID and start watching the cluster's keys (idempotent)."""
        self._loop = asyncio.get_running_loop()
        if self.context.cluster_id is None:
            # Ownership markers carry it; without it the operator could not tell its identities from
            # another cluster's, so a failure here stops the start with the reason.
            self.context.cluster_id = self.settings.cluster_id or await self.cluster.cluster_id()
            logger.info("cluster ID %s (%s)", self.context.cluster_id, self.settings.cluster_name)
        if self.own_identity is not None and self.settings.identity_config_map is not None:
            # After a restart, pick up where the operator's own identity went (its replacement).
            published = await self.cluster.published_identity(
                self.settings.operator_namespace, self.settings.identity_config_map
            )
            if published is not None:
                self.own_identity.follow(published)
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll_cluster_facts(), name="cluster facts poller")
        if self._metrics_server is None and self.settings.metrics_port:
            self._metrics_server = MetricsServer(self.metrics, self.settings.metrics_port)
            await self._metrics_server.start()

    async def _poll_cluster_facts(self) -> None:
        """Re-read issuer and JWKS every poll interval, so a key rotation is noticed without waiting for
        a resync; the cache wakes every worker when the fingerprint changes."""
        interval = self.settings.jwks_poll_interval.total_seconds()
        while True:
            failed = False
            try:
                failed = (await self.facts.refresh()).keys_error is not None
            except ClusterError as exc:
                failed = True
                logger.warning("reading the cluster's issuer and keys failed: %s", exc)
            # After a failure, look again soon: a rotation during an outage must not wait a whole interval.
            retry = min(interval, self.settings.base_backoff.total_seconds() * 4)
            await asyncio.sleep(retry if failed else interval)

    async def aclose(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self._metrics_server is not None:
            await self._metrics_server.stop()
            self._metrics_server = None
        await self.context.chainguard.aclose()
        if self.context.sts is not None:
            await self.context.sts.aclose()  # the operator's own exchanges go through it too
        self.cluster.close()

    # -- waking -------------------------------------------------------------------------------------

    def _worker(self, uid: str) -> _Worker:
        return self._workers.setdefault(uid, _Worker())

    def _in_loop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the operator's loop: asyncio events are not thread-safe, and tests and the
        sandbox wake workers from another thread."""
        loop = self._loop
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if loop is None or current is loop:
            fn()
        elif not loop.is_closed():  # a stopped operator has no workers left to wake
            loop.call_soon_threadsafe(fn)

    async def in_operator_loop(self, make: Callable[[], Awaitable[T]]) -> T:
        """Await ``make()`` in the operator's loop, from any thread (its locks and events live there)."""
        loop = self._loop
        if loop is None or loop is asyncio.get_running_loop():
            return await make()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_call(make), loop))

    def wake(self, uid: str) -> None:
        self._in_loop(lambda: self._worker(uid).wake.set())

    def wake_all(self, *, spread: float = 0.0) -> None:
        """Wake every worker — within ``spread`` seconds, each at a random moment, so that a thousand
        of them do not call Chainguard in the same instant (a key rotation wakes them all)."""

        def wake_everyone() -> None:
            loop = asyncio.get_running_loop()
            for worker in self._workers.values():
                if spread > 0:
                    loop.call_later(random.uniform(0, spread), worker.wake.set)
                else:
                    worker.wake.set()

        self._in_loop(wake_everyone)

    def forget(self, uid: str) -> None:
        self._workers.pop(uid, None)

    # -- scheduling ---------------------------------------------------------------------------------

    def next_delay(self, outcome: Outcome, failures: int) -> float:
        """Seconds until the next pass for this outcome."""
        settings = self.settings
        resync = settings.resync_interval.total_seconds()
        if outcome.transient:
            return self.backoff(failures, outcome.retry_after)
        if outcome.wake_at is not None:
            until = (outcome.wake_at - self.context.clock()).total_seconds()
            return max(0.0, min(until, resync * random.uniform(0.9, 1.0)))
        # Jittered, so resources created together do not resync together forever after.
        return resync * random.uniform(0.9, 1.0)

    def backoff(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds until a pass after the ``failures``-th transient failure in a row."""
        settings = self.settings
        backoff = min(
            settings.base_backoff.total_seconds() * (2 ** max(failures - 1, 0)),
            settings.max_backoff.total_seconds(),
        )
        backoff *= random.uniform(0.8, 1.2)  # jitter: many objects failing together must not retry together
        if retry_after is not None:
            backoff = max(backoff, retry_after)
        return float(min(backoff, settings.resync_interval.total_seconds()))

    async def run_once(self, body: Mapping[str, Any]) -> tuple[Outcome, float]:
        resource = resource_from_body(body)
        worker = self._worker(resource.ref.uid)
        async with worker.lock:
            outcome = await apply(self.context, resource)
        worker.last_status = outcome.status
        worker.failures = worker.failures + 1 if outcome.transient else 0
        self.metrics.observe_identity(
            resource.ref.namespace,
            resource.ref.name,
            ready=outcome.health.phase is Phase.READY,
            expires_at=outcome.status.expires_at,
            renew_at=outcome.status.renew_at,
            rotated=outcome.rotated,
            phase=outcome.health.phase.value,
        )
        return outcome, self.next_delay(outcome, worker.failures)

    async def run_worker(self, body: Mapping[str, Any], stopped: StopFlag) -> None:
        """The per-object loop run by the kopf daemon; ``body`` is kopf's live view of the object."""
        meta = body["metadata"]
        uid = meta["uid"]
        worker = self._worker(uid)
        try:
            while not stopped:
                worker.wake.clear()
                try:
                    ran = await self._pass(body, stopped)
                except ClusterError as exc:
                    # The pass ended but its status could not be written (an API server restarting):
                    # a transient failure like any other, and the next pass writes what this one found.
                    worker.failures += 1
                    delay = self.backoff(worker.failures)
                    logger.warning(
                        "%s/%s: %s; retrying in %.1fs", meta["namespace"], meta["name"], exc, delay
                    )
                except Exception:
                    # Never crash the worker: log (no tokens are in our exceptions) and back off.
                    logger.exception("reconcile of %s failed unexpectedly", uid)
                    worker.failures += 1
                    delay = self.settings.max_backoff.total_seconds()
                else:
                    if ran is not None:
                        _, delay = ran
                    elif stopped:
                        break  # and the pass was cancelled, or left to the finalizer
                    else:
                        # The pass ended cancelled though nobody stopped this worker: returning would end
                        # the daemon for good (kopf does not restart one that returned), so retry it.
                        worker.failures += 1
                        delay = self.backoff(worker.failures)
                        logger.warning(
                            "%s/%s: the pass was cancelled; retrying in %.1fs",
                            meta["namespace"],
                            meta["name"],
                            delay,
                        )
                await self._sleep(worker.wake, stopped, delay)
        finally:
            # A pass left running for the finalizer keeps the worker (its lock): the finalizer forgets it.
            if stopped and (worker.running is None or worker.running.done()):
                self.forget(uid)

    async def _pass(self, body: Mapping[str, Any], stopped: StopFlag) -> tuple[Outcome, float] | None:
        """One pass, or None if the worker was stopped before it ended.

        When the object is being deleted, a pass under way is left running: the finalizer runs next, and
        it needs the answer of a write in flight, not a write in doubt, so it lets the pass's writes land
        (at most ``stop_grace()``) before it cancels the rest. The worker itself returns at once: kopf
        holds the finalizer until its daemon has exited, and one that lingers gets the delete handler run
        a second time. When the operator stops, the pass is cancelled at once: that is a crash, which the
        next start recovers from (it looks before it writes), and a stopping pod should not wait on
        Chainguard."""
        worker = self._worker(body["metadata"]["uid"])
        worker.writes = Writes()
        context = contextvars.copy_context()
        context.run(CURRENT_WRITES.set, worker.writes)
        task = worker.running = asyncio.get_running_loop().create_task(self._guarded(body), context=context)
        stopping = asyncio.ensure_future(stopped.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not stopping.done():
                stopping.cancel()
                await asyncio.wait({stopping})
            # kopf's view of the object is live: it is marked for deletion before the worker is stopped.
            if not task.done() and not body["metadata"].get("deletionTimestamp"):
                task.cancel()
                await asyncio.wait({task})
        if not task.done():
            return None  # left to the finalizer
        worker.running = None  # a task ended: nothing to keep of it
        if task.cancelled():
            return None
        result = task.result()
        if isinstance(result, Exception):
            raise result
        return result

    async def _guarded(self, body: Mapping[str, Any]) -> tuple[Outcome, float] | Exception:
        """``run_once``, with its failure as the result: a task that ends in an exception is one kopf
        re-raises at exit (it awaits every task of the loop), as "the operator failed"."""
        try:
            return await self.run_once(body)
        except Exception as exc:
            return exc

    def stop_grace(self) -> float:
        """Seconds the finalizer lets a deleted resource's Chainguard writes on the wire be answered."""
        return STOP_GRACE_TIMEOUTS * self.settings.request_timeout.total_seconds() + STOP_GRACE_MARGIN

    async def _finish_pass(self, worker: _Worker, what: str) -> IdentityStatus | None:
        """End the pass under way: at once if it has no Chainguard write on the wire (it is reading, or
        waiting for a slot behind other calls — nothing is cut off), else once its writes are answered,
        for at most ``stop_grace()``. Returns the status the last pass that ended found, if any."""
        running, writes = worker.running, worker.writes
        if running is None or running.done():
            return worker.last_status
        writes.closed = True  # the writes on the wire now are the last: a new one would be cut off
        grace = self.stop_grace()
        deadline = asyncio.get_running_loop().time() + grace
        while not running.done() and writes.count:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                logger.warning(
                    "%s: a Chainguard write still unanswered %.0fs after deletion is cut off; the finalizer "
                    "looks up what it may have made",
                    what,
                    grace,
                )
                break
            quiet = asyncio.ensure_future(writes.none_in_flight())
            either: set[asyncio.Future[Any]] = {running, quiet}
            try:
                await asyncio.wait(either, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                quiet.cancel()
        # The pass is suspended where it awaits, and it counts no write there (or time is up): cancel it
        # before it runs again, so it sends nothing more.
        if not running.done():
            running.cancel()
            await asyncio.wait({running})
        worker.running = None
        if not running.cancelled() and isinstance(failed := running.result(), Exception):
            logger.warning("%s: the pass under way at deletion failed: %s", what, failed)
        return worker.last_status

    @staticmethod
    async def _sleep(wake: asyncio.Event, stopped: StopFlag, delay: float) -> None:
        waiters = {
            asyncio.ensure_future(wake.wait()),
            asyncio.ensure_future(stopped.wait()),
        }
        try:
            await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            for waiter in waiters:
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter

    def deletion_delay(self, retry: int, exc: DeletionBlocked) -> float:
        """Seconds until the finalizer tries again: the settings' jittered backoff, or Retry-After."""
        settings = self.settings
        delay = min(settings.base_backoff.total_seconds() * 2.0**retry, settings.max_backoff.total_seconds())
        delay *= random.uniform(0.8, 1.2)  # deletions of many objects must not retry in step
        if not exc.transient:
            delay = settings.max_backoff.total_seconds()
        if exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        return delay

    async def finalize(self, body: Mapping[str, Any]) -> None:
        """Run the finalizer; raise ``DeletionBlocked`` (after saying why in status and an event)."""
        resource = resource_from_body(body)
        worker = self._worker(resource.ref.uid)
        try:
            found = await self._finish_pass(worker, f"{resource.ref.namespace}/{resource.ref.name}")
            view = resource if found is None else resource_from_body({**body, "status": found.to_dict()})
            async with worker.lock:
                events = await finalize(self.context, view)
        except DeletionBlocked as exc:
            patch = deletion_blocked_status(resource, str(exc), self.context.clock())
            if patch:
                try:
                    await self.cluster.patch_status(resource.ref, patch)
                except ClusterError as error:
                    logger.warning("could not record why %s cannot be deleted: %s", resource.ref.name, error)
                await self.cluster.post_event(
                    resource.ref, warning=True, reason="DeletionBlocked", message=str(exc)
                )
            raise
        for event in events:
            await self.cluster.post_event(
                resource.ref, warning=event.warning, reason=event.reason, message=event.message
            )
        # The last change of its state; reconcile logs the others.
        done = "; ".join(event.message for event in events) or "nothing to delete"
        logger.info("%s/%s: finalized: %s", resource.ref.namespace, resource.ref.name, done)
        self.forget(resource.ref.uid)
        self.metrics.forget_identity(resource.ref.namespace, resource.ref.name)
