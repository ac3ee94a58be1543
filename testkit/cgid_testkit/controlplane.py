"""A real Kubernetes control plane for the tests: etcd, kube-apiserver and kube-controller-manager.

The binaries are built from the Go module proxy by ``hack/controlplane/build.sh`` (cached per version),
or taken from a folder named by ``KUBEBUILDER_ASSETS`` the way controller-runtime's envtest does — what
``setup-envtest`` downloads holds kube-apiserver and etcd but no kube-controller-manager, so then the
garbage collector and the namespace controller do not run and the tests that need them say so.
``find_binaries`` looks in that order: ``KUBEBUILDER_ASSETS``, ``CGID_CONTROLPLANE_BIN``, the build
script's cache.

``ControlPlane`` starts everything on loopback with free ports in a temporary folder: etcd without
fsync; the API server with TLS (it makes its own serving certificate and CA, which clients are given),
RBAC, a static admin token in ``system:masters``, service-account tokens signed by a key made here, the
OIDC discovery endpoints (readable anonymously, as a cluster admin makes them public), and
``--endpoint-reconciler-type=none`` so nothing needs a routable address. ``rotate_signing_key``
restarts the API server with a new signing key while the old public key keeps verifying (the overlap a
real rotation has). Every process is stopped on ``stop`` — in reverse order, since an API server
whose etcd went first does not exit on SIGTERM — and killed if it does not stop in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "hack" / "controlplane" / "build.sh"
DEFAULT_CACHE = pathlib.Path.home() / ".cache" / "chainguard-identity-operator" / "controlplane"
READY_TIMEOUT = 60.0


class ControlPlaneUnavailable(Exception):
    """The binaries are not there (or do not start); the message says how to get them."""


@dataclasses.dataclass(frozen=True)
class Binaries:
    folder: pathlib.Path
    kube_apiserver: pathlib.Path
    etcd: pathlib.Path
    kube_controller_manager: pathlib.Path | None  # setup-envtest ships none
    source: str  # where they came from, for the test report


def _binaries_in(folder: pathlib.Path, source: str) -> Binaries | None:
    apiserver, etcd = folder / "kube-apiserver", folder / "etcd"
    if not (os.access(apiserver, os.X_OK) and os.access(etcd, os.X_OK)):
        return None
    manager = folder / "kube-controller-manager"
    return Binaries(folder, apiserver, etcd, manager if os.access(manager, os.X_OK) else None, source)


def find_binaries(env: Mapping[str, str] = os.environ) -> Binaries | None:
    """The control plane's binaries: envtest's KUBEBUILDER_ASSETS, then CGID_CONTROLPLANE_BIN, then the
    newest folder of build.sh's cache. None when there are none."""
    for variable in ("KUBEBUILDER_ASSETS", "CGID_CONTROLPLANE_BIN"):
        value = env.get(variable)
        if value:
            found = _binaries_in(pathlib.Path(value), variable)
            if found is None:
                raise ControlPlaneUnavailable(f"{variable}={value} holds no kube-apiserver and etcd")
            return found
    cache = pathlib.Path(env.get("CGID_CONTROLPLANE_CACHE") or DEFAULT_CACHE)
    if cache.is_dir():
        for folder in sorted(cache.iterdir(), reverse=True):
            found = _binaries_in(folder, f"{BUILD_SCRIPT.relative_to(ROOT)} cache")
            if found is not None:
                return found
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _private_key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclasses.dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: pathlib.Path


class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager when there is one), on loopback."""

    def __init__(self, binaries: Binaries, *, issuer: str, workdir: pathlib.Path | None = None) -> None:
        self.binaries = binaries
        self.issuer = issuer
        self._own_workdir = workdir is None
        self.workdir = workdir or pathlib.Path(tempfile.mkdtemp(prefix="cgid-controlplane-"))
        self.admin_token = secrets.token_urlsafe(32)
        self.api_port = _free_port()
        self.url = f"https://127.0.0.1:{self.api_port}"
        self.version = ""
        self._processes: dict[str, _Process] = {}
        self._signing_keys: list[pathlib.Path] = []  # private keys; the last one signs

    # -- paths a client needs ---------------------------------------------------------------------------

    @property
    def ca_file(self) -> pathlib.Path:
        """The API server's serving certificate with its self-signed CA: what clients trust."""
        return self.workdir / "certs" / "apiserver.crt"

    @property
    def kubeconfig(self) -> pathlib.Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def has_controller_manager(self) -> bool:
        return self.binaries.kube_controller_manager is not None

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def write_kubeconfig(self, path: pathlib.Path, token: str, *, user: str = "admin") -> pathlib.Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "cgid", "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)}}
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "cgid", "context": {"cluster": "cgid", "user": user}}],
            "current-context": "cgid",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def client(self, *, timeout: float = 30.0) -> httpx.AsyncClient:
        """An admin client of the API server."""
        return httpx.AsyncClient(
            base_url=self.url,
            verify=self.ssl_context(),
            timeout=timeout,
            headers={"Authorization": f"Bearer {self.admin_token}"},
        )

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        (self.workdir / "certs").mkdir(parents=True, exist_ok=True)
        (self.workdir / "tokens.csv").write_text(f"{self.admin_token},admin,admin-uid,system:masters\n")
        self._new_signing_key()
        self.write_kubeconfig(self.kubeconfig, self.admin_token)
        try:
            self._start_etcd()
            self._start_apiserver()
            self._wait_ready()
            self._make_discovery_public()
            if self.binaries.kube_controller_manager is not None:
                self._start_controller_manager()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop everything, newest first (the API server hangs on SIGTERM once etcd is gone)."""
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            process = self._processes.pop(name, None)
            if process is not None:
                self._terminate(process, kill=name != "etcd")
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def rotate_signing_key(self) -> None:
        """A key rotation as a cluster admin does it: a new signing key, the old public key still
        accepted (and published in the JWKS), the API server restarted. Blocks until it is ready."""
        self._new_signing_key()
        self._restart_apiserver()

    def retire_previous_keys(self) -> None:
        """End the overlap: only the newest key is accepted and published (API server restarted)."""
        self._signing_keys[:] = self._signing_keys[-1:]
        self._restart_apiserver()

    def _restart_apiserver(self) -> None:
        # The API server keeps no state of its own (etcd does), and its graceful shutdown waits for
        # every open watch to drain: a kill is the quick and faithful way to restart it.
        self._terminate(self._processes.pop("kube-apiserver"), kill=True)
        self._start_apiserver()
        self._wait_ready()

    # -- the processes ----------------------------------------------------------------------------------

    def _new_signing_key(self) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        path = self.workdir / f"sa-{len(self._signing_keys)}.key"
        path.write_bytes(_private_key_pem(key))
        path.chmod(0o600)
        path.with_suffix(".pub").write_bytes(_public_key_pem(key))
        self._signing_keys.append(path)

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        log = self.workdir / f"{name}.log"
        handle = log.open("ab")
        try:
            popen = subprocess.Popen(
                list(argv),
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            handle.close()
        self._processes[name] = _Process(name, popen, log)

    def _start_etcd(self) -> None:
        self.etcd_port, peer = _free_port(), _free_port()
        self._spawn(
            "etcd",
            [
                str(self.binaries.etcd),
                "--name=cgid",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=cgid=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )

    def _start_apiserver(self) -> None:
        argv = [
            str(self.binaries.kube_apiserver),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}",
            "--endpoint-reconciler-type=none",
            f"--cert-dir={self.workdir / 'certs'}",
            "--service-cluster-ip-range=10.0.0.0/24",
            f"--service-account-issuer={self.issuer}",
            f"--service-account-signing-key-file={self._signing_keys[-1]}",
            f"--api-audiences={self.issuer}",
            "--authorization-mode=RBAC",
            f"--token-auth-file={self.workdir / 'tokens.csv'}",
            "--profiling=false",
            "--v=1",
        ]
        argv += [f"--service-account-key-file={key.with_suffix('.pub')}" for key in self._signing_keys]
        self._spawn("kube-apiserver", argv)

    def _start_controller_manager(self) -> None:
        assert self.binaries.kube_controller_manager is not None
        self._spawn(
            "kube-controller-manager",
            [
                str(self.binaries.kube_controller_manager),
                f"--kubeconfig={self.kubeconfig}",
                "--controllers=garbagecollector,namespace,serviceaccount,serviceaccount-token",
                f"--service-account-private-key-file={self._signing_keys[-1]}",
                f"--root-ca-file={self.ca_file}",
                "--use-service-account-credentials=false",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
            ],
        )

    def restart_controller_manager(self) -> None:
        """The garbage collector learns of a CRD installed after it started only at its next resync
        (about 30 s): a restart makes it read the resources again at once."""
        process = self._processes.pop("kube-controller-manager", None)
        if process is None:
            return
        self._terminate(process, kill=True)
        self._start_controller_manager()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        context: ssl.SSLContext | None = None
        last = ""
        while time.monotonic() < deadline:
            for name, process in self._processes.items():
                if process.popen.poll() is not None:
                    raise ControlPlaneUnavailable(
                        f"{name} exited with {process.popen.returncode}:\n{self._tail(process)}"
                    )
            if context is None and self.ca_file.exists():
                context = self.ssl_context()
            if context is not None:
                try:
                    with httpx.Client(verify=context, timeout=2) as http:
                        headers = {"Authorization": f"Bearer {self.admin_token}"}
                        ready = http.get(f"{self.url}/readyz", headers=headers)
                        if ready.status_code == 200:
                            self.version = http.get(f"{self.url}/version", headers=headers).json()[
                                "gitVersion"
                            ]
                            return
                        last = f"/readyz answered {ready.status_code}"
                except (httpx.HTTPError, ssl.SSLError, ValueError) as exc:
                    last = type(exc).__name__
            time.sleep(0.1)  # polling a starting process; the condition is /readyz
        process = self._processes["kube-apiserver"]
        raise ControlPlaneUnavailable(
            f"kube-apiserver not ready in {READY_TIMEOUT}s ({last}):\n{self._tail(process)}"
        )

    def _make_discovery_public(self) -> None:
        """What a cluster admin does so that an STS can fetch the issuer's keys: allow anonymous reads
        of the discovery document and the JWKS (the built-in role exists; only the binding is new)."""
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "cgid-public-oidc-discovery"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:service-account-issuer-discovery",
            },
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:unauthenticated"}
            ],
        }
        with httpx.Client(verify=self.ssl_context(), timeout=10) as http:
            response = http.post(
                f"{self.url}/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
                json=binding,
                headers={"Authorization": f"Bearer {self.admin_token}"},
            )
            if response.status_code not in (201, 409):
                raise ControlPlaneUnavailable(
                    f"making OIDC discovery public: {response.status_code} {response.text}"
                )

    @staticmethod
    def _tail(process: _Process, lines: int = 30) -> str:
        try:
            return "\n".join(process.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @staticmethod
    def _terminate(process: _Process, *, kill: bool = False) -> None:
        popen = process.popen
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                popen.wait(timeout=15)


def build(*, env: Mapping[str, str] = os.environ) -> Binaries:
    """Run the build script (a no-op when its cache is warm) and return what it built."""
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, check=False, env=dict(env)
    )
    if result.returncode != 0:
        raise ControlPlaneUnavailable(f"{BUILD_SCRIPT} failed:\n{result.stderr[-4000:]}")
    folder = pathlib.Path(result.stdout.strip().splitlines()[-1])
    found = _binaries_in(folder, f"{BUILD_SCRIPT.relative_to(ROOT)}")
    if found is None:
        raise ControlPlaneUnavailable(f"{BUILD_SCRIPT} printed {folder}, which holds no binaries")
    return found


async def wait_established(client: httpx.AsyncClient, crd_name: str, *, timeout: float = 30.0) -> None:
    """Until the API server serves a CRD it was given."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        response = await client.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd_name}")
        conditions: list[dict[str, Any]] = (response.json().get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"CRD {crd_name} not Established within {timeout}s")
        await asyncio.sleep(0.1)  # polling interval; the condition decides
