"""The real ``kubectl`` against the Kubernetes emulator: what used to fail on it and works like a cluster now.

Each test starts an emulator (``KubeEmulator`` + ``kmock.Server``, as the harness does) with the CRD from
``crds/chainguardidentity.yaml`` and runs the installed kubectl (v1.32) in a subprocess, always with a
timeout, and with its own discovery cache so that nothing leaks between tests or into ``~/.kube``.

``MALFORMED`` (``cgid_testkit.malformed``) is the table of bad (and two good) ChainguardIdentity manifests;
tests/integration/test_malformed.py runs the same table against the real kube-apiserver of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import pathlib
import re
import shutil
from collections.abc import AsyncIterator
from typing import Any

import httpx
import kmock
import pytest
import yaml

from cgid_testkit.harness import wait_until
from cgid_testkit.kube import KubeEmulator, write_kubeconfig
from cgid_testkit.malformed import MALFORMED, Malformed, manifest

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "chainguardidentity.yaml"
GROUP, VERSION, PLURAL = "iam.chainguard.dev", "v1alpha1", "chainguardidentities"
CGIDS = f"/apis/{GROUP}/{VERSION}/namespaces/shop/{PLURAL}"
KUBECTL_TIMEOUT = 20.0


@dataclasses.dataclass
class Cluster:
    kube: KubeEmulator
    url: str
    kubeconfig: pathlib.Path
    cache: pathlib.Path

    def args(self, *args: str) -> list[str]:
        return ["kubectl", "--kubeconfig", str(self.kubeconfig), "--cache-dir", str(self.cache), *args]

    async def kubectl(self, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
        """Run kubectl to completion (the emulator keeps serving meanwhile): (exit code, stdout, stderr)."""
        process = await asyncio.create_subprocess_exec(
            *self.args(*args),
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(KUBECTL_TIMEOUT):
                out, err = await process.communicate(stdin.encode() if stdin is not None else None)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    async def ok(self, *args: str, stdin: str | None = None) -> str:
        code, out, err = await self.kubectl(*args, stdin=stdin)
        assert code == 0, f"kubectl {' '.join(args)} failed: {err}"
        return out

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=10)


@pytest.fixture
async def cluster(tmp_path: pathlib.Path) -> AsyncIterator[Cluster]:
    async with KubeEmulator() as kube, kmock.Server(kube) as server:
        kube.install_crd(yaml.safe_load(CRD_FILE.read_text(encoding="utf-8")))
        kube.add_namespace("shop")
        kubeconfig = tmp_path / "kubeconfig"
        write_kubeconfig(kubeconfig, str(server.url), namespace="shop")
        yield Cluster(kube, str(server.url).rstrip("/"), kubeconfig, tmp_path / "kube-cache")


def words(text: str) -> str:
    """Whitespace-normalised text (kubectl wraps long lines)."""
    return " ".join(text.split())


# -- 1. schema and CEL enforcement -----------------------------------------------------------------------


@pytest.mark.parametrize("case", MALFORMED, ids=[case.name for case in MALFORMED])
async def test_kubectl_create_is_refused_or_accepted_like_a_cluster(
    cluster: Cluster, case: Malformed
) -> None:
    code, out, err = await cluster.kubectl("create", "-f", "-", "-o", "json", stdin=case.manifest)
    stored = cluster.kube.current(f"{GROUP}/{VERSION}/{PLURAL}", "shop", case.name)
    if case.expected == "rejected":
        assert code != 0, out
        assert stored is None
        assert case.message in err, err
        assert case.field is not None
        assert f"{case.field}:" in err or f'"{case.field}"' in err, err
    else:
        assert code == 0, err
        assert stored is not None
        assert json.loads(out)["spec"] == stored["spec"]
        assert stored["spec"]["mode"] == "Auto"  # defaults applied
        assert stored["spec"]["static"] == {"validFor": "720h"}  # a defaulted object gets its own defaults


async def test_an_invalid_object_gets_the_status_kube_apiserver_sends(cluster: Cluster) -> None:
    body = yaml.safe_load(manifest("fancy", "parentName: my-org\nmode: Fancy"))
    async with cluster.client() as api:
        response = await api.post(CGIDS, json=body)
    assert response.status_code == 422
    unchecked = (
        "some validation rules were not checked because the object was invalid; correct the existing errors"
        " to complete validation"
    )
    supported = 'Unsupported value: "Fancy": supported values: "Auto", "ClaimMatch", "Static"'
    assert response.json() == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f'ChainguardIdentity.iam.chainguard.dev "fancy" is invalid: [spec.mode: {supported},'
        f" <nil>: Invalid value: null: {unchecked}]",  # v1.37: JSON null (v1.32: the string \"null\")
        "reason": "Invalid",
        "details": {
            "name": "fancy",
            "group": GROUP,
            "kind": "ChainguardIdentity",
            "causes": [
                {"reason": "FieldValueNotSupported", "message": supported, "field": "spec.mode"},
                {
                    "reason": "FieldValueInvalid",
                    "message": f"Invalid value: null: {unchecked}",
                    "field": "<nil>",
                },
            ],
        },
        "code": 422,
    }


async def test_kubectl_field_validation_strict_warn_and_ignore(cluster: Cluster) -> None:
    good = manifest("puller", "parentName: my-org")
    extra = manifest("puller", "parentName: my-org\nbogus: 1")
    assert "created" in await cluster.ok("apply", "-f", "-", stdin=good)
    code, _, err = await cluster.kubectl("apply", "-f", "-", stdin=extra)  # --validate=strict by default
    assert code != 0
    assert 'strict decoding error: unknown field "spec.bogus"' in err
    code, _, err = await cluster.kubectl("apply", "--validate=warn", "-f", "-", stdin=extra)
    assert code == 0, err
    assert 'Warning: unknown field "spec.bogus"' in err
    code, _, err = await cluster.kubectl("apply", "--validate=false", "-f", "-", stdin=extra)
    assert code == 0, err
    assert "Warning" not in err
    stored = cluster.kube.current(f"{GROUP}/{VERSION}/{PLURAL}", "shop", "puller")
    assert stored is not None
    assert "bogus" not in stored["spec"]  # pruned, as the schema does not preserve unknown fields


async def test_kubectl_patch_and_replace_are_validated_too(cluster: Cluster) -> None:
    await cluster.ok("create", "-f", "-", stdin=manifest("puller", "parentName: my-org"))
    code, _, err = await cluster.kubectl(
        "patch", "cgid", "puller", "--type=merge", "-p", '{"spec":{"parent":"x"}}'
    )
    assert code != 0
    assert 'spec.parent: Invalid value: "x": spec.parent in body should match' in err
    assert (
        "exactly one of spec.parent and spec.parentName must be set" in err
    )  # pattern errors do not block CEL
    code, _, err = await cluster.kubectl(
        "patch",
        "cgid",
        "puller",
        "--type=json",
        "-p",
        '[{"op": "replace", "path": "/spec/roles", "value": []}]',
    )
    assert code != 0
    assert "spec.roles in body should have at least 1 items" in err
    code, _, err = await cluster.kubectl(
        "replace",
        "-f",
        "-",
        stdin=manifest("puller", "parentName: my-org\nstatic: {validFor: 1h, renewBefore: 2h}"),
    )
    assert code != 0
    assert "spec.static.renewBefore must be shorter than spec.static.validFor" in err
    assert "puller replaced" in await cluster.ok(
        "replace", "-f", "-", stdin=manifest("puller", "parentName: my-org\nstatic: {validFor: 2h}")
    )


async def test_kubectl_status_patches_are_validated_against_the_status_schema(cluster: Cluster) -> None:
    await cluster.ok("create", "-f", "-", stdin=manifest("puller", "parentName: my-org"))
    code, _, err = await cluster.kubectl(
        "patch", "cgid", "puller", "--subresource=status", "--type=merge", "-p", '{"status":{"mode":"Auto"}}'
    )
    assert code != 0
    assert 'status.mode: Unsupported value: "Auto": supported values: "Static", "ClaimMatch"' in err
    code, _, err = await cluster.kubectl(
        "patch",
        "cgid",
        "puller",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"expiresAt":"soon"}}',
    )
    assert code != 0
    assert (
        'status.expiresAt: Invalid value: "soon": status.expiresAt in body must be of type date-time: "soon"'
        in err
    )
    status = '{"status":{"mode":"Static","expiresAt":"2030-01-01T00:00:00Z","kopf":{"any":{"thing":1}}}}'
    await cluster.ok("patch", "cgid", "puller", "--subresource=status", "--type=merge", "-p", status)
    stored = cluster.kube.current(f"{GROUP}/{VERSION}/{PLURAL}", "shop", "puller")
    assert stored is not None
    assert stored["status"]["kopf"] == {"any": {"thing": 1}}  # x-kubernetes-preserve-unknown-fields


# -- 2. watches ---------------------------------------------------------------------------------------------


class Streaming:
    """A kubectl that keeps running (``get -w``): its output lines, read in the background."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            async with self._changed:
                self.lines.append(raw.decode().rstrip("\n"))
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, pattern: str, *, after: int = 0, timeout: float = 10) -> int:
        """The index of the first line from ``after`` on that matches ``pattern`` (a regex)."""
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for index in range(after, len(self.lines)):
                    if re.search(pattern, self.lines[index]):
                        return index
                if self._reader.done():
                    assert self.process.stderr is not None
                    err = (await self.process.stderr.read()).decode()
                    raise AssertionError(f"kubectl ended: {err}; output: {self.lines}")
                await self._changed.wait()


@contextlib.asynccontextmanager
async def streaming(cluster: Cluster, *args: str) -> AsyncIterator[Streaming]:
    process = await asyncio.create_subprocess_exec(
        *cluster.args(*args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stream = Streaming(process)
    try:
        yield stream
    finally:
        if process.returncode is None:
            process.kill()
        await asyncio.wait_for(process.wait(), timeout=10)
        stream._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stream._reader


async def watch_started(kube: KubeEmulator) -> None:
    """Until kubectl has opened its watch (after its list): only events from now on prove the watch."""

    async def opened() -> bool:
        return any(r.params.get("watch") == "true" for r in list(kube))

    await wait_until(opened, what="kubectl's watch request", timeout=10)


async def create_and_set_mode(cluster: Cluster, name: str) -> None:
    async with cluster.client() as api:
        body = yaml.safe_load(manifest(name, "parentName: my-org"))
        assert (await api.post(CGIDS, json=body)).status_code == 201
        patch = {"status": {"mode": "Static"}}
        headers = {"Content-Type": "application/merge-patch+json"}
        assert (await api.patch(f"{CGIDS}/{name}/status", json=patch, headers=headers)).status_code == 200


async def test_kubectl_get_watch_prints_rows_as_objects_change(cluster: Cluster) -> None:
    async with streaming(cluster, "get", "cgid", "-w") as kubectl:
        await watch_started(cluster.kube)
        await create_and_set_mode(cluster, "watched")
        first = await kubectl.wait_for(r"^watched\s+\d+s$")  # empty cells: nothing in the status yet
        # Later events carry no column definitions; kubectl lays them out with the first ones.
        await kubectl.wait_for(r"^watched\s+Static\s+\d+s$", after=first + 1)
        header = await kubectl.wait_for(r"^NAME\s+IDENTITY ID\s+MODE\s+READY\s+EXPIRES\s+AGE$")
        assert header < first


async def test_kubectl_get_watch_across_namespaces(cluster: Cluster) -> None:
    async with streaming(cluster, "get", "cgid", "-A", "-w") as kubectl:
        await watch_started(cluster.kube)
        await create_and_set_mode(cluster, "everywhere")
        await kubectl.wait_for(r"^NAMESPACE\s+NAME\s+IDENTITY ID")
        await kubectl.wait_for(r"^shop\s+everywhere\s+Static\s+\d+s$")


async def test_kubectl_get_watch_as_yaml(cluster: Cluster) -> None:
    async with streaming(cluster, "get", "cgid", "-o", "yaml", "-w") as kubectl:
        await watch_started(cluster.kube)
        await create_and_set_mode(cluster, "yamled")
        first = await kubectl.wait_for(r"^  name: yamled$")
        second = await kubectl.wait_for(r"^  name: yamled$", after=first + 1)  # the status change
        status = await kubectl.wait_for(r"^status:$", after=second)
        assert kubectl.lines[status + 1] == "  mode: Static"
        assert "    validFor: 720h" in kubectl.lines  # the defaulted spec


async def test_watches_answer_with_the_json_stream_content_type(cluster: Cluster) -> None:
    async with cluster.client() as api:
        params = {"watch": "true", "timeoutSeconds": "1"}
        async with api.stream("GET", CGIDS, params=params) as response:
            assert response.headers["Content-Type"] == "application/json"
        table = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"}
        await create_and_set_mode(cluster, "tabled")
        async with api.stream(
            "GET", CGIDS, params=params | {"resourceVersion": "1"}, headers=table
        ) as response:
            events = [json.loads(line) async for line in response.aiter_lines() if line.strip()]
    assert [event["object"]["kind"] for event in events] == ["Table", "Table"]
    first, second = (event["object"] for event in events)
    assert [c["name"] for c in first["columnDefinitions"]][:3] == ["Name", "Identity ID", "Mode"]
    assert second["columnDefinitions"] is None  # sent once per watch, as the API server does
    assert second["rows"][0]["cells"][:3] == ["tabled", None, "Static"]  # a missing value is null
    assert second["rows"][0]["object"]["metadata"]["namespace"] == "shop"


# -- 3. protobuf bodies of kubectl's typed clients ---------------------------------------------------------


async def test_kubectl_creates_built_in_kinds_it_sends_as_protobuf(cluster: Cluster) -> None:
    assert "namespace/team created" in await cluster.ok("create", "namespace", "team")
    assert "serviceaccount/builder created" in await cluster.ok(
        "create", "serviceaccount", "builder", "-n", "team"
    )
    assert "configmap/settings created" in await cluster.ok(
        "create", "configmap", "settings", "-n", "team", "--from-literal=a=1", "--from-literal=b=two"
    )
    assert "secret/token created" in await cluster.ok(
        "create", "secret", "generic", "token", "-n", "team", "--from-literal=key=s3cr3t"
    )
    sent = [
        r
        for r in list(cluster.kube)
        if r.method == "POST"
        and r.headers.get("Content-Type", "").startswith("application/vnd.kubernetes.protobuf")
    ]
    assert len(sent) == 4  # they really came as protobuf

    listed: dict[str, Any] = json.loads(await cluster.ok("get", "sa,cm,secret", "-n", "team", "-o", "json"))
    by_name = {(item["kind"], item["metadata"]["name"]): item for item in listed["items"]}
    assert {("ServiceAccount", "default"), ("ServiceAccount", "builder"), ("ConfigMap", "settings")} <= set(
        by_name
    )
    assert by_name["ConfigMap", "settings"]["data"] == {"a": "1", "b": "two"}
    assert by_name["Secret", "token"]["data"] == {"key": "czNjcjN0"}  # base64 of s3cr3t
    assert by_name["Secret", "token"]["type"] == "Opaque"
    assert by_name["ServiceAccount", "builder"]["metadata"]["namespace"] == "team"
    namespace = json.loads(await cluster.ok("get", "namespace", "team", "-o", "json"))
    assert namespace["status"] == {"phase": "Active"}

    assert 'namespace "team" deleted' in await cluster.ok("delete", "namespace", "team")
    assert cluster.kube.current("v1/namespaces", None, "team") is None
    assert (
        cluster.kube.current("v1/configmaps", "team", "settings") is None
    )  # the namespace took its contents
    code, _, err = await cluster.kubectl("get", "namespace", "team")
    assert code != 0
    assert 'namespaces "team" not found' in err


# -- 4. OpenAPI v3 for kubectl explain ----------------------------------------------------------------------


def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_FILE.read_text(encoding="utf-8"))
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


async def test_kubectl_explain_prints_the_crd_descriptions(cluster: Cluster) -> None:
    schema = crd_schema()
    top = words(await cluster.ok("explain", "chainguardidentity"))
    assert "KIND: ChainguardIdentity" in top
    assert f"GROUP: {GROUP}" in top
    assert words(schema["description"]) in top
    assert words(schema["properties"]["spec"]["description"]) in top
    assert "metadata <ObjectMeta>" in top

    static = schema["properties"]["spec"]["properties"]["static"]
    explained = words(await cluster.ok("explain", "cgid.spec.static"))
    assert "FIELD: static <Object>" in explained
    assert words(static["description"]) in explained
    for name, field in static["properties"].items():
        assert f"{name} <string>" in explained
        assert words(field["description"]) in explained

    assert "name <string>" in words(await cluster.ok("explain", "cgid.metadata"))
