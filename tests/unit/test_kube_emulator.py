"""The Kubernetes API emulator behaves like an API server for kopf, the ``kubernetes`` client and kubectl.

Every test talks HTTP to a real ``kmock.Server`` on 127.0.0.1. Waiting is always on a condition: a watch
stream read in the background (``Watcher``) or an ``asyncio.Event`` set by a handler, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import pathlib
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import kmock
import kopf
import pytest
import yaml

from cgid_testkit import kube as kube_module
from cgid_testkit.kube import KubeEmulator, write_kubeconfig

GROUP, VERSION, PLURAL = "example.test", "v1", "ktests"
KTESTS = f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}"
CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
MERGE = {"Content-Type": "application/merge-patch+json"}
JSON_PATCH = {"Content-Type": "application/json-patch+json"}
STRATEGIC = {"Content-Type": "application/strategic-merge-patch+json"}


def make_crd(*, status: bool = True, plural: str = PLURAL, kind: str = "KTest") -> dict[str, Any]:
    version: dict[str, Any] = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
        "additionalPrinterColumns": [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
            {"name": "Expires", "type": "date", "jsonPath": ".status.expiresAt"},
        ],
    }
    if status:
        version["subresources"] = {"status": {}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind, "shortNames": ["kt"]},
            "versions": [version],
        },
    }


def ktest(name: str, **fields: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "KTest", "metadata": {"name": name}, **fields}


@pytest.fixture
async def kube() -> AsyncIterator[KubeEmulator]:
    async with KubeEmulator() as emulator, kmock.Server(emulator):
        emulator.install_crd(make_crd())
        yield emulator


@pytest.fixture
async def api(kube: KubeEmulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=str(kube.url), timeout=10) as client:
        yield client


class Watcher:
    """Reads a watch stream in the background; ``wait`` blocks until an event matches (or times out)."""

    def __init__(self, api: httpx.AsyncClient, path: str, **params: str) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._read(api, path, {"watch": "true", **params}))

    async def _read(self, api: httpx.AsyncClient, path: str, params: dict[str, str]) -> None:
        async with api.stream("GET", path, params=params, timeout=None) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.strip():
                    async with self._changed:
                        self.events.append(json.loads(line))
                        self._changed.notify_all()

    async def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10) -> dict[str, Any]:
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                if self._task.done():
                    self._task.result()  # surface the stream's failure
                    raise AssertionError(f"the watch stream ended; events: {self.events}")
                await self._changed.wait()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def watching(api: httpx.AsyncClient, path: str, **params: str) -> AsyncIterator[Watcher]:
    watcher = Watcher(api, path, **params)
    try:
        yield watcher
    finally:
        await watcher.close()


def verify(token: str, jwks: dict[str, Any], audience: str) -> dict[str, Any]:
    """Verify a token the way a relying party does: pick the key by kid from the served JWKS."""
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(jwks)[kid]  # KeyError when the key is no longer published
    claims: dict[str, Any] = jwt.decode(token, key=key, algorithms=["RS256"], audience=audience)
    return claims


# -- discovery ------------------------------------------------------------------------------------------


async def test_core_discovery_names_the_group_version_v1(api: httpx.AsyncClient) -> None:
    assert (await api.get("/api")).json()["versions"] == ["v1"]
    core = (await api.get("/api/v1")).json()
    assert core["groupVersion"] == "v1"
    by_name = {r["name"]: r for r in core["resources"]}
    assert by_name["namespaces"]["namespaced"] is False
    assert by_name["configmaps"] | {"verbs": None} == {
        "name": "configmaps",
        "singularName": "configmap",
        "namespaced": True,
        "kind": "ConfigMap",
        "verbs": None,
        "shortNames": ["cm"],
    }
    assert {"create", "delete", "get", "list", "patch", "update", "watch"} == set(
        by_name["configmaps"]["verbs"]
    )
    assert by_name["serviceaccounts/token"]["kind"] == "TokenRequest"
    assert by_name["serviceaccounts/token"]["verbs"] == ["create"]
    assert {"events", "secrets", "pods", "serviceaccounts"} <= set(by_name)


async def test_group_discovery_lists_builtin_groups_and_installed_crds(api: httpx.AsyncClient) -> None:
    groups = {g["name"]: g for g in (await api.get("/apis")).json()["groups"]}
    assert {"apiextensions.k8s.io", "events.k8s.io", GROUP} <= set(groups)
    assert groups[GROUP]["preferredVersion"]["groupVersion"] == f"{GROUP}/{VERSION}"
    crds = (await api.get("/apis/apiextensions.k8s.io/v1")).json()["resources"]
    assert {r["name"]: r["namespaced"] for r in crds}["customresourcedefinitions"] is False
    custom = (await api.get(f"/apis/{GROUP}/{VERSION}")).json()
    assert custom["groupVersion"] == f"{GROUP}/{VERSION}"
    by_name = {r["name"]: r for r in custom["resources"]}
    assert by_name[PLURAL]["kind"] == "KTest"
    assert by_name[PLURAL]["shortNames"] == ["kt"]
    assert by_name[PLURAL]["namespaced"] is True
    assert by_name[f"{PLURAL}/status"]["verbs"] == ["get", "patch", "update"]
    assert (await api.get("/apis/unknown.test/v1")).status_code == 404


async def test_openapi_v3_tells_kubectl_the_server_validates_fields(api: httpx.AsyncClient) -> None:
    root = (await api.get("/openapi/v3")).json()["paths"]
    assert {"api/v1", f"apis/{GROUP}/{VERSION}", "apis/apiextensions.k8s.io/v1"} <= set(root)
    document = (await api.get(root[f"apis/{GROUP}/{VERSION}"]["serverRelativeURL"])).json()
    patch = document["paths"][f"/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{PLURAL}/{{name}}"]["patch"]
    assert patch["x-kubernetes-group-version-kind"] == {"group": GROUP, "version": VERSION, "kind": "KTest"}
    assert {"name": "fieldValidation", "in": "query"}.items() <= patch["parameters"][2].items()
    assert (await api.get("/openapi/v3/apis/unknown.test/v1")).status_code == 404


async def test_crd_posted_through_the_api_registers_its_resource(api: httpx.AsyncClient) -> None:
    other = make_crd(plural="others", kind="Other")
    assert (await api.get(f"/apis/{GROUP}/{VERSION}/namespaces/default/others")).status_code == 404
    created = await api.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=other)
    assert created.status_code == 201
    conditions = {c["type"]: c["status"] for c in created.json()["status"]["conditions"]}
    assert conditions == {"Established": "True", "NamesAccepted": "True"}
    listed = await api.get(f"/apis/{GROUP}/{VERSION}/namespaces/default/others")
    assert listed.status_code == 200
    assert listed.json()["kind"] == "OtherList"
    crds = (await api.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")).json()["items"]
    assert {c["metadata"]["name"] for c in crds} == {f"{PLURAL}.{GROUP}", f"others.{GROUP}"}


async def test_a_crd_that_cannot_be_served_is_refused(kube: KubeEmulator, api: httpx.AsyncClient) -> None:
    broken = make_crd(plural="brokens", kind="Broken")
    broken["spec"]["versions"] = []
    refused = await api.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=broken)
    assert refused.status_code == 422
    assert kube.current("apiextensions.k8s.io/v1/customresourcedefinitions", None, f"brokens.{GROUP}") is None
    with pytest.raises(kube_module.ApiError):
        kube.install_crd(broken)


async def test_kmock_reactions_still_override_requests_and_then_nothing_is_written(
    kube: KubeEmulator, api: httpx.AsyncClient
) -> None:
    kube["post", kmock.resource("", "v1", "configmaps")][:1] << 503 << {"kind": "Status", "code": 503}
    failed = await api.post(CONFIGMAPS, json={"metadata": {"name": "cm"}})
    assert failed.status_code == 503
    assert kube.current("v1/configmaps", "default", "cm") is None
    retried = await api.post(CONFIGMAPS, json={"metadata": {"name": "cm"}})  # the reaction was used up
    assert retried.status_code == 201
    assert kube.current("v1/configmaps", "default", "cm") == retried.json()


async def test_lists_render_as_tables_with_the_crd_printer_columns(
    kube: KubeEmulator, api: httpx.AsyncClient
) -> None:
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    kube.clock = lambda: now
    await api.post(KTESTS, json=ktest("one"))
    status = {
        "phase": "Up",
        "conditions": [{"type": "Other", "status": "False"}, {"type": "Ready", "status": "True"}],
        "expiresAt": (now + datetime.timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    await api.patch(f"{KTESTS}/one/status", json={"status": status}, headers=MERGE)
    kube.clock = lambda: now + datetime.timedelta(hours=2)
    table = (await api.get(KTESTS, headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})).json()
    assert table["kind"] == "Table"
    # Only the CRD's columns: kube-apiserver adds Age only to a CRD that declares none.
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Phase", "Ready", "Expires"]
    assert table["rows"][0]["cells"] == ["one", "Up", "True", "<invalid>"]  # future dates print so
    assert table["rows"][0]["object"]["metadata"]["name"] == "one"


# -- create, resourceVersion, generation ------------------------------------------------------------------


async def test_create_stamps_metadata_and_every_write_bumps_the_resource_version(
    kube: KubeEmulator, api: httpx.AsyncClient
) -> None:
    created = await api.post(KTESTS, json=ktest("one", spec={"size": 1}))
    assert created.status_code == 201
    meta = created.json()["metadata"]
    assert meta["namespace"] == "default"
    assert meta["generation"] == 1
    assert len(meta["uid"]) == 36
    assert datetime.datetime.fromisoformat(meta["creationTimestamp"].replace("Z", "+00:00"))
    assert meta["resourceVersion"] == kube.resource_version

    listed = (await api.get(KTESTS)).json()
    assert listed["metadata"]["resourceVersion"] == kube.resource_version
    assert [item["metadata"]["name"] for item in listed["items"]] == ["one"]

    labelled = await api.patch(f"{KTESTS}/one", json={"metadata": {"labels": {"a": "b"}}}, headers=MERGE)
    assert int(labelled.json()["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    assert labelled.json()["metadata"]["generation"] == 1  # metadata is not part of the generation
    assert labelled.json()["metadata"]["uid"] == meta["uid"]

    resized = await api.patch(f"{KTESTS}/one", json={"spec": {"size": 2}}, headers=MERGE)
    assert resized.json()["metadata"]["generation"] == 2
    assert int(resized.json()["metadata"]["resourceVersion"]) > int(
        labelled.json()["metadata"]["resourceVersion"]
    )

    same = await api.patch(f"{KTESTS}/one", json={"spec": {"size": 2}}, headers=MERGE)
    assert same.json()["metadata"]["resourceVersion"] == resized.json()["metadata"]["resourceVersion"]
    stored = kube.objects[f"{GROUP}/{VERSION}/{PLURAL}", "default", "one"]
    assert stored["spec"] == {"size": 2}
    assert len(stored.history) == 3  # create, label, resize; the no-op wrote nothing


async def test_create_errors_are_kubernetes_statuses(api: httpx.AsyncClient) -> None:
    assert (await api.post(CONFIGMAPS, json={"metadata": {"name": "cm"}})).status_code == 201
    duplicate = await api.post(CONFIGMAPS, json={"metadata": {"name": "cm"}})
    assert duplicate.status_code == 409
    assert duplicate.json() | {"message": None} == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": None,
        "reason": "AlreadyExists",
        "code": 409,
        "details": {"name": "cm", "kind": "configmaps"},
    }
    missing_namespace = await api.post(
        "/api/v1/namespaces/nowhere/configmaps", json={"metadata": {"name": "x"}}
    )
    assert missing_namespace.status_code == 404
    assert missing_namespace.json()["reason"] == "NotFound"
    assert missing_namespace.json()["message"] == 'namespaces "nowhere" not found'
    missing = await api.get(f"{KTESTS}/ghost")
    assert missing.status_code == 404
    assert missing.json()["message"] == f'{PLURAL}.{GROUP} "ghost" not found'
    assert missing.json()["details"] == {"name": "ghost", "kind": PLURAL, "group": GROUP}
    generated = await api.post(CONFIGMAPS, json={"metadata": {"generateName": "gen-"}})
    assert generated.status_code == 201
    assert generated.json()["metadata"]["name"].startswith("gen-")
    assert len(generated.json()["metadata"]["name"]) == len("gen-") + 5


async def test_namespaces_are_cluster_scoped_and_get_a_default_service_account(
    api: httpx.AsyncClient,
) -> None:
    created = await api.post("/api/v1/namespaces", json={"metadata": {"name": "shop"}})
    assert created.status_code == 201
    assert created.json()["status"] == {"phase": "Active"}
    assert (await api.get("/api/v1/namespaces/shop")).json()["metadata"]["name"] == "shop"
    names = [ns["metadata"]["name"] for ns in (await api.get("/api/v1/namespaces")).json()["items"]]
    assert {"default", "kube-system", "shop"} <= set(names)
    assert (await api.get("/api/v1/namespaces/shop/serviceaccounts/default")).status_code == 200


async def test_objects_seeded_through_kmock_storage_get_server_metadata(
    kube: KubeEmulator, api: httpx.AsyncClient
) -> None:
    kube.objects["v1/configmaps", "default", "seeded"] = {"data": {"k": "v"}}
    fetched = (await api.get(f"{CONFIGMAPS}/seeded")).json()
    assert fetched["metadata"]["name"] == "seeded"
    assert fetched["metadata"]["resourceVersion"] == kube.resource_version
    patch = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": fetched["metadata"]["resourceVersion"]},
        {"op": "add", "path": "/data/k2", "value": "v2"},
    ]
    patched = await api.patch(f"{CONFIGMAPS}/seeded", json=patch, headers=JSON_PATCH)
    assert patched.status_code == 200
    assert patched.json()["data"] == {"k": "v", "k2": "v2"}


# -- patch & replace ----------------------------------------------------------------------------------------


async def test_merge_patch_null_deletes_and_lists_are_replaced(api: httpx.AsyncClient) -> None:
    await api.post(KTESTS, json=ktest("one", spec={"keep": 1, "drop": 2, "items": [1, 2]}))
    patched = await api.patch(f"{KTESTS}/one", json={"spec": {"drop": None, "items": [3]}}, headers=MERGE)
    assert patched.status_code == 200
    assert patched.json()["spec"] == {"keep": 1, "items": [3]}


async def test_json_patch_with_a_stale_resource_version_test_is_rejected_with_422(
    kube: KubeEmulator, api: httpx.AsyncClient
) -> None:
    created = (await api.post(KTESTS, json=ktest("one", spec={"a": 1}))).json()
    rv = created["metadata"]["resourceVersion"]
    add_finalizer = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/metadata/finalizers", "value": ["example.test/f"]},
    ]
    ok = await api.patch(f"{KTESTS}/one", json=add_finalizer, headers=JSON_PATCH)
    assert ok.status_code == 200
    assert ok.json()["metadata"]["finalizers"] == ["example.test/f"]
    assert ok.json()["metadata"]["resourceVersion"] != rv

    stale = await api.patch(f"{KTESTS}/one", json=add_finalizer, headers=JSON_PATCH)  # the same rv again
    assert stale.status_code == 422
    assert stale.json()["reason"] == "Invalid"
    stored = kube.objects[f"{GROUP}/{VERSION}/{PLURAL}", "default", "one"]
    assert stored["metadata"]["finalizers"] == ["example.test/f"]
    assert stored["metadata"]["resourceVersion"] == ok.json()["metadata"]["resourceVersion"]

    not_a_list = await api.patch(f"{KTESTS}/one", json={"spec": {}}, headers=JSON_PATCH)
    assert not_a_list.status_code == 400


async def test_strategic_merge_patch_merges_named_lists_on_builtins_only(api: httpx.AsyncClient) -> None:
    pod = {
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}]},
    }
    await api.post("/api/v1/namespaces/default/pods", json=pod)
    patch = {
        "spec": {
            "$setElementOrder/containers": [{"name": "a"}],
            "containers": [{"name": "b", "image": "b:2"}],
        }
    }
    patched = await api.patch("/api/v1/namespaces/default/pods/p", json=patch, headers=STRATEGIC)
    assert patched.status_code == 200
    assert patched.json()["spec"] == {
        "containers": [{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:2"}]
    }

    await api.post(KTESTS, json=ktest("one"))
    refused = await api.patch(f"{KTESTS}/one", json={"spec": {}}, headers=STRATEGIC)
    assert refused.status_code == 415
    assert refused.json()["reason"] == "UnsupportedMediaType"


async def test_server_side_apply_creates_then_merges(api: httpx.AsyncClient) -> None:
    manifest = yaml.safe_dump(ktest("applied", spec={"a": 1}))
    headers = {"Content-Type": "application/apply-patch+yaml"}
    first = await api.patch(
        f"{KTESTS}/applied", content=manifest, headers=headers, params={"fieldManager": "t"}
    )
    assert first.status_code == 201
    # An apply configuration names its kind (kube-apiserver: 400 "invalid object type: /, Kind=").
    unnamed = await api.patch(
        f"{KTESTS}/applied", content="spec: {b: 2}", headers=headers, params={"fieldManager": "t"}
    )
    assert unnamed.status_code == 400
    second = await api.patch(
        f"{KTESTS}/applied",
        content=yaml.safe_dump(ktest("applied", spec={"b": 2})),
        headers=headers,
        params={"fieldManager": "t"},
    )
    assert second.status_code == 200
    # What the same manager applied before and applies no more is removed (nobody else owns it).
    assert second.json()["spec"] == {"b": 2}


async def test_put_replaces_with_optimistic_concurrency(api: httpx.AsyncClient) -> None:
    created = (
        await api.post(CONFIGMAPS, json={"metadata": {"name": "cm"}, "data": {"a": "1", "b": "2"}})
    ).json()
    replacement = {"metadata": {"name": "cm", "resourceVersion": created["metadata"]["resourceVersion"]}}
    replaced = await api.put(f"{CONFIGMAPS}/cm", json=replacement | {"data": {"c": "3"}})
    assert replaced.status_code == 200
    assert replaced.json()["data"] == {"c": "3"}
    assert replaced.json()["metadata"]["uid"] == created["metadata"]["uid"]
    assert replaced.json()["metadata"]["creationTimestamp"] == created["metadata"]["creationTimestamp"]

    stale = await api.put(f"{CONFIGMAPS}/cm", json=replacement | {"data": {"d": "4"}})
    assert stale.status_code == 409
    assert stale.json()["reason"] == "Conflict"
    assert "the object has been modified" in stale.json()["message"]

    unconditional = await api.put(f"{CONFIGMAPS}/cm", json={"metadata": {"name": "cm"}, "data": {"e": "5"}})
    assert unconditional.status_code == 200
    assert unconditional.json()["data"] == {"e": "5"}
    assert (await api.put(f"{CONFIGMAPS}/absent", json={"metadata": {"name": "absent"}})).status_code == 404


# -- status subresource ---------------------------------------------------------------------------------------


async def test_status_subresource_isolates_status_from_the_main_resource(api: httpx.AsyncClient) -> None:
    created = await api.post(KTESTS, json=ktest("one", spec={"a": 1}, status={"phase": "forged"}))
    assert "status" not in created.json()  # create drops status when the subresource exists

    main = await api.patch(
        f"{KTESTS}/one", json={"spec": {"a": 2}, "status": {"phase": "ignored"}}, headers=MERGE
    )
    assert main.json()["spec"] == {"a": 2}
    assert "status" not in main.json()

    status = await api.patch(
        f"{KTESTS}/one/status",
        json={"spec": {"a": 99}, "metadata": {"labels": {"x": "y"}}, "status": {"phase": "Ready"}},
        headers=MERGE,
    )
    assert status.status_code == 200
    assert status.json()["status"] == {"phase": "Ready"}
    assert status.json()["spec"] == {"a": 2}
    assert "labels" not in status.json()["metadata"]
    assert status.json()["metadata"]["generation"] == main.json()["metadata"]["generation"]

    put_main = await api.put(f"{KTESTS}/one", json=ktest("one", spec={"a": 3}))
    assert put_main.json()["status"] == {"phase": "Ready"}  # a replace without status keeps it
    fetched = (await api.get(f"{KTESTS}/one/status")).json()
    assert fetched["status"] == {"phase": "Ready"}
    assert fetched["spec"] == {"a": 3}


async def test_without_a_status_subresource_status_is_part_of_the_object(
    kube: KubeEmulator, api: httpx.AsyncClient
) -> None:
    kube.install_crd(make_crd(status=False, plural="plains", kind="Plain"))
    path = f"/apis/{GROUP}/{VERSION}/namespaces/default/plains"
    created = await api.post(path, json={"metadata": {"name": "p"}, "status": {"phase": "kept"}})
    assert created.json()["status"] == {"phase": "kept"}
    assert (await api.patch(f"{path}/p/status", json={"status": {}}, headers=MERGE)).status_code == 404


# -- deletion -----------------------------------------------------------------------------------------------


async def test_finalizers_hold_deletion_until_the_last_one_is_removed(api: httpx.AsyncClient) -> None:
    created = await api.post(
        KTESTS, json=ktest("one", metadata={"name": "one", "finalizers": ["a/x", "a/y"]})
    )
    # Watching from the object's resourceVersion: no event can slip by before the stream is open.
    async with watching(
        api, KTESTS, resourceVersion=created.json()["metadata"]["resourceVersion"]
    ) as watcher:
        deleting = await api.delete(f"{KTESTS}/one")
        assert deleting.status_code == 200
        meta = deleting.json()["metadata"]
        assert meta["deletionTimestamp"]
        assert meta["deletionGracePeriodSeconds"] == 0
        assert (await api.get(f"{KTESTS}/one")).status_code == 200
        again = await api.delete(f"{KTESTS}/one")
        assert again.json()["metadata"]["resourceVersion"] == meta["resourceVersion"]  # nothing new happened

        added = await api.patch(
            f"{KTESTS}/one", json={"metadata": {"finalizers": ["a/x", "a/y", "a/z"]}}, headers=MERGE
        )
        assert added.status_code == 422

        one_left = await api.patch(f"{KTESTS}/one", json={"metadata": {"finalizers": ["a/y"]}}, headers=MERGE)
        assert one_left.json()["metadata"]["finalizers"] == ["a/y"]
        assert (await api.get(f"{KTESTS}/one")).status_code == 200

        released = await api.patch(f"{KTESTS}/one", json={"metadata": {"finalizers": None}}, headers=MERGE)
        assert released.status_code == 200
        assert (await api.get(f"{KTESTS}/one")).status_code == 404
        deleted = await watcher.wait(lambda e: e["type"] == "DELETED")
        assert deleted["object"]["metadata"]["name"] == "one"
        assert int(deleted["object"]["metadata"]["resourceVersion"]) > int(
            one_left.json()["metadata"]["resourceVersion"]
        )


async def test_delete_without_finalizers_removes_at_once(kube: KubeEmulator, api: httpx.AsyncClient) -> None:
    await api.post(CONFIGMAPS, json={"metadata": {"name": "cm"}})
    gone = await api.delete(f"{CONFIGMAPS}/cm")
    assert gone.status_code == 200
    assert gone.json()["kind"] == "Status"
    assert gone.json()["status"] == "Success"
    assert (await api.get(f"{CONFIGMAPS}/cm")).status_code == 404
    assert kube.objects["v1/configmaps", "default", "cm"].deleted
    assert (await api.delete(f"{CONFIGMAPS}/cm")).status_code == 404

    await api.post(KTESTS, json=ktest("one"))
    custom = await api.delete(f"{KTESTS}/one")
    assert custom.json()["metadata"]["name"] == "one"  # custom resources answer with the object
    recreated = await api.post(KTESTS, json=ktest("one"))
    assert recreated.status_code == 201
    assert recreated.json()["metadata"]["uid"] != custom.json()["metadata"]["uid"]


async def test_owned_objects_are_garbage_collected_with_their_owner(api: httpx.AsyncClient) -> None:
    owner = (await api.post(KTESTS, json=ktest("owner"))).json()
    ref = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "KTest",
        "name": "owner",
        "uid": owner["metadata"]["uid"],
    }
    await api.post(CONFIGMAPS, json={"metadata": {"name": "owned", "ownerReferences": [ref]}})
    await api.post(CONFIGMAPS, json={"metadata": {"name": "free"}})
    await api.delete(f"{KTESTS}/owner")
    assert (await api.get(f"{CONFIGMAPS}/owned")).status_code == 404
    assert (await api.get(f"{CONFIGMAPS}/free")).status_code == 200


# -- watching ----------------------------------------------------------------------------------------------


async def test_watch_streams_changes_with_current_resource_versions(api: httpx.AsyncClient) -> None:
    await api.post(KTESTS, json=ktest("before"))
    listed = (await api.get(KTESTS)).json()
    async with watching(api, KTESTS, resourceVersion=listed["metadata"]["resourceVersion"]) as watcher:
        created = (await api.post(KTESTS, json=ktest("after", spec={"a": 1}))).json()
        patched = (await api.patch(f"{KTESTS}/after", json={"spec": {"a": 2}}, headers=MERGE)).json()
        await api.delete(f"{KTESTS}/after")
        await watcher.wait(lambda e: e["type"] == "DELETED")
        seen = [
            (e["type"], e["object"]["metadata"]["name"], e["object"]["metadata"]["resourceVersion"])
            for e in watcher.events
        ]
        assert seen[:2] == [
            ("ADDED", "after", created["metadata"]["resourceVersion"]),
            ("MODIFIED", "after", patched["metadata"]["resourceVersion"]),
        ]
        assert seen[2][:2] == ("DELETED", "after")
        assert len(seen) == 3  # "before" is not replayed: the watch resumed after the list
        assert watcher.events[1]["object"]["spec"] == {"a": 2}

    async with watching(api, KTESTS, resourceVersion=listed["metadata"]["resourceVersion"]) as replay:
        await replay.wait(lambda e: e["type"] == "DELETED")
        assert [e["type"] for e in replay.events] == ["ADDED", "MODIFIED", "DELETED"]

    async with watching(api, KTESTS) as fresh:  # no resourceVersion: the current state first
        first = await fresh.wait(lambda e: True)
        assert (first["type"], first["object"]["metadata"]["name"]) == ("ADDED", "before")


async def test_watch_filters_by_label_selector_and_namespace(api: httpx.AsyncClient) -> None:
    created = await api.post("/api/v1/namespaces", json={"metadata": {"name": "other"}})
    since = created.json()["metadata"]["resourceVersion"]
    selector = "app=x,tier notin (db)"
    async with watching(api, "/api/v1/configmaps", labelSelector=selector, resourceVersion=since) as watcher:
        await api.post(
            "/api/v1/namespaces/other/configmaps", json={"metadata": {"name": "o", "labels": {"app": "x"}}}
        )
        await api.post(CONFIGMAPS, json={"metadata": {"name": "db", "labels": {"app": "x", "tier": "db"}}})
        await api.post(CONFIGMAPS, json={"metadata": {"name": "y", "labels": {"app": "y"}}})
        await api.post(CONFIGMAPS, json={"metadata": {"name": "last", "labels": {"app": "x"}}})
        await watcher.wait(lambda e: e["object"]["metadata"]["name"] == "last")
        assert [e["object"]["metadata"]["name"] for e in watcher.events] == ["o", "last"]
    listed = (await api.get(CONFIGMAPS, params={"labelSelector": "app=x"})).json()["items"]
    assert [cm["metadata"]["name"] for cm in listed] == ["db", "last"]
    bad = await api.get(CONFIGMAPS, params={"labelSelector": "a in (b"})
    assert bad.status_code == 400


async def test_watch_from_a_compacted_resource_version_is_gone(
    api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube_module, "EVENT_LOG_SIZE", 2)
    first = (await api.post(CONFIGMAPS, json={"metadata": {"name": "a"}})).json()
    for name in ("b", "c", "d"):
        await api.post(CONFIGMAPS, json={"metadata": {"name": name}})
    async with watching(api, CONFIGMAPS, resourceVersion=first["metadata"]["resourceVersion"]) as watcher:
        error = await watcher.wait(lambda e: e["type"] == "ERROR")
        assert error["object"]["code"] == 410
        assert error["object"]["reason"] == "Expired"


async def test_idle_watches_get_bookmarks_with_the_current_resource_version(kube: KubeEmulator) -> None:
    kube.bookmark_interval = 0.05
    async with (
        httpx.AsyncClient(base_url=str(kube.url), timeout=10) as api,
        watching(api, CONFIGMAPS, allowWatchBookmarks="true") as watcher,
    ):
        bookmark = await watcher.wait(lambda e: e["type"] == "BOOKMARK")
        assert bookmark["object"]["metadata"]["resourceVersion"] == kube.resource_version
        assert bookmark["object"]["kind"] == "ConfigMap"


# -- tokens & OIDC ---------------------------------------------------------------------------------------------


async def test_token_request_issues_a_service_account_jwt_verifiable_with_the_served_jwks(
    kube: KubeEmulator, api: httpx.AsyncClient
) -> None:
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    kube.clock = lambda: now
    kube.add_service_account("default", "builder")
    sa_uid = (await api.get("/api/v1/namespaces/default/serviceaccounts/builder")).json()["metadata"]["uid"]
    request = {"spec": {"audiences": ["issuer.enforce.dev"], "expirationSeconds": 1200}}
    response = await api.post("/api/v1/namespaces/default/serviceaccounts/builder/token", json=request)
    assert response.status_code == 201
    body = response.json()
    assert body["kind"] == "TokenRequest"
    assert body["status"]["expirationTimestamp"] == (now + datetime.timedelta(seconds=1200)).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    token = body["status"]["token"]
    jwks = (await api.get("/openid/v1/jwks")).json()
    assert all(set(key) == {"use", "kty", "kid", "alg", "n", "e"} for key in jwks["keys"])  # no private parts
    claims = verify(token, jwks, audience="issuer.enforce.dev")
    assert claims["iss"] == kube.issuer
    assert claims["sub"] == "system:serviceaccount:default:builder"
    assert claims["aud"] == ["issuer.enforce.dev"]
    assert claims["iat"] == claims["nbf"] == int(now.timestamp())
    assert claims["exp"] - claims["iat"] == 1200
    assert claims["kubernetes.io"] == {
        "namespace": "default",
        "serviceaccount": {"name": "builder", "uid": sa_uid},
    }
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": jwks["keys"][0]["kid"]}

    default = await api.post("/api/v1/namespaces/default/serviceaccounts/builder/token", json={"spec": {}})
    default_claims = jwt.decode(default.json()["status"]["token"], options={"verify_signature": False})
    assert default_claims["exp"] - default_claims["iat"] == 3600
    assert default_claims["aud"] == [kube.issuer]


async def test_token_request_validation(api: httpx.AsyncClient) -> None:
    too_short = await api.post(
        "/api/v1/namespaces/default/serviceaccounts/default/token", json={"spec": {"expirationSeconds": 599}}
    )
    assert too_short.status_code == 422
    assert "10 minutes" in too_short.json()["message"]
    missing = await api.post("/api/v1/namespaces/default/serviceaccounts/nobody/token", json={"spec": {}})
    assert missing.status_code == 404
    assert missing.json()["message"] == 'serviceaccounts "nobody" not found'


async def test_openid_configuration_follows_the_mutable_issuer(
    kube: KubeEmulator, api: httpx.AsyncClient
) -> None:
    kube.issuer = "https://oidc.public.example"
    config = (await api.get("/.well-known/openid-configuration")).json()
    assert config == {
        "issuer": "https://oidc.public.example",
        # The API server's own address, as kube-apiserver publishes it (no --service-account-jwks-uri).
        "jwks_uri": f"{str(api.base_url).rstrip('/')}/openid/v1/jwks",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }
    token = kube.mint_token("default", "default", audiences=["x"])
    assert jwt.decode(token, options={"verify_signature": False})["iss"] == "https://oidc.public.example"
    with pytest.raises(LookupError):
        kube.mint_token("default", "nobody", audiences=["x"])


async def test_key_rotation_keeps_old_tokens_valid_until_the_old_key_is_retired(
    kube: KubeEmulator, api: httpx.AsyncClient
) -> None:
    old_token = kube.mint_token("default", "default", audiences=["aud"])
    old_kid = jwt.get_unverified_header(old_token)["kid"]
    new_kid = kube.rotate_signing_key()
    assert new_kid != old_kid
    new_token = kube.mint_token("default", "default", audiences=["aud"])
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid

    served = (await api.get("/openid/v1/jwks")).json()
    assert [key["kid"] for key in served["keys"]] == [new_kid, old_kid]
    assert served == kube.jwks()
    assert verify(old_token, served, "aud")["sub"] == "system:serviceaccount:default:default"
    assert verify(new_token, served, "aud")["sub"] == "system:serviceaccount:default:default"

    kube.retire_previous_keys()
    served = (await api.get("/openid/v1/jwks")).json()
    assert [key["kid"] for key in served["keys"]] == [new_kid]
    with pytest.raises(KeyError):
        verify(old_token, served, "aud")
    forged = dict(served["keys"][0], kid=old_kid)  # even under the old kid, the new key does not verify it
    with pytest.raises(jwt.InvalidSignatureError):
        verify(old_token, {"keys": [forged]}, "aud")
    assert verify(new_token, served, "aud")["aud"] == ["aud"]

    newest = kube.rotate_signing_key(keep_previous=False)
    assert [key["kid"] for key in kube.jwks()["keys"]] == [newest]


# -- real clients -----------------------------------------------------------------------------------------------


async def test_the_kubernetes_client_works_through_a_kubeconfig(
    kube: KubeEmulator, tmp_path: pathlib.Path
) -> None:
    import kubernetes  # type: ignore[import-untyped]

    kubeconfig = tmp_path / "kubeconfig"
    write_kubeconfig(kubeconfig, str(kube.url), token="not-checked")
    assert kubeconfig.stat().st_mode & 0o777 == 0o600

    def use_the_client() -> tuple[list[str], dict[str, str], str, dict[str, Any]]:
        client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        with client:
            core = kubernetes.client.CoreV1Api(client)
            names = [ns.metadata.name for ns in core.list_namespace().items]
            body = kubernetes.client.V1ConfigMap(
                metadata=kubernetes.client.V1ObjectMeta(name="k"), data={"a": "1"}
            )
            core.create_namespaced_config_map("default", body)
            core.patch_namespaced_config_map("k", "default", {"data": {"b": "2"}})
            data = core.read_namespaced_config_map("k", "default").data
            core.delete_namespaced_config_map("k", "default")
            custom = kubernetes.client.CustomObjectsApi(client)
            custom.create_namespaced_custom_object(
                GROUP, VERSION, "default", PLURAL, ktest("c", spec={"x": 1})
            )
            status = custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, "default", PLURAL, "c", {"status": {"phase": "Ok"}}
            )
            try:
                core.read_namespaced_config_map("k", "default")
            except kubernetes.client.ApiException as exc:
                missing = str(exc.status)
            return names, data, missing, status

    names, data, missing, status = await asyncio.to_thread(use_the_client)
    assert "default" in names
    assert data == {"a": "1", "b": "2"}
    assert missing == "404"
    assert status["status"] == {"phase": "Ok"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
async def test_kubectl_works_against_the_emulator(kube: KubeEmulator, tmp_path: pathlib.Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    write_kubeconfig(kubeconfig, str(kube.url))
    manifest = tmp_path / "cm.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "hello"}, "data": {"a": "1"}}
        )
    )
    custom = tmp_path / "kt.yaml"
    custom.write_text(yaml.safe_dump(ktest("applied", spec={"x": 1}) | {"status": {"phase": "Set"}}))

    def kubectl(*args: str) -> str:
        done = subprocess.run(
            ["kubectl", "--kubeconfig", str(kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    jwks = json.loads(await asyncio.to_thread(kubectl, "get", "--raw", "/openid/v1/jwks"))
    assert jwks == kube.jwks()

    token = (
        await asyncio.to_thread(
            kubectl, "create", "token", "default", "-n", "default", "--audience", "issuer.enforce.dev"
        )
    ).strip()
    assert verify(token, jwks, "issuer.enforce.dev")["sub"] == "system:serviceaccount:default:default"

    assert "configmap/hello created" in await asyncio.to_thread(kubectl, "apply", "-f", str(manifest))
    assert "configmap/hello unchanged" in await asyncio.to_thread(kubectl, "apply", "-f", str(manifest))
    listed = json.loads(await asyncio.to_thread(kubectl, "get", "configmaps", "-n", "default", "-o", "json"))
    assert [(cm["metadata"]["name"], cm["data"]) for cm in listed["items"]] == [("hello", {"a": "1"})]

    assert "created" in await asyncio.to_thread(kubectl, "apply", "-f", str(custom))
    table = (await asyncio.to_thread(kubectl, "get", PLURAL)).splitlines()
    assert table[0].split() == ["NAME", "PHASE", "READY", "EXPIRES"]  # the CRD's columns only, no Age
    # The status in the manifest was dropped on create: the status subresource owns it.
    assert table[1].split() == ["applied"]  # phase, ready and expires are empty, as on a cluster
    assert "applied" in await asyncio.to_thread(kubectl, "get", "kt", "-o", "name")


# -- kopf -----------------------------------------------------------------------------------------------------


async def test_kopf_handles_create_and_delete_once_with_its_finalizer(
    kube: KubeEmulator, api: httpx.AsyncClient
) -> None:
    registry = kopf.OperatorRegistry()
    settings = kopf.OperatorSettings()
    settings.posting.enabled = True
    settings.watching.inactivity_timeout = 30
    created: list[str] = []
    deleted: list[str] = []

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=str(kube.url), insecure=True)

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    def on_create(name: str, body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        created.append(name)
        patch.status["phase"] = "Handled"
        kopf.info(body, reason="Handled", message="created by the test")

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    def on_delete(name: str, **_: Any) -> None:
        deleted.append(name)

    # kopf waits 5 s for, then cancels, every task started after it: connect the test's client first.
    assert (await api.get(KTESTS)).json()["items"] == []
    stop = asyncio.Event()
    operator = asyncio.create_task(
        kopf.operator(registry=registry, settings=settings, standalone=True, clusterwide=True, stop_flag=stop)
    )
    try:
        async with (
            watching(api, KTESTS) as objects,
            watching(api, "/api/v1/namespaces/default/events") as events,
        ):
            await api.post(KTESTS, json=ktest("k1", spec={"x": 1}))
            handled = await objects.wait(
                lambda e: (
                    e["object"].get("status", {}).get("phase") == "Handled"
                    and "kopf.zalando.org/KopfFinalizerMarker"
                    in e["object"]["metadata"].get("finalizers", [])
                )
            )
            event = await events.wait(lambda e: e["object"].get("reason") == "Handled")
            assert event["object"]["involvedObject"]["uid"] == handled["object"]["metadata"]["uid"]
            assert event["object"]["message"] == "created by the test"

            await api.delete(f"{KTESTS}/k1")
            await objects.wait(lambda e: e["type"] == "DELETED")
    finally:
        stop.set()
        await asyncio.wait_for(operator, timeout=10)

    assert created == ["k1"]
    assert deleted == ["k1"]
    json_patches = [r for r in kube if r.headers.get("Content-Type") == "application/json-patch+json"]
    finalizer_adds = [r for r in json_patches if any(op["op"] == "add" for op in r.data)]
    assert len(finalizer_adds) == 1  # kopf's optimistic JSON patch went through the first time
    assert (await api.get(f"{KTESTS}/k1")).status_code == 404
