"""The Kubernetes client when the API server is away: every transport failure is a ``ClusterError``.

An API server that restarts refuses connections, drops the ones it had and times out; the ``kubernetes``
package lets urllib3's errors through (``MaxRetryError``, ``ProtocolError``, ...), which are not
``OSError``s. Each must reach ``health.classify`` as a transient ``ClusterUnavailable`` — retried on the
backoff, with a message that is the same at every pass (one event per change, not one per pass) and
never a token — instead of escaping the pass as an unexpected failure.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
from collections.abc import Callable
from typing import Any

import kubernetes.client
import pytest
import urllib3
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from chainguard_identity_operator.cluster import ClusterClient, ObjectRef
from chainguard_identity_operator.cluster_errors import ClusterError
from chainguard_identity_operator.conditions import Phase
from chainguard_identity_operator.health import classify

# What a server or a proxy might echo of a token it could not parse.
TOKEN = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJzdWIiOiJzeXN0ZW0ifQ.c2lnbmF0dXJl"
REF = ObjectRef(namespace="shop", name="puller", uid="0" * 8)


def _pool() -> urllib3.HTTPConnectionPool:
    return urllib3.HTTPConnectionPool("127.0.0.1", 6443)


def _refused() -> Exception:
    conn = urllib3.connection.HTTPConnection("127.0.0.1", 6443)
    try:
        raise ConnectionRefusedError(111, "Connection refused")
    except ConnectionRefusedError as exc:
        try:
            raise urllib3.exceptions.NewConnectionError(conn, f"Failed to connect: {exc} {TOKEN}") from exc
        except urllib3.exceptions.NewConnectionError as new:
            return new


TRANSPORT_ERRORS: dict[str, Callable[[], Exception]] = {
    "refused after retries": lambda: urllib3.exceptions.MaxRetryError(
        _pool(), f"/api/v1/namespaces/shop/serviceaccounts/default?t={TOKEN}", reason=_refused()
    ),
    "refused": _refused,
    "dropped": lambda: urllib3.exceptions.ProtocolError(
        "Connection aborted.", http.client.RemoteDisconnected("Remote end closed connection without response")
    ),
    "read timeout": lambda: urllib3.exceptions.ReadTimeoutError(_pool(), "/api", "Read timed out."),
    "connect timeout": lambda: urllib3.exceptions.ConnectTimeoutError(f"timed out {TOKEN}"),
    "cut off": lambda: http.client.IncompleteRead(b"{", 10),
    "reset": lambda: ConnectionResetError(104, "Connection reset by peer"),
}


class FailingPool:
    """Stands in for the REST layer's urllib3 pool manager: every request raises ``error()``."""

    def __init__(self, error: Callable[[], Exception]) -> None:
        self.error = error
        self.requests = 0

    def request(self, *_: Any, **__: Any) -> Any:
        self.requests += 1
        raise self.error()

    def clear(self) -> None:
        pass


def client_with(pool: Any) -> ClusterClient:
    configuration = kubernetes.client.Configuration(host="http://127.0.0.1:6443")
    api = kubernetes.client.ApiClient(configuration)
    api.rest_client.pool_manager = pool
    return ClusterClient(api)


CALLS: dict[str, Callable[[ClusterClient], Any]] = {
    "read": lambda c: c.read_service_account("shop", "default"),
    "raw read": lambda c: c.jwks(),
    "write": lambda c: c.patch_status(REF, {"observedGeneration": 1}),
}


def assert_unavailable(exc: ClusterError, what: str) -> str:
    failure = classify(exc)
    assert failure.health.phase is Phase.PROGRESSING
    assert failure.health.reason == "ClusterUnavailable"
    assert failure.transient
    message = failure.health.message
    assert what in message
    assert "no answer from the Kubernetes API" in message
    assert "eyJ" not in message
    assert "eyJ" not in str(exc)
    assert "Traceback" not in message
    assert " 0x" not in message  # an object's address would make every pass's message new
    return message


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("error", sorted(TRANSPORT_ERRORS))
async def test_a_transport_failure_is_a_transient_cluster_error(error: str, call: str) -> None:
    cluster = client_with(FailingPool(TRANSPORT_ERRORS[error]))
    messages = set()
    for _ in range(2):
        with pytest.raises(ClusterError) as caught:
            await CALLS[call](cluster)
        assert caught.value.status is None
        assert caught.value.__cause__ is None  # raised "from None": no chained traceback in any log
        messages.add(assert_unavailable(caught.value, "reading" if call != "write" else "patching status"))
    assert len(messages) == 1, f"the message changes from pass to pass: {messages}"


class CutOffBody:
    """A response whose headers arrived and whose body breaks off: urllib3 raises while reading it."""

    status = 200
    reason = "OK"
    headers: dict[str, str] = {}

    def getheaders(self) -> dict[str, str]:
        return self.headers

    @property
    def data(self) -> bytes:
        raise urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead(0 bytes read)")

    def read(self, *_: Any) -> bytes:
        return self.data


async def test_a_body_that_breaks_off_while_it_is_read_is_a_cluster_error() -> None:
    class Pool:
        def request(self, *_: Any, **__: Any) -> CutOffBody:
            return CutOffBody()

        def clear(self) -> None:
            pass

    cluster = client_with(Pool())
    with pytest.raises(ClusterError) as caught:
        await cluster.jwks()
    assert_unavailable(caught.value, "reading /openid/v1/jwks")


async def test_a_port_nothing_listens_on_is_cluster_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there
    configuration = kubernetes.client.Configuration(host=f"http://127.0.0.1:{port}")
    cluster = ClusterClient(kubernetes.client.ApiClient(configuration))
    try:
        with pytest.raises(ClusterError) as caught:
            await cluster.read_service_account("shop", "default")
    finally:
        cluster.close()
    message = assert_unavailable(caught.value, "reading ServiceAccount shop/default")
    assert "Connection refused" in message


async def test_a_tls_failure_the_client_wraps_is_unavailable_not_an_answer() -> None:
    # The REST layer turns urllib3's SSLError into an ApiException with status 0: no server answered.
    def tls_failure() -> Exception:
        return ApiException(status=0, reason=f"SSLError\nhandshake failed for {TOKEN}\nat 0x7f00")

    cluster = client_with(FailingPool(tls_failure))
    with pytest.raises(ClusterError) as caught:
        await cluster.read_service_account("shop", "default")
    assert caught.value.status is None
    message = assert_unavailable(caught.value, "reading ServiceAccount shop/default")
    assert "answered 0" not in message
    assert "SSLError" in message


def test_a_forbidden_cluster_call_stalls_but_is_retried_on_the_backoff() -> None:
    failure = classify(
        ClusterError("reading ServiceAccount shop/default: Kubernetes API answered 403", status=403)
    )
    assert failure.health.phase is Phase.STALLED
    assert failure.health.reason == "ClusterForbidden"
    # Transient: retried on the backoff (at most CGID_MAX_BACKOFF), not only at the next resync; RBAC is
    # briefly denied while an API server starts.
    assert failure.transient


async def test_an_api_server_that_never_answers_is_a_timeout_not_a_thread_held_for_good() -> None:
    # It accepts the connection and never says a word: a half-open connection, a black-holed balancer.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    listener = threading.Thread(target=accept, daemon=True)
    listener.start()
    config = kubernetes.client.Configuration()
    config.host = f"http://127.0.0.1:{server.getsockname()[1]}"
    config.retries = 0  # one try: the point is that each try ends
    cluster = ClusterClient(kubernetes.client.ApiClient(config), timeout=0.3)
    try:
        with pytest.raises(ClusterError) as caught:
            await asyncio.wait_for(cluster.read_service_account("shop", "default"), timeout=10)
        assert caught.value.status is None
        assert "no answer from the Kubernetes API" in str(caught.value)
        assert held, "the request reached the server"
    finally:
        cluster.close()
        server.close()
        for connection in held:
            connection.close()
