"""The emulator learns from the real server: one scenario on both backends, and what a user sees compared.

The same scenario runs on the Kubernetes emulator and on the run's real kube-apiserver (each with its own
operator and Chainguard emulator, side by side): in namespace ``shop`` a user applies

- ``puller``: a valid ClaimMatch identity, created with the harness's ``apply`` (an HTTP POST), then
  edited with ``kubectl apply`` (a description added: generation 2);
- ``ci``: a valid Static identity, with ``kubectl apply``;
- ``fancy``: ``mode: Fancy``, which the CRD's schema refuses — once POSTed with the harness's client
  (the HTTP status and the whole ``Status`` body are compared) and once with ``kubectl apply`` (its exit
  code and message);
- ``owner-role``: ``roles: [owner]``, which the schema lets through and the operator stalls on
  (``Stalled``/``RoleNotAllowed``);

waits for each to settle (Ready, or Stalled) and for the views to stop changing, and then collects what
a user sees with kubectl: ``get cgid -o json --show-managed-fields`` (whole objects: metadata with the
managed fields, spec, status, conditions), ``get cgid`` (the table), ``get cgid -o yaml`` (the metadata
keys), ``describe cgid`` (its outline), ``get events --field-selector involvedObject.name=...`` (as JSON
and as the table), ``get configmap -o json --show-managed-fields`` and ``get configmap``, ``version``
(the server's release) and the OIDC discovery document; and what a client of the API sees (kopf, the
operator, the harness): the raw JSON of each resource and of the ConfigMap list, and the keys of each
item of the event list, in the order the server wrote them. The two views must be EQUAL, compared as
text (so key order counts where the server fixes it): where they differ, the emulator is wrong (and is
fixed, in testkit/cgid_testkit/kube.py — never by normalizing more here).

Normalization (``Normalizer``) replaces only values that legitimately differ between two runs, each by
a placeholder that keeps what a reader may compare:

- object UIDs (Kubernetes') -> ``<uid:Kind/name>``, learned from the objects themselves, so that a
  reference (an ownerReference, an event's involvedObject) still has to point at the right object;
  any other UUID -> ``<uuid>``;
- Chainguard IDs (random in each run's Chainguard emulator): the organization -> ``<org>``, each
  resource's identity -> ``<identity:name>``, the operator's own -> ``<operator-identity>``, role
  binding IDs -> ``<binding:role>``;
- resourceVersions (a counter on the emulator, etcd's revision on the real server) -> ``<rv>``;
- timestamps -> ``<time>``, keeping their shape: the fraction's length and the zone suffix stay, so
  ``…Z`` and ``…+00:00`` still differ; relative ages in tables and in ``describe`` (``12s``,
  ``3m4s``) -> ``<age>``;
- namespace names: the real backend gives each World fresh ones (``shop-1a2b3c``) -> ``<ns:shop>``,
  matched as whole names only;
- URLs with ports: the Chainguard emulator's API and STS URLs -> ``<chainguard-api>`` /
  ``<chainguard-sts>``, the registry the operator names (``Settings.registry``) -> ``<registry>``, the
  Kubernetes API's own URL -> ``<kube-api>``; the issuer is the same on both;
- names the clients generate: an event's ``name.<16 hex>`` suffix -> ``name.<hex>``;
- the cluster's signing keys (random in each cluster): key IDs -> ``<kid>``, the fingerprint the
  operator derives from them -> ``sha256:<fingerprint>``; a list of exactly the cluster's key IDs (the
  JWKS's, sorted) -> ``<the cluster's key IDs>``, because how many there are is the cluster's history —
  the real server is shared by the session, and the key-rotation scenarios restart it with a new key,
  keeping the old ones;
- orders that follow those random values or the clock, and nothing else: managed-fields entries are
  sorted by operation, time to the second, then manager — two writes in the same second or not is
  timing — so the view sorts them by operation, manager and subresource; events come back sorted by
  their random names, and ``describe`` sorts them by a timestamp to the second, so event rows are
  sorted by reason and message;
- the server's version: only ``major``, ``minor`` and ``gitVersion`` are compared (a build's date and
  Go version are the build's).

Nothing else is normalized: keys, list lengths and orders, reasons, messages and every other value
must be the same.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import json
import os
import pathlib
import re
import shutil
from collections.abc import Mapping
from typing import Any

import pytest
import yaml

from cgid_testkit.controlplane import ControlPlane
from cgid_testkit.harness import ORG_NAME, World, world
from chainguard_identity_operator.crd import GROUP, VERSION

pytestmark = [
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed"),
    pytest.mark.timeout(300),
]

KUBECTL_TIMEOUT = 60.0
SETTLE_TIMEOUT = 60.0
QUIET_SECONDS = 1.5  # the views must stay the same this long before they are compared
NAMES = ("ci", "owner-role", "puller")  # the resources that exist at the end (fancy never does)
DUMP = os.environ.get("CGID_DIFFERENTIAL_DUMP")  # a folder: write both views there, for a closer look


# -- kubectl ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Kubectl:
    kubeconfig: pathlib.Path
    cache: pathlib.Path

    async def run(self, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            "kubectl",
            f"--kubeconfig={self.kubeconfig}",
            f"--cache-dir={self.cache}",
            *args,
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
        code, out, err = await self.run(*args, stdin=stdin)
        assert code == 0, f"kubectl {' '.join(args)} failed ({code}): {err}"
        return out


def manifest(name: str, namespace: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ChainguardIdentity",
        "metadata": {"name": name, "namespace": namespace},
        "spec": dict(spec),
    }


# -- normalization --------------------------------------------------------------------------------------

_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?")
_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
_EVENT_NAME = re.compile(r"^([a-z0-9-]+)\.[0-9a-f]{16}$")
_AGE = re.compile(r"^(<unknown>|<invalid>|(\d+y)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?)$")
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
CLUSTER_KEYS = "<the cluster's key IDs>"


def _time(match: re.Match[str]) -> str:
    fraction = "." + "f" * (len(match[1]) - 1) if match[1] else ""
    return f"<time>{fraction}{match[2] or ''}"


class Normalizer:
    """Replaces what legitimately differs between two runs (see the module docstring), nothing else."""

    def __init__(self, w: World) -> None:
        self.exact: dict[str, str] = {}  # whole values or substrings -> placeholders
        self.kids: list[str] = []  # the cluster's key IDs
        self.namespaces = {w.ns("shop"): "<ns:shop>", w.ns("chainguard-system"): "<ns:chainguard-system>"}
        self.exact[w.chainguard.api_url.rstrip("/")] = "<chainguard-api>"
        self.exact[w.chainguard.sts_url.rstrip("/")] = "<chainguard-sts>"
        self.exact[w.kube_url.rstrip("/")] = "<kube-api>"
        self.exact[w.settings.registry] = "<registry>"  # the harness's registry: a loopback emulator
        self.exact[w.org] = "<org>"
        self.exact[w.operator_identity] = "<operator-identity>"

    async def learn_keys(self, w: World) -> None:
        self.kids = sorted(key["kid"] for key in (await w.jwks())["keys"])
        for kid in self.kids:
            self.exact[kid] = "<kid>"

    def learn(self, objects: list[dict[str, Any]]) -> None:
        """Name the UIDs and Chainguard IDs these objects carry, by what they belong to."""
        for obj in objects:
            meta = obj.get("metadata") or {}
            if meta.get("uid"):
                name = self.value(meta.get("name", ""), "name")
                self.exact[meta["uid"]] = f"<uid:{obj.get('kind')}/{name}>"
            status = obj.get("status") or {}
            if isinstance(status.get("identityId"), str):
                self.exact[status["identityId"]] = f"<identity:{meta.get('name')}>"
            for binding in status.get("roleBindings") or []:
                if isinstance(binding, Mapping) and binding.get("bindingId"):
                    self.exact[binding["bindingId"]] = f"<binding:{binding.get('role')}>"

    def text(self, value: str) -> str:
        # Longest first: an identity ID starts with the organization's.
        for raw in sorted(self.exact, key=len, reverse=True):
            value = value.replace(raw, self.exact[raw])
        for raw, placeholder in self.namespaces.items():
            value = re.sub(rf"(?<![A-Za-z0-9_-]){re.escape(raw)}(?![A-Za-z0-9_-])", placeholder, value)
        value = _TIME.sub(_time, value)
        value = _FINGERPRINT.sub("sha256:<fingerprint>", value)
        return _UUID.sub("<uuid>", value)

    def value(self, value: Any, key: str = "") -> Any:
        if isinstance(value, Mapping):
            return {self.text(k): self.value(v, k) for k, v in value.items()}
        if isinstance(value, list):
            if key == "keyIds" and sorted(value) == self.kids:
                return CLUSTER_KEYS  # however many the cluster has: see the module docstring
            items = [self.value(item, key) for item in value]
            if key == "managedFields":  # ordered by time to the second: see the module docstring
                items.sort(key=lambda e: (e.get("operation"), e.get("manager"), e.get("subresource", "")))
            return items
        if isinstance(value, str):
            if key == "resourceVersion" and value.isdigit():
                return "<rv>"
            if key == "name" and (m := _EVENT_NAME.match(value)):
                return f"{m[1]}.<hex>"
            return self.text(value)
        return value

    def table(self, text: str, age_columns: tuple[str, ...] = ("AGE", "LAST SEEN")) -> list[dict[str, str]]:
        """kubectl's table as rows of {column: cell}, split where the header's columns start."""
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            return []
        header = lines[0]
        starts = [m.start() for m in re.finditer(r"(?:(?<=\s\s)|^)\S", header)]
        names = [header[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows: list[dict[str, str]] = [{"columns": " | ".join(names)}]
        for line in lines[1:]:
            cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
            row = {}
            for name, cell in zip(names, cells, strict=True):
                row[name] = "<age>" if name in age_columns and _AGE.match(cell) else self.text(cell)
            rows.append(row)
        return rows

    def describe(self, text: str) -> list[str]:
        """``kubectl describe``'s outline: every line's label (up to its colon) with its indentation, and
        the Events table's header and rows with the ages replaced."""
        outline: list[str] = []
        events: list[str] = []
        in_events = False
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("Events:"):
                in_events = True
                outline.append("Events:")
                continue
            if in_events:
                cells = re.split(r"\s{2,}", line.strip())
                cells = ["<age>" if _AGE.match(cell) and cell else cell for cell in cells]
                events.append("  " + " | ".join(self.text(cell) for cell in cells))
                continue
            label = re.match(r"^(\s*)([^:]*:)", line)
            if label is None and line.strip() in self.kids:
                if outline[-1].strip() != CLUSTER_KEYS:  # the cluster's key IDs, one per line: as one
                    outline.append(line[: len(line) - len(line.lstrip())] + CLUSTER_KEYS)
                continue
            outline.append(f"{label[1]}{self.text(label[2])}" if label else self.text(line.rstrip()))
        # The header and its underline first, then the rows (ordered by a timestamp to the second).
        return outline + events[:2] + sorted(events[2:])


# -- the scenario ---------------------------------------------------------------------------------------


async def settled(w: World, namespace: str, name: str) -> bool:
    obj = await w.get(namespace, name)
    status = (obj or {}).get("status") or {}
    if obj is None or status.get("observedGeneration") != obj["metadata"].get("generation"):
        return False
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready, stalled = conditions.get("Ready", {}), conditions.get("Stalled", {})
    return "True" in (ready.get("status"), stalled.get("status"))


async def scenario(w: World, kubectl: Kubectl) -> dict[str, Any]:
    """The scenario, and what a user sees at its end (normalized)."""
    shop = w.ns("shop")
    view: dict[str, Any] = {}

    # A valid ClaimMatch identity, created with the harness's apply.
    await w.apply(
        manifest("puller", shop, {"mode": "ClaimMatch", "parentName": ORG_NAME, "roles": ["registry.pull"]})
    )
    await w.wait_ready(shop, "puller")

    # A valid Static identity, with kubectl apply.
    static = {"mode": "Static", "parent": w.org, "static": {"validFor": "720h", "renewBefore": "240h"}}
    await kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump(manifest("ci", shop, static)))

    # One the schema refuses: by the harness's client, then by kubectl apply.
    fancy = manifest("fancy", shop, {"mode": "Fancy", "parentName": ORG_NAME})
    async with w.client() as client:
        response = await client.post(
            f"/apis/{GROUP}/{VERSION}/namespaces/{shop}/chainguardidentities", json=fancy
        )
    code, out, err = await kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(fancy))
    admission = {
        "http": {"status": response.status_code, "body": response.json()},
        "kubectl apply": {"exit": code, "stdout": out, "stderr": err},
    }

    # One the operator stalls on (the schema allows any role; the operator's allow-list does not).
    owner = {"parentName": ORG_NAME, "roles": ["owner"]}
    await kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump(manifest("owner-role", shop, owner)))

    # The first one edited with kubectl apply: generation 2.
    edited = {
        "mode": "ClaimMatch",
        "parentName": ORG_NAME,
        "roles": ["registry.pull"],
        "description": "team blue",
    }
    await kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump(manifest("puller", shop, edited)))

    for name in NAMES:

        async def probe(name: str = name) -> bool:
            return await settled(w, shop, name)

        await w.wait_for(probe, timeout=SETTLE_TIMEOUT, what=f"{shop}/{name} to settle (Ready or Stalled)")

    # What a user sees, once it stops changing (events and status patches may trail the conditions).
    async def look() -> dict[str, Any]:
        return await collect(w, kubectl, admission)

    previous = await look()
    deadline = asyncio.get_running_loop().time() + SETTLE_TIMEOUT
    while True:
        await asyncio.sleep(QUIET_SECONDS)  # the views must stay unchanged this long
        view = await look()
        if view == previous:
            return view
        assert asyncio.get_running_loop().time() < deadline, "the views kept changing"
        previous = view


async def collect(w: World, kubectl: Kubectl, admission: Mapping[str, Any]) -> dict[str, Any]:
    shop = w.ns("shop")
    norm = Normalizer(w)
    await norm.learn_keys(w)
    managed = "--show-managed-fields"
    cgids = json.loads(await kubectl.ok("get", "cgid", "-n", shop, "-o", "json", managed))
    config_maps = json.loads(await kubectl.ok("get", "configmap", "-n", shop, "-o", "json", managed))
    norm.learn(cgids["items"] + config_maps["items"])
    version = json.loads(await kubectl.ok("version", "-o", "json"))["serverVersion"]
    view: dict[str, Any] = {
        "admission of fancy": norm.value(admission),
        "get cgid -o json --show-managed-fields": norm.value(cgids),
        "get cgid": norm.table(await kubectl.ok("get", "cgid", "-n", shop)),
        "get configmap -o json --show-managed-fields": norm.value(config_maps),
        "get configmap": norm.table(await kubectl.ok("get", "configmap", "-n", shop)),
        "version": {key: version.get(key) for key in ("major", "minor", "gitVersion")},
        "openid-configuration": norm.value(
            json.loads(await kubectl.ok("get", "--raw", "/.well-known/openid-configuration"))
        ),
    }
    # What a client of the API reads, keys in the server's order.
    async with w.client() as client:
        for name in NAMES:
            response = await client.get(
                f"/apis/{GROUP}/{VERSION}/namespaces/{shop}/chainguardidentities/{name}"
            )
            view[f"GET chainguardidentities/{name}"] = norm.value(response.json())
        response = await client.get(f"/api/v1/namespaces/{shop}/configmaps")
        view["GET configmaps"] = norm.value(response.json())
    events = await w.events(shop)
    norm.learn(events)
    view["GET events: the keys of each item"] = sorted({json.dumps(list(event)) for event in events})
    as_yaml = yaml.safe_load(await kubectl.ok("get", "cgid", "-n", shop, "-o", "yaml"))
    view["get cgid -o yaml: metadata keys"] = {
        item["metadata"]["name"]: sorted(item["metadata"]) for item in as_yaml["items"]
    }
    view["get cgid -o yaml: generation, finalizers"] = {
        item["metadata"]["name"]: [item["metadata"].get("generation"), item["metadata"].get("finalizers")]
        for item in as_yaml["items"]
    }
    for name in NAMES:
        selector = f"involvedObject.name={name}"
        events = json.loads(
            await kubectl.ok("get", "events", "-n", shop, "--field-selector", selector, "-o", "json")
        )
        norm.learn(events["items"])
        events["items"].sort(key=lambda e: (e.get("reason", ""), e.get("message", "")))
        view[f"get events {name} -o json"] = norm.value(events)
        view[f"get events {name}"] = sorted(
            norm.table(await kubectl.ok("get", "events", "-n", shop, "--field-selector", selector))[1:],
            key=lambda row: json.dumps(row, sort_keys=True),
        )
        view[f"describe cgid {name}"] = norm.describe(await kubectl.ok("describe", "cgid", "-n", shop, name))
    return view


def _dump(folder: pathlib.Path, **views: Mapping[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, view in views.items():
        (folder / f"{name}.json").write_text("\n".join(_render(view)) + "\n")


def _render(view: Mapping[str, Any]) -> list[str]:
    return json.dumps(view, indent=2, sort_keys=False, ensure_ascii=False).splitlines()


async def test_the_emulator_shows_a_user_what_the_real_server_shows(
    real_cluster: ControlPlane, tmp_path: pathlib.Path
) -> None:
    async def on(plane: ControlPlane | None, label: str) -> dict[str, Any]:
        async with world(control_plane=plane) as w:
            kubectl = Kubectl(w.backend.kubeconfig, tmp_path / f"kube-cache-{label}")
            return await scenario(w, kubectl)

    emulated, real = await asyncio.gather(on(None, "emulator"), on(real_cluster, "real"))
    if DUMP:
        _dump(pathlib.Path(DUMP), emulated=emulated, real=real)
    if _render(emulated) != _render(real):
        diff = difflib.unified_diff(_render(real), _render(emulated), "real", "emulator", lineterm="", n=4)
        pytest.fail("the emulator shows a user something else than the real server:\n" + "\n".join(diff))
