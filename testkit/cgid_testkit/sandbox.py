"""The sandbox: what a cluster admin would see, with no cluster and no Chainguard account.

It starts the emulated cluster, the emulated Chainguard and the real operator in one process, applies
the examples (a ClaimMatch and a Static identity), and prints each identity, its status and ConfigMap,
then runs the seeds' pod flow — a projected service-account token exchanged at the STS for an API
token, then the repository list — and shows that another service account's token is refused. Then it
keeps a pull secret for a service account (examples/pull-secret.yaml), pulls from the emulated registry
with it and shows the operator's check that the exchange works. Then it fast-forwards time past the
static identity's renewal point and shows the rotation. Last, a tenant in
``shop`` tries to adopt the operator's own identity: the sandbox shows the refusal and checks that the
identity was not touched.

With ``--serve`` it keeps running and prints what ``kubectl`` and ``curl`` need to poke at it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import datetime
import json
import logging
import pathlib
import re
import signal
from typing import Any

import httpx
import yaml

from cgid_testkit.harness import ORG_NAME, World, world

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
SHOWN = ("claimmatch.yaml", "static.yaml")
OWN = "operator-identity.yaml"
PULL = "pull-secret.yaml"


def _examples(org: str, *, names: tuple[str, ...] = SHOWN, adopt: str | None = None) -> list[dict[str, Any]]:
    manifests = []
    for name in names:
        for document in yaml.safe_load_all((EXAMPLES / name).read_text()):
            if not document or document.get("kind") != "ChainguardIdentity":
                continue
            spec = document.setdefault("spec", {})
            if "parent" in spec:
                spec["parent"] = org  # the example's placeholder UIDP → the sandbox organization
            if "adopt" in spec and adopt is not None:
                spec["adopt"] = adopt
            manifests.append(document)
    return manifests


def _line(text: str = "") -> None:
    print(text, flush=True)


async def _show(w: World, namespace: str, name: str) -> dict[str, str]:
    obj = await w.get(namespace, name)
    assert obj is not None
    status = obj.get("status") or {}
    ready: dict[str, Any] = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
    _line(f"  {namespace}/{name}")
    _line(f"    identity     {status.get('identityId')}  ({status.get('identityName')})")
    _line(f"    mode         {status.get('mode')}   issuer {status.get('issuer')}")
    _line(f"    subject      {status.get('subject')}")
    _line(f"    roles        {', '.join(b['role'] for b in status.get('roleBindings', []))}")
    if status.get("expiresAt"):
        _line(f"    expires      {status['expiresAt']}  (renews at {status.get('renewAt')})")
        _line(f"    keys         {status.get('keys', {}).get('fingerprint')}")
    _line(f"    Ready        {ready.get('status')} {ready.get('reason')}: {ready.get('message')}")
    data = await w.config_map(namespace, status.get("configMapName", "")) or {}
    _line(f"    ConfigMap    {status.get('configMapName')}")
    for key, value in sorted(data.items()):
        _line(f"      {key}={value}")
    return data


async def _pod_flow(w: World, namespace: str, service_account: str, identity: str) -> bool:
    response = await w.pod_exchange(namespace, service_account, identity)
    if response.status_code != 200:
        message = response.json().get("message")
        _line(f"    exchange as {namespace}:{service_account}: HTTP {response.status_code} {message}")
        return False
    repos = await w.list_repos(response.json()["token"])
    _line(f"    exchange as {namespace}:{service_account}: OK; repos: {', '.join(sorted(repos))}")
    return True


async def run_sandbox(*, serve: bool, workdir: pathlib.Path | None) -> int:
    async with world(workdir=workdir) as w:
        _line("chainguard-identity-operator sandbox")
        _line(f"  cluster (emulated)     {w.kube_url}   issuer {w.kube.issuer}")
        _line(f"  Chainguard (emulated)  {w.chainguard.api_url}   org {w.org}")
        _line(f"  operator identity      {w.operator_identity} (static, made by hand: the bootstrap)")
        _line()
        manifests = _examples(w.org)
        for manifest in manifests:
            await w.apply(manifest)
            _line(
                f"applied ChainguardIdentity {manifest['metadata']['namespace']}/{manifest['metadata']['name']}"
            )
        _line()
        ok = True
        for manifest in manifests:
            namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
            await w.wait_ready(namespace, name, timeout=60)
            data = await _show(w, namespace, name)
            service_account = manifest["spec"].get("serviceAccountName", "default")
            _line("    the seeds' pod flow (projected token → STS → API → repos):")
            ok &= await _pod_flow(w, namespace, service_account, data["CHAINGUARD_IDENTITY"])
            other = "intruder"
            w.kube.add_service_account(namespace, other)
            refused = not await _pod_flow(w, namespace, other, data["CHAINGUARD_IDENTITY"])
            _line(
                f"    another service account is {'refused, as it should be' if refused else 'ACCEPTED (wrong!)'}"
            )
            ok &= refused
            _line()

        ok &= await _pull_secret(w)

        own = _examples(w.org, names=(OWN,), adopt=w.operator_identity)[0]
        await w.apply(own)
        namespace, name = own["metadata"]["namespace"], own["metadata"]["name"]
        _line(f"applied {OWN}: the operator adopts its own bootstrap identity")
        status = (await w.wait_ready(namespace, name, timeout=60))["status"]
        adopted = status["identityId"] == w.operator_identity
        _line(
            f"  {namespace}/{name}: {status['identityId']} adopted={adopted} expires {status.get('expiresAt')}"
        )
        ok &= adopted
        _line()

        static = next((m for m in manifests if m["spec"].get("mode") == "Static"), None)
        if static is not None:
            ok &= await _rotation(w, static["metadata"]["namespace"], static["metadata"]["name"])
            before = status.get("expiresAt")

            async def own_renewed() -> dict[str, Any] | None:
                obj = await w.get(namespace, name)
                return obj if obj and obj["status"].get("expiresAt") != before else None

            renewed = await w.wait_for(own_renewed, timeout=60, what="the operator's own identity to renew")
            expiry = renewed["status"].get("expiresAt")
            _line(f"  the operator's own identity now expires {expiry} (renewed too)")
            _line()

        ok &= await _refused_adoption(w)

        if serve:
            _serve_banner(w)
            await _wait_for_interrupt()
        _line("sandbox: all checks passed" if ok else "sandbox: SOME CHECKS FAILED")
        return 0 if ok else 1


async def _pull_secret(w: World) -> bool:
    """examples/pull-secret.yaml: a Secret kept full of registry tokens, listed in the service account,
    a pull with it from the emulated registry, and the operator's own check that the exchange works."""
    (manifest,) = _examples(w.org, names=(PULL,))
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    spec = manifest["spec"]
    w.kube.add_service_account(namespace, spec["serviceAccountName"])
    # The emulated cluster enforces no RBAC; on a real one the namespace's admin applies
    # examples/pull-secret-role.yaml first, or the resource says AccessNotGranted with that Role.
    await w.apply(manifest)
    _line(
        f"applied {PULL}: a pull secret and a checked exchange for {namespace}:{spec['serviceAccountName']}"
    )
    await w.wait_condition(namespace, name, "ExchangeVerified", "True", timeout=60)
    obj = await w.wait_ready(namespace, name, timeout=60)
    conditions = {c["type"]: c for c in obj["status"]["conditions"]}
    record = obj["status"].get("pullSecret", {})
    secret_name = spec["pullSecret"]["name"]
    _line(f"  {namespace}/{name}: identity {obj['status']['identityId']}")
    _line(
        f"    Secret       {secret_name} (kubernetes.io/dockerconfigjson), token until {record.get('expiresAt')}"
    )
    if record.get("attachedTo"):
        _line(f"    listed in    the imagePullSecrets of ServiceAccount {spec['serviceAccountName']}")
    for kind in ("PullSecretReady", "ExchangeVerified"):
        _line(
            f"    {kind:<16} {conditions[kind]['status']} {conditions[kind]['reason']}: {conditions[kind]['message']}"
        )
    config = await _secret_config(w, namespace, secret_name)
    pulled = await _pull(w, config, f"{ORG_NAME}/python:latest")
    _line(f"    a pull of {w.registry.host}/{ORG_NAME}/python:latest with it: {pulled}")
    _line()
    return pulled.startswith("OK") and conditions["ExchangeVerified"]["status"] == "True"


async def _secret_config(w: World, namespace: str, name: str) -> dict[str, Any]:
    async with w.client() as client:
        response = await client.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
    response.raise_for_status()
    config: dict[str, Any] = json.loads(base64.b64decode(response.json()["data"][".dockerconfigjson"]))
    return config


async def _pull(w: World, config: dict[str, Any], reference: str) -> str:
    """What a kubelet does with the Secret: the registry's token handshake, then the manifest."""
    (host, entry), *_ = config["auths"].items()
    repository, _, tag = reference.partition(":")
    async with httpx.AsyncClient(base_url=f"http://{host}", timeout=10) as client:
        challenge = (await client.get("/v2/")).headers.get("WWW-Authenticate", "")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        answer = await client.get(
            fields["realm"],
            params={"service": fields["service"], "scope": f"repository:{repository}:pull"},
            headers={"Authorization": f"Basic {entry['auth']}"},
        )
        if answer.status_code != 200:
            return f"refused: HTTP {answer.status_code}"
        manifest = await client.get(
            f"/v2/{repository}/manifests/{tag}",
            headers={
                "Authorization": f"Bearer {answer.json()['token']}",
                "Accept": "application/vnd.oci.image.manifest.v1+json",
            },
        )
    if manifest.status_code != 200:
        return f"refused: HTTP {manifest.status_code}"
    return f"OK, manifest {manifest.headers.get('Docker-Content-Digest')}"


async def _rotation(w: World, namespace: str, name: str) -> bool:
    before = await w.get(namespace, name)
    assert before is not None
    status = before["status"]
    renew_at = datetime.datetime.fromisoformat(status["renewAt"].replace("Z", "+00:00"))
    jump = renew_at - w.clock() + datetime.timedelta(minutes=1)
    _line(f"fast-forwarding {jump.days} days past {namespace}/{name}'s renewal time ...")
    w.advance(jump)

    async def renewed() -> dict[str, Any] | None:
        obj = await w.get(namespace, name)
        if obj and obj["status"].get("expiresAt") != status["expiresAt"]:
            return obj
        return None

    after = await w.wait_for(renewed, timeout=60, what="the static identity to renew")
    _line(f"  expiresAt    {status['expiresAt']} → {after['status']['expiresAt']}")
    _line(
        f"  identity     {after['status']['identityId']} (rotated at {after['status'].get('lastRotatedAt')})"
    )
    data = await w.config_map(namespace, after["status"]["configMapName"]) or {}
    sa = after["spec"].get("serviceAccountName", "default")
    return await _pod_flow(w, namespace, sa, data["CHAINGUARD_IDENTITY"])


def _untouchable(w: World, identity: str) -> dict[str, Any]:
    """The identity and its role bindings as Chainguard stores them, but for ``lastSeenTime`` (stamped by
    every token exchange: using an identity is not touching it)."""
    stored = copy.deepcopy(w.chainguard.identities[identity])
    stored.pop("lastSeenTime", None)
    bindings = sorted(
        (copy.deepcopy(b) for b in w.chainguard.role_bindings.values() if b["identity"]["uid"] == identity),
        key=lambda b: str(b["uid"]),
    )
    return {"identity": stored, "bindings": bindings}


async def _refused_adoption(w: World) -> bool:
    """A tenant in ``shop`` tries to take over the operator's own identity (bound owner); it must fail."""
    before = _untouchable(w, w.operator_identity)
    hijack = {
        "metadata": {"name": "hijack", "namespace": "shop"},
        "spec": {"parent": w.org, "adopt": w.operator_identity},
    }
    await w.apply(hijack)
    _line("applied shop/hijack: a tenant adopts the operator's own identity")
    obj = await w.wait_condition("shop", "hijack", "Stalled", "True", timeout=60)
    stalled = next(c for c in obj["status"]["conditions"] if c["type"] == "Stalled")
    _line(f"  Stalled      {stalled['reason']}: {stalled['message']}")
    refused = stalled["reason"] == "AdoptionRefused" and "identityId" not in obj["status"]
    untouched = _untouchable(w, w.operator_identity) == before
    denied = (await w.pod_exchange("shop", "default", w.operator_identity)).status_code != 200
    _line(
        f"  the operator's identity is {'untouched' if untouched else 'CHANGED (wrong!)'}; the tenant's "
        f"token is {'refused' if denied else 'ACCEPTED (wrong!)'} for it"
    )
    return refused and untouched and denied


def _serve_banner(w: World) -> None:
    _line()
    _line("serving; press Ctrl-C to stop. Try:")
    _line(f"  export KUBECONFIG={w.kubeconfig}")
    _line("  kubectl get cgid -A")
    _line("  kubectl get --raw /openid/v1/jwks")
    _line("  kubectl create token default -n shop --audience issuer.enforce.dev")
    _line(f"  Chainguard API  {w.chainguard.api_url}")
    _line(f"  STS             {w.chainguard.sts_url}/sts/exchange")
    _line(
        f'  curl -s -H "Authorization: Bearer $(kubectl create token default -n shop --audience issuer.enforce.dev)" '
        f'"{w.chainguard.sts_url}/sts/exchange?aud=https://console-api.enforce.dev&identity=<CHAINGUARD_IDENTITY>"'
    )


async def _wait_for_interrupt() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cgid-sandbox", description="operator + emulated cluster + emulated Chainguard, shown"
    )
    parser.add_argument(
        "--serve", action="store_true", help="keep running and print URLs for kubectl and curl"
    )
    parser.add_argument("--workdir", type=pathlib.Path, default=None, help="where to write the kubeconfig")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if not args.verbose else logging.INFO)
    # The operator runs in a thread of the sandbox, where kopf cannot (and need not) handle signals.
    logging.getLogger("kopf._core.reactor.running").setLevel(logging.ERROR)
    return asyncio.run(run_sandbox(serve=args.serve, workdir=args.workdir))


if __name__ == "__main__":
    raise SystemExit(main())
