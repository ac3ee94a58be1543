"""Bad input meets the real schema: the malformed-manifest table against the run's kube-apiserver.

Every row of ``cgid_testkit.malformed.MALFORMED`` is created with the real kubectl on the real control
plane, with the shipped CRD (its CEL rules included). A row the table says is *rejected* must be refused
by the API server with a message naming the field; a row it says is *accepted* must be stored — and
then the operator's own validation (the one every pass runs first) must stall it with a reason naming
the field, or accept it when the row is valid. The same table runs against the Kubernetes emulator in
tests/unit/test_kube_emulator_kubectl.py: the two halves keep each other honest.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import shutil
from collections.abc import Awaitable, Callable

import pytest
import yaml

from cgid_testkit.controlplane import ControlPlane, wait_established
from cgid_testkit.malformed import MALFORMED, NAMESPACE, Malformed
from chainguard_identity_operator.config import Settings
from chainguard_identity_operator.model import SpecError, parse_spec

pytestmark = [
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed"),
    pytest.mark.timeout(120),
]

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "chainguardidentity.yaml"
SETTINGS = Settings(token_file=pathlib.Path("/dev/null"))  # the defaults an admin starts with


@pytest.fixture(scope="module")
def plane_with_crd(control_plane: ControlPlane) -> ControlPlane:
    """The shipped CRD installed and Established, and the table's namespace."""

    async def install() -> None:
        async with control_plane.client() as api:
            crd = yaml.safe_load(CRD.read_text())
            response = await api.patch(
                f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}",
                params={"fieldManager": "cgid-tests", "force": "true"},
                content=json.dumps(crd),
                headers={"Content-Type": "application/apply-patch+yaml"},
            )
            assert response.status_code in (200, 201), response.text
            await wait_established(api, crd["metadata"]["name"])
            created = await api.post("/api/v1/namespaces", json={"metadata": {"name": NAMESPACE}})
            assert created.status_code in (201, 409), created.text

    asyncio.run(install())
    return control_plane


Kubectl = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
def kubectl(plane_with_crd: ControlPlane, tmp_path: pathlib.Path) -> Kubectl:
    cache = tmp_path / "kube-cache"

    async def run(*args: str, stdin: str = "") -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            "kubectl",
            f"--kubeconfig={plane_with_crd.kubeconfig}",
            f"--cache-dir={cache}",
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(stdin.encode()), timeout=60)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    return run


@pytest.mark.parametrize("case", MALFORMED, ids=[case.name for case in MALFORMED])
async def test_the_real_api_server_refuses_or_accepts_and_the_operator_stalls_on_the_rest(
    kubectl: Kubectl, case: Malformed
) -> None:
    run = kubectl
    code, out, err = await run("create", "-f", "-", "-o", "json", stdin=case.manifest)
    try:
        if case.expected == "rejected":
            assert code != 0, out
            assert case.message in err, err
            assert case.field is not None
            assert f"{case.field}:" in err or f'"{case.field}"' in err, err
            return
        assert code == 0, err
        stored = json.loads(out)
        spec = stored["spec"]
        assert spec["mode"] == "Auto"  # the server applied the schema's defaults
        assert spec["static"] == {"validFor": "720h"}
        # What the API server lets through, the operator's first step refuses, naming the field.
        if case.field is None:
            parse_spec(NAMESPACE, case.name, spec, SETTINGS)  # valid: nothing to stall on
        else:
            with pytest.raises(SpecError) as stalled:
                parse_spec(NAMESPACE, case.name, spec, SETTINGS)
            assert stalled.value.field.startswith(case.field), stalled.value.field
            assert stalled.value.reason != "InvalidSpec" or case.field in str(stalled.value)
    finally:
        await run("delete", "cgid", case.name, "-n", NAMESPACE, "--ignore-not-found", "--wait=false")
