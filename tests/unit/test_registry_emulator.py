"""The registry emulator, walked through the pull protocol: first with httpx step by step, then with crane.

Every credential is a real one: a projected service-account token signed here is exchanged at the
Chainguard emulator's STS for an identity (static keys), and the exchanged token — audience the
registry's name — is the ``_token`` password, exactly what a pull secret holds. The protocol tests
check each answer (challenge, token handshake, manifest and blobs with their digests, each refusal);
the crane tests hand the same credentials to go-containerregistry's crane, a client nobody here
wrote, through a docker config file, and check it pulls with a live token and fails with an expired
one. crane comes from ``hack/tools/build.sh`` (``make test`` builds it); without it those tests skip,
except under CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import gzip
import hashlib
import io
import json
import os
import pathlib
import re
import ssl
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from cgid_testkit.chainguard import ChainguardEmulator
from cgid_testkit.registry import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, RegistryEmulator
from chainguard_identity_operator.chainguard.types import format_time

START = datetime.datetime(2026, 11, 23, 10, 0, tzinfo=datetime.UTC)
CLUSTER_ISSUER = "https://oidc.cluster.example"
SUBJECT = "system:serviceaccount:shop:default"
ORG = "my-org.example"
REPO = f"{ORG}/python"
TLS = ssl.create_default_context()  # one for every client (all traffic is plain HTTP on loopback)

Exchange = Callable[..., Awaitable[str]]


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += datetime.timedelta(**delta)


@dataclasses.dataclass(frozen=True)
class Seeded:
    org: str
    puller: str  # holds registry.pull on the org
    viewer: str  # holds viewer (repo.list, no registry.pull) on the org


@pytest.fixture(scope="module")
def emulator_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def cluster_key() -> rsa.RSAPrivateKey:
    """The cluster's service-account signing key, registered as the identities' static keys."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def cg(clock: FakeClock, emulator_key: rsa.RSAPrivateKey) -> AsyncIterator[ChainguardEmulator]:
    async with ChainguardEmulator(clock=clock, signing_key=emulator_key) as emulator:
        yield emulator


@pytest.fixture
async def registry(cg: ChainguardEmulator) -> AsyncIterator[RegistryEmulator]:
    async with RegistryEmulator(cg) as emulated:
        yield emulated


def _jwks(key: rsa.RSAPrivateKey) -> str:
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return json.dumps({"keys": [{**jwk, "kid": "cluster-key", "alg": "RS256", "use": "sig"}]})


@pytest.fixture
def seeded(cg: ChainguardEmulator, cluster_key: rsa.RSAPrivateKey) -> Seeded:
    org = cg.add_group(ORG, verified=True)
    cg.add_repo(org, "python")
    cg.add_repo(org, "go")
    identities = []
    for name, role in (("puller", "registry.pull"), ("viewer", "viewer")):
        body = {
            "name": name,
            "staticKeys": {
                "issuer": CLUSTER_ISSUER,
                "subject": SUBJECT,
                "issuerKeys": _jwks(cluster_key),
                "expirationTime": format_time(START + datetime.timedelta(days=30)),
            },
        }
        uid = cg.add_identity(org, body)
        cg.bind(uid, org, role)
        identities.append(uid)
    return Seeded(org=org, puller=identities[0], viewer=identities[1])


@pytest.fixture
def exchange(cg: ChainguardEmulator, clock: FakeClock, cluster_key: rsa.RSAPrivateKey) -> Exchange:
    """``await exchange(identity, aud)``: a Chainguard token from the emulator's real STS, for a
    projected service-account token signed with the cluster's key (what the operator does)."""

    async def run(identity: str, aud: str) -> str:
        now = int(clock().timestamp())
        claims = {"iss": CLUSTER_ISSUER, "sub": SUBJECT, "aud": ["issuer.enforce.dev"], "iat": now}
        presented = jwt.encode(
            {**claims, "exp": now + 600}, cluster_key, algorithm="RS256", headers={"kid": "cluster-key"}
        )
        async with httpx.AsyncClient(timeout=5, verify=TLS) as client:
            response = await client.post(
                f"{cg.sts_url}/sts/exchange",
                data={"aud": aud, "identity": identity},
                headers={"Authorization": f"Bearer {presented}"},
            )
        assert response.status_code == 200, response.text
        token: str = response.json()["token"]
        return token

    return run


def basic(token: str) -> str:
    return "Basic " + base64.b64encode(f"_token:{token}".encode()).decode()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse_challenge(value: str) -> dict[str, str]:
    scheme, _, params = value.partition(" ")
    assert scheme == "Bearer"
    return dict(re.findall(r'(\w+)="([^"]*)"', params))


def only_error(response: httpx.Response) -> dict[str, Any]:
    errors = response.json()["errors"]
    assert len(errors) == 1, errors
    error: dict[str, Any] = errors[0]
    return error


async def handshake(
    client: httpx.AsyncClient, registry: RegistryEmulator, token: str, repo: str = REPO
) -> httpx.Response:
    """The token request a client makes after the challenge, with the ``_token`` basic credentials."""
    return await client.get(
        "/token",
        params={"service": registry.name, "scope": f"repository:{repo}:pull"},
        headers={"Authorization": basic(token)},
    )


@pytest.fixture
async def http(registry: RegistryEmulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=registry.url, timeout=5, verify=TLS) as client:
        yield client


# -- the protocol, step by step -----------------------------------------------------------------------


async def test_the_base_endpoint_challenges_a_client_without_credentials(
    http: httpx.AsyncClient, registry: RegistryEmulator
) -> None:
    response = await http.get("/v2/")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == (
        f'Bearer realm="http://{registry.host}/token",service="{registry.host}"'
    )
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert only_error(response)["code"] == "UNAUTHORIZED"
    assert registry.name == registry.host
    assert registry.url == f"http://{registry.host}"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", registry.host)


async def test_a_pull_walks_the_handshake_and_gets_a_valid_image(
    http: httpx.AsyncClient, registry: RegistryEmulator, seeded: Seeded, exchange: Exchange
) -> None:
    token = await exchange(seeded.puller, registry.name)
    challenge = parse_challenge((await http.get("/v2/")).headers["WWW-Authenticate"])
    assert challenge == {"realm": f"{registry.url}/token", "service": registry.name}

    answer = await http.get(
        challenge["realm"],
        params={"service": challenge["service"], "scope": f"repository:{REPO}:pull"},
        headers={"Authorization": basic(token)},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"token", "access_token", "expires_in", "issued_at"}
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300
    assert body["issued_at"] == "2026-11-23T10:00:00Z"
    bearer = {"Authorization": f"Bearer {body['token']}"}

    assert (await http.get("/v2/", headers=bearer)).status_code == 200

    got = await http.get(f"/v2/{REPO}/manifests/latest", headers=bearer)
    assert got.status_code == 200, got.text
    digest = sha256(got.content)
    assert got.headers["Content-Type"] == OCI_MANIFEST
    assert got.headers["Docker-Content-Digest"] == digest
    assert int(got.headers["Content-Length"]) == len(got.content)
    manifest = got.json()
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["config"]["mediaType"] == OCI_CONFIG
    assert [layer["mediaType"] for layer in manifest["layers"]] == [OCI_LAYER]
    assert digest == registry.image(REPO).digest

    by_digest = await http.get(f"/v2/{REPO}/manifests/{digest}", headers=bearer)
    assert by_digest.status_code == 200
    assert by_digest.content == got.content

    head = await http.head(f"/v2/{REPO}/manifests/latest", headers=bearer)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["Content-Length"] == str(len(got.content))
    assert head.headers["Docker-Content-Digest"] == digest
    assert head.headers["Content-Type"] == OCI_MANIFEST

    blobs: dict[str, bytes] = {}
    for descriptor in (manifest["config"], *manifest["layers"]):
        blob = await http.get(f"/v2/{REPO}/blobs/{descriptor['digest']}", headers=bearer)
        assert blob.status_code == 200
        assert sha256(blob.content) == descriptor["digest"] == blob.headers["Docker-Content-Digest"]
        assert len(blob.content) == descriptor["size"] == int(blob.headers["Content-Length"])
        head = await http.head(f"/v2/{REPO}/blobs/{descriptor['digest']}", headers=bearer)
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["Content-Length"] == str(descriptor["size"])
        assert head.headers["Docker-Content-Digest"] == descriptor["digest"]
        blobs[descriptor["digest"]] = blob.content

    # The config names the uncompressed layer by its diff_id, as an image config must.
    config = json.loads(blobs[manifest["config"]["digest"]])
    layer_tar = gzip.decompress(blobs[manifest["layers"][0]["digest"]])
    assert config["rootfs"] == {"type": "layers", "diff_ids": [sha256(layer_tar)]}
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as tar:
        member = tar.extractfile("etc/emulated-image")
        assert member is not None
        assert member.read() == f"emulated image of {REPO}\n".encode()

    assert (await http.get(f"/v2/{REPO}/tags/list", headers=bearer)).json() == {
        "name": REPO,
        "tags": ["latest"],
    }

    steps = [(r.method, r.path, r.status, r.credentials) for r in registry.requests[:4]]
    assert steps == [
        ("GET", "/v2/", 401, ""),
        ("GET", "/token", 200, "basic"),
        ("GET", "/v2/", 200, "bearer"),
        ("GET", f"/v2/{REPO}/manifests/latest", 200, "bearer"),
    ]
    assert {r.subject for r in registry.requests[1:]} == {seeded.puller}
    assert token not in repr(registry.requests)
    assert body["token"] not in repr(registry.requests)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("expired", "token is expired (at 2026-11-23T11:00:00Z)"),
        ("wrong audience", "wrong audience (cgr.dev), this registry accepts 127.0.0.1:"),
        ("no registry.pull", "is not allowed to pull my-org.example/python: it needs registry.pull"),
        ("identity deleted", "does not exist"),
        ("root admin, not an identity", "identity admin@example.com does not exist"),
        ("console API token", "wrong audience (https://console-api.enforce.dev)"),
        ("not the emulator's key", "not signed by https://issuer.enforce.dev (bad signature)"),
    ],
)
async def test_the_token_service_refuses(
    http: httpx.AsyncClient,
    registry: RegistryEmulator,
    cg: ChainguardEmulator,
    seeded: Seeded,
    exchange: Exchange,
    clock: FakeClock,
    case: str,
    message: str,
) -> None:
    if case == "expired":
        token = await exchange(seeded.puller, registry.name)
        assert (await handshake(http, registry, token)).status_code == 200  # it worked an hour ago
        clock.advance(hours=1)
    elif case == "wrong audience":
        token = await exchange(seeded.puller, "cgr.dev")
    elif case == "no registry.pull":
        token = await exchange(seeded.viewer, registry.name)
    elif case == "identity deleted":
        token = await exchange(seeded.puller, registry.name)
        del cg.identities[seeded.puller]
    elif case == "root admin, not an identity":
        token = cg.mint_api_token("admin@example.com", audience=registry.name)
    elif case == "console API token":
        token = await exchange(seeded.puller, "https://console-api.enforce.dev")
    else:
        impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        real = jwt.decode(await exchange(seeded.puller, registry.name), options={"verify_signature": False})
        kid = cg.jwks()["keys"][0]["kid"]
        token = jwt.encode(real, impostor, algorithm="RS256", headers={"kid": kid})

    response = await handshake(http, registry, token)
    assert response.status_code == 401, response.text
    error = only_error(response)
    assert error["code"] == ("DENIED" if case == "no registry.pull" else "UNAUTHORIZED")
    assert message in error["message"]
    assert registry.requests[-1].error == error["message"]


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        (None, "authentication required: basic credentials, username _token"),
        ("Basic " + base64.b64encode(b"robot:secret").decode(), "the username must be _token"),
        ("Basic not-base64!", "malformed basic credentials"),
        ("Basic " + base64.b64encode(b"_token:not-a-jwt").decode(), "malformed jwt"),
    ],
)
async def test_the_token_service_wants_token_basic_credentials(
    http: httpx.AsyncClient, authorization: str | None, message: str
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = await http.get("/token", params={"scope": f"repository:{REPO}:pull"}, headers=headers)
    assert response.status_code == 401
    assert message in only_error(response)["message"]


async def test_the_token_service_checks_the_service(
    http: httpx.AsyncClient, seeded: Seeded, exchange: Exchange, registry: RegistryEmulator
) -> None:
    token = await exchange(seeded.puller, registry.name)
    response = await http.get(
        "/token", params={"service": "cgr.dev"}, headers={"Authorization": basic(token)}
    )
    assert response.status_code == 400
    assert "is not this registry" in only_error(response)["message"]
    # Without a scope (docker login) only the credentials are checked.
    login = await http.get(
        "/token", params={"service": registry.name}, headers={"Authorization": basic(token)}
    )
    assert login.status_code == 200


async def test_the_api_wants_a_live_bearer_for_that_repository(
    http: httpx.AsyncClient, registry: RegistryEmulator, seeded: Seeded, exchange: Exchange, clock: FakeClock
) -> None:
    path = f"/v2/{REPO}/manifests/latest"
    scope = f"repository:{REPO}:pull"

    anonymous = await http.get(path)
    assert anonymous.status_code == 401
    assert parse_challenge(anonymous.headers["WWW-Authenticate"]) == {
        "realm": f"{registry.url}/token",
        "service": registry.name,
        "scope": scope,
    }
    head = await http.head(path)
    assert (head.status_code, head.content) == (401, b"")
    assert "WWW-Authenticate" in head.headers

    forged = await http.get(path, headers={"Authorization": "Bearer " + jwt.encode({"sub": "x"}, "k" * 32)})
    assert forged.status_code == 401
    assert parse_challenge(forged.headers["WWW-Authenticate"])["error"] == "invalid_token"

    token = (await handshake(http, registry, await exchange(seeded.puller, registry.name))).json()["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    other = await http.get(f"/v2/{ORG}/go/manifests/latest", headers=bearer)  # scoped to python only
    assert other.status_code == 401
    challenge = parse_challenge(other.headers["WWW-Authenticate"])
    assert (challenge["scope"], challenge["error"]) == (f"repository:{ORG}/go:pull", "insufficient_scope")

    assert (await http.get(path, headers=bearer)).status_code == 200
    clock.advance(seconds=300)  # the registry's own token lives five minutes
    expired = await http.get(path, headers=bearer)
    assert expired.status_code == 401
    assert "token is expired" in only_error(expired)["message"]
    assert parse_challenge(expired.headers["WWW-Authenticate"])["error"] == "invalid_token"


async def test_unknown_repositories_tags_and_blobs_are_404(
    http: httpx.AsyncClient, registry: RegistryEmulator, seeded: Seeded, exchange: Exchange
) -> None:
    token = await exchange(seeded.puller, registry.name)
    missing = f"{ORG}/no-such-image"
    bearer = {"Authorization": f"Bearer {(await handshake(http, registry, token, missing)).json()['token']}"}
    response = await http.get(f"/v2/{missing}/manifests/latest", headers=bearer)
    assert response.status_code == 404
    assert only_error(response)["code"] == "NAME_UNKNOWN"

    bearer = {"Authorization": f"Bearer {(await handshake(http, registry, token)).json()['token']}"}
    tag = await http.get(f"/v2/{REPO}/manifests/v9.9", headers=bearer)
    assert (tag.status_code, only_error(tag)["code"]) == (404, "MANIFEST_UNKNOWN")
    blob = await http.get(f"/v2/{REPO}/blobs/{sha256(b'nothing')}", headers=bearer)
    assert (blob.status_code, only_error(blob)["code"]) == (404, "BLOB_UNKNOWN")

    # An organization that does not exist is refused like a forbidden one: nothing leaks.
    nowhere = await handshake(http, registry, token, "other-org.example/python")
    assert (nowhere.status_code, only_error(nowhere)["code"]) == (401, "DENIED")


async def test_a_binding_on_the_organization_covers_a_folders_repository(
    http: httpx.AsyncClient,
    registry: RegistryEmulator,
    cg: ChainguardEmulator,
    seeded: Seeded,
    exchange: Exchange,
) -> None:
    folder = cg.add_group("team", parent=seeded.org)
    cg.add_repo(folder, "node")
    token = await exchange(seeded.puller, registry.name)
    answer = await handshake(http, registry, token, f"{ORG}/node")
    assert answer.status_code == 200
    bearer = {"Authorization": f"Bearer {answer.json()['token']}"}
    assert (await http.get(f"/v2/{ORG}/node/manifests/latest", headers=bearer)).status_code == 200


async def test_a_named_registry_accepts_its_own_audience(
    cg: ChainguardEmulator, seeded: Seeded, exchange: Exchange
) -> None:
    async with (
        RegistryEmulator(cg, name="cgr.dev") as registry,
        httpx.AsyncClient(base_url=registry.url, timeout=5, verify=TLS) as http,
    ):
        challenge = parse_challenge((await http.get("/v2/")).headers["WWW-Authenticate"])
        assert challenge == {"realm": f"{registry.url}/token", "service": "cgr.dev"}
        assert (await handshake(http, registry, await exchange(seeded.puller, "cgr.dev"))).status_code == 200
        refused = await handshake(http, registry, await exchange(seeded.puller, registry.host))
        assert refused.status_code == 401


# -- a real client: crane (go-containerregistry) ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str


def docker_config(folder: pathlib.Path, host: str, token: str) -> pathlib.Path:
    """A docker config folder as a ``kubernetes.io/dockerconfigjson`` pull secret's content."""
    folder.mkdir(exist_ok=True)
    auth = base64.b64encode(f"_token:{token}".encode()).decode()
    (folder / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return folder


async def run_crane(crane: pathlib.Path, config: pathlib.Path, *args: str) -> Run:
    """crane in a subprocess (never blocking the loop the emulators serve on), with only that config."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(config), "DOCKER_CONFIG": str(config)}
    process = await asyncio.create_subprocess_exec(
        str(crane), *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return Run(process.returncode or 0, stdout.decode(), stderr.decode())


async def test_crane_pulls_with_the_pull_secret_and_fails_once_it_expires(
    crane: pathlib.Path,
    registry: RegistryEmulator,
    seeded: Seeded,
    exchange: Exchange,
    clock: FakeClock,
    tmp_path: pathlib.Path,
) -> None:
    config = docker_config(tmp_path / "docker", registry.host, await exchange(seeded.puller, registry.name))
    image = registry.image(REPO)
    ref = f"{registry.host}/{REPO}:latest"

    manifest = await run_crane(crane, config, "manifest", "--insecure", ref)
    assert manifest.returncode == 0, manifest.stderr
    assert manifest.stdout.encode() == image.manifest.data

    digest = await run_crane(crane, config, "digest", "--insecure", ref)
    assert digest.returncode == 0, digest.stderr
    assert digest.stdout.strip() == image.digest == sha256(manifest.stdout.encode())

    blob = await run_crane(crane, config, "config", "--insecure", ref)
    assert blob.returncode == 0, blob.stderr
    assert blob.stdout.encode() == image.config.data

    # crane downloads every layer and checks each digest and diff_id against the manifest and config.
    valid = await run_crane(crane, config, "validate", "--insecure", "--remote", ref)
    assert valid.returncode == 0, valid.stderr
    assert "PASS" in valid.stdout

    by_digest = await run_crane(
        crane, config, "manifest", "--insecure", f"{registry.host}/{REPO}@{image.digest}"
    )
    assert by_digest.returncode == 0, by_digest.stderr

    assert {r.subject for r in registry.requests if r.credentials} == {seeded.puller}
    token_requests = [r for r in registry.requests if r.path == "/token"]
    assert token_requests
    assert all(r.status == 200 for r in token_requests)

    registry.requests.clear()
    clock.advance(hours=1)  # the exchanged token's lifetime
    expired = await run_crane(crane, config, "manifest", "--insecure", ref)
    assert expired.returncode != 0
    assert "UNAUTHORIZED" in expired.stderr
    assert "token is expired" in expired.stderr
    assert [(r.path, r.status) for r in registry.requests] == [("/v2/", 401), ("/token", 401)]


async def test_crane_is_refused_without_registry_pull_and_for_an_unknown_repository(
    crane: pathlib.Path,
    registry: RegistryEmulator,
    seeded: Seeded,
    exchange: Exchange,
    tmp_path: pathlib.Path,
) -> None:
    viewer = docker_config(tmp_path / "viewer", registry.host, await exchange(seeded.viewer, registry.name))
    denied = await run_crane(crane, viewer, "manifest", "--insecure", f"{registry.host}/{REPO}:latest")
    assert denied.returncode != 0
    assert "DENIED" in denied.stderr
    assert "needs registry.pull" in denied.stderr

    puller = docker_config(tmp_path / "puller", registry.host, await exchange(seeded.puller, registry.name))
    unknown = await run_crane(crane, puller, "manifest", "--insecure", f"{registry.host}/{ORG}/nope:latest")
    assert unknown.returncode != 0
    assert "NAME_UNKNOWN" in unknown.stderr
