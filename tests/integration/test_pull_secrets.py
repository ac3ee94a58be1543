"""Pull secrets and exchange verification, with the real operator against both emulators.

A resource with ``spec.pullSecret`` gets a ``kubernetes.io/dockerconfigjson`` Secret whose token is a
Chainguard token of its identity for the registry; it is refreshed before it expires (a fast-forwarded
day makes two dozen of them, and no write in between), after the identity is replaced or re-keyed,
and when someone deletes or edits it; a refused refresh is retried on the backoff; a real registry
client (crane) pulls with it. ``attachToServiceAccount`` adds and removes exactly one
``imagePullSecrets`` entry. With ``spec.verifyExchange`` the operator exchanges a token of the service
account itself and says so in ``ExchangeVerified``; a broken identity turns Ready False with the STS's
reason, a refused check is retried on the backoff, and an STS that is down is no verdict. No token
reaches logs, status or events. (The Kubernetes emulator grants the operator everything; the tenant's
Role, and what the real RBAC refuses without it, are proven on the real API server in
tests/e2e/test_cluster.py.)
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging
import os
import pathlib
import re
from typing import Any

import jwt
import pytest

from cgid_testkit.harness import ORG_NAME, World, world

pytestmark = pytest.mark.timeout(120)

HOUR = datetime.timedelta(hours=1)
JWT = re.compile(r"eyJ[\w-]{6,}")


def cr(name: str, namespace: str = "shop", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


async def secret(w: World, namespace: str, name: str) -> dict[str, Any] | None:
    async with w.client() as client:
        response = await client.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
    if response.status_code == 404:
        return None
    response.raise_for_status()
    found: dict[str, Any] = response.json()
    return found


def registry_token(found: dict[str, Any]) -> str:
    config = json.loads(base64.b64decode(found["data"][".dockerconfigjson"]))
    ((_registry, entry),) = config["auths"].items()
    user, _, token = base64.b64decode(entry["auth"]).decode().partition(":")
    assert user == "_token"
    return token


def claims(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


async def account(w: World, namespace: str, name: str) -> dict[str, Any]:
    async with w.client() as client:
        response = await client.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}")
    response.raise_for_status()
    found: dict[str, Any] = response.json()
    return found


async def wait_secret(w: World, namespace: str, name: str, predicate: Any, what: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        found = await secret(w, namespace, name)
        return found if found is not None and predicate(found) else None

    return await w.wait_for(probe, what=what)


def expires(found: dict[str, Any]) -> str:
    value: str = found["metadata"]["annotations"]["iam.chainguard.dev/token-expires-at"]
    return value


async def test_a_pull_secret_holds_a_registry_token_of_the_identity(sandbox: World) -> None:
    w = sandbox
    await w.apply(cr("puller", parent=w.org, pullSecret={"name": "puller-pull"}))
    status = (await w.wait_ready("shop", "puller"))["status"]
    found = await wait_secret(w, "shop", "puller-pull", lambda s: True, "the pull secret")
    assert found["type"] == "kubernetes.io/dockerconfigjson"
    owners = found["metadata"]["ownerReferences"]
    assert [(o["kind"], o["name"], o.get("controller")) for o in owners] == [
        ("ChainguardIdentity", "puller", True)
    ]
    token = claims(registry_token(found))
    assert token["aud"] == w.registry.host  # CGID_REGISTRY: the harness's registry emulator
    assert token["sub"] == status["identityId"]  # a token of this identity, minted by the STS
    assert token["act"]["sub"] == "system:serviceaccount:shop:default"  # for this service account's token
    assert status["pullSecret"]["name"] == "puller-pull"
    assert status["pullSecret"]["expiresAt"] == expires(found)
    pull = next(c for c in status["conditions"] if c["type"] == "PullSecretReady")
    assert (pull["status"], pull["reason"]) == ("True", "PullSecretCurrent")


async def test_the_pull_secret_is_refreshed_before_it_expires_all_day_long(sandbox: World) -> None:
    w = sandbox
    # Static: the STS checks the token against the registered keys, with no discovery fetch per exchange.
    spec = {"mode": "Static", "pullSecret": {"name": "puller-pull", "refreshBefore": "10m"}}
    await w.apply(cr("puller", parent=w.org, **spec))
    await w.wait_ready("shop", "puller")
    first = await wait_secret(w, "shop", "puller-pull", lambda s: True, "the pull secret")
    seen = [expires(first)]
    step = datetime.timedelta(minutes=51)  # just past the refresh time of each token (60 - 10 minutes)
    for _ in range(int(datetime.timedelta(hours=24) / step) + 1):  # 29 steps: a day and a bit
        w.kube.forget_requests()  # else each step costs more than the last (kmock walks its whole log)
        w.advance(step)
        found = await wait_secret(w, "shop", "puller-pull", lambda s: expires(s) != seen[-1], "a refresh")
        seen.append(expires(found))
        token = claims(registry_token(found))
        assert token["exp"] > w.clock().timestamp()  # never an expired token in the Secret
    assert len(seen) - 1 >= 24
    writes = [e for e in await w.events("shop") if e["reason"] == "PullSecretWritten"]
    assert len(writes) == len(seen)  # one write per token: no idle refreshes in between


async def test_the_pull_secret_follows_replacement_and_key_rotation(sandbox: World) -> None:
    w = sandbox
    await w.apply(cr("ci", parent=w.org, mode="Static", pullSecret={"name": "ci-pull"}))
    before = (await w.wait_ready("shop", "ci"))["status"]
    first = await wait_secret(w, "shop", "ci-pull", lambda s: True, "the pull secret")

    # The cluster's keys rotate: the identity is re-keyed in place, and the Secret is written again.
    w.kube.rotate_signing_key()
    await w.poll_cluster()
    rekeyed = await wait_secret(
        w,
        "shop",
        "ci-pull",
        lambda s: s["metadata"]["resourceVersion"] != first["metadata"]["resourceVersion"],
        "re-key",
    )
    assert claims(registry_token(rekeyed))["sub"] == before["identityId"]

    # A mode change replaces the identity: the Secret then holds a token of the new one.
    await w.apply(cr("ci", parent=w.org, mode="ClaimMatch", pullSecret={"name": "ci-pull"}))
    after = await w.wait_for(lambda: _replaced(w, before["identityId"]), what="the replacement")
    replaced = await wait_secret(
        w,
        "shop",
        "ci-pull",
        lambda s: claims(registry_token(s))["sub"] == after,
        "a token of the new identity",
    )
    assert replaced["metadata"]["annotations"]["iam.chainguard.dev/identity"] == after


async def _replaced(w: World, old: str) -> str | None:
    obj = await w.get("shop", "ci")
    uid = ((obj or {}).get("status") or {}).get("identityId")
    return uid if uid and uid != old else None


@pytest.mark.parametrize("how", ["deleted", "edited"])
async def test_a_pull_secret_deleted_or_edited_is_restored(sandbox: World, how: str) -> None:
    w = sandbox
    await w.apply(cr("puller", parent=w.org, pullSecret={"name": "puller-pull"}))
    await w.wait_ready("shop", "puller")
    original = await wait_secret(w, "shop", "puller-pull", lambda s: True, "the pull secret")
    async with w.client() as client:
        path = "/api/v1/namespaces/shop/secrets/puller-pull"
        if how == "deleted":
            (await client.delete(path)).raise_for_status()
        else:
            bogus = base64.b64encode(
                json.dumps({"auths": {"cgr.dev": {"auth": "bm9wZQ=="}}}).encode()
            ).decode()
            patch = {"data": {".dockerconfigjson": bogus}}
            response = await client.patch(
                path, json=patch, headers={"Content-Type": "application/merge-patch+json"}
            )
            response.raise_for_status()
    w.advance(w.settings.resync_interval)  # drift is repaired at the next resync
    restored = await wait_secret(
        w,
        "shop",
        "puller-pull",
        lambda s: s["metadata"]["uid"] != original["metadata"]["uid"] or _is_valid(s),
        "the pull secret restored",
    )
    assert claims(registry_token(restored))["aud"] == w.registry.host


def _is_valid(found: dict[str, Any]) -> bool:
    try:
        return claims(registry_token(found))["iss"] == "https://issuer.enforce.dev"
    except (jwt.PyJWTError, ValueError, KeyError, AssertionError):
        return False


async def test_attach_to_service_account_adds_one_entry_and_removing_it_takes_it_out(sandbox: World) -> None:
    w = sandbox
    async with w.client() as client:
        response = await client.patch(
            "/api/v1/namespaces/shop/serviceaccounts/default",
            json={"imagePullSecrets": [{"name": "someone-elses"}]},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        response.raise_for_status()
    spec = {"parent": w.org, "pullSecret": {"name": "puller-pull", "attachToServiceAccount": True}}
    await w.apply(cr("puller", **spec))
    await w.wait_ready("shop", "puller")

    async def listed(names: list[str]) -> bool:
        entries = [ref["name"] for ref in (await account(w, "shop", "default")).get("imagePullSecrets") or []]
        return entries == names

    await w.wait_for(lambda: listed(["someone-elses", "puller-pull"]), what="the entry added once")
    w.advance(w.settings.resync_interval)
    await w.wait_ready("shop", "puller")
    assert await listed(["someone-elses", "puller-pull"])  # not added twice

    detached = {"name": "puller-pull", "attachToServiceAccount": False}
    await w.apply(cr("puller", parent=w.org, pullSecret=detached))
    await w.wait_for(lambda: listed(["someone-elses"]), what="the entry removed when attach is turned off")

    await w.apply(cr("puller", **spec))
    await w.wait_for(lambda: listed(["someone-elses", "puller-pull"]), what="the entry added again")
    await w.delete("shop", "puller")
    await w.wait_for(lambda: listed(["someone-elses"]), what="the entry removed with the resource")


async def test_a_verified_exchange_is_ready_and_a_broken_one_says_why() -> None:
    interval = datetime.timedelta(seconds=2)
    async with world(settings_overrides={"verify_interval": interval}) as w:
        await w.apply(cr("ci", parent=w.org, mode="Static", verifyExchange=True))
        obj = await w.wait_ready("shop", "ci")
        verified = next(c for c in obj["status"]["conditions"] if c["type"] == "ExchangeVerified")
        assert (verified["status"], verified["reason"]) == ("True", "ExchangeVerified")
        assert obj["status"]["exchange"]["result"] == "Verified"
        uid = obj["status"]["identityId"]

        # Someone edits the identity's keys outside the operator. Drift is repaired at the next resync,
        # from a fresh listing; the check needs no listing, and within one verification period it finds
        # the exchange broken: Ready False, with the STS's own words.
        w.chainguard.identities[uid]["staticKeys"]["issuerKeys"] = json.dumps(w.chainguard.jwks())
        w.advance(interval)
        broken = await w.wait_condition("shop", "ci", "Ready", "False", reason="ExchangeFailed")
        conditions = {c["type"]: c for c in broken["status"]["conditions"]}
        assert "verifying token" in conditions["Ready"]["message"]
        assert (conditions["ExchangeVerified"]["status"], conditions["ExchangeVerified"]["reason"]) == (
            "False",
            "ExchangeFailed",
        )
        reasons = [e["reason"] for e in await w.events("shop") if e.get("type") == "Warning"]
        assert "ExchangeFailed" in reasons

        # The resync repairs the keys, and the next check says so.
        w.advance(w.settings.resync_interval)
        await w.wait_ready("shop", "ci")


async def test_a_refused_check_is_retried_with_backoff_and_turns_verified_without_waiting_an_interval() -> (
    None
):
    """The STS refuses the service account's first exchanges (a cause outside the identity: it does not
    change). The check is repeated on the pass's backoff, not a verification interval later;
    and an STS that is merely down (503) is ChainguardUnavailable, never a verdict on the identity."""
    # Shorter than the operator's own API token lives, which the STS fault below must not reach.
    async with world(settings_overrides={"verify_interval": datetime.timedelta(minutes=5)}) as w:
        await w.apply(cr("first", parent=w.org))
        await w.wait_ready("shop", "first")  # the operator's own API token is cached from here on
        w.chainguard.faults.add("POST", r"^/sts/exchange$", status=403, times=2)
        await w.apply(cr("ci", parent=w.org, mode="Static", verifyExchange=True))
        obj = await w.wait_ready("shop", "ci")  # no clock advanced: the backoff alone brought it back
        warnings = [e["reason"] for e in await w.events("shop") if e.get("type") == "Warning"]
        assert "ExchangeFailed" in warnings  # it was reported broken on the way
        verified = next(c for c in obj["status"]["conditions"] if c["type"] == "ExchangeVerified")
        assert verified["status"] == "True"
        refused = [x for x in w.chainguard.faults.injected if x.path == "/sts/exchange"]
        assert [x.status for x in refused] == [403, 403]

        w.chainguard.faults.add("POST", r"^/sts/exchange$", status=503, times=10_000)
        w.advance(w.settings.verify_interval)
        busy = await w.wait_condition("shop", "ci", "Reconciling", "True", reason="ChainguardUnavailable")
        assert busy["status"]["exchange"]["result"] == "Verified"  # the last verdict stands
        w.chainguard.faults.clear()
        await w.wait_for(
            lambda: _checked_after(w, "ci", busy["status"]["exchange"]["verifiedAt"]),
            what="the check to be made again once the STS answers",
        )


async def test_a_refused_refresh_is_retried_with_backoff() -> None:
    """The STS refuses the registry-token exchange for a while: the Secret is written as soon as it
    answers again, on the backoff — not at the next resync, by which time the old token may be gone."""
    async with world() as w:
        await w.apply(cr("first", parent=w.org))
        await w.wait_ready("shop", "first")  # the operator's own API token is cached from here on
        w.chainguard.faults.add("POST", r"^/sts/exchange$", status=403, times=3)
        await w.apply(cr("puller", parent=w.org, mode="Static", pullSecret={"name": "puller-pull"}))
        await wait_secret(w, "shop", "puller-pull", lambda s: True, "the pull secret, once the STS answers")
        obj = await w.wait_condition("shop", "puller", "PullSecretReady", "True")
        assert obj["status"]["pullSecret"]["name"] == "puller-pull"
        warnings = [e["reason"] for e in await w.events("shop") if e.get("type") == "Warning"]
        assert "PullSecretRefreshFailing" in warnings


async def _checked_after(w: World, name: str, before: str) -> bool:
    obj = await w.get("shop", name)
    record = (obj or {}).get("status", {}).get("exchange", {})
    return record.get("result") == "Verified" and record.get("verifiedAt", "") > before


async def test_no_token_reaches_logs_status_or_events(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with world() as w:
        await w.apply(cr("puller", parent=w.org, pullSecret={"name": "puller-pull"}, verifyExchange=True))
        obj = await w.wait_ready("shop", "puller")
        await wait_secret(w, "shop", "puller-pull", lambda s: True, "the pull secret")
        readable = [json.dumps(obj["status"]), json.dumps(await w.events("shop")), caplog.text]
        assert not any(JWT.search(text) for text in readable)


async def test_a_real_registry_client_pulls_with_the_secret_and_not_once_it_expired(
    sandbox: World, crane: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """crane (go-containerregistry), with the Secret exactly as a kubelet gets it, walks the registry's
    token handshake and reads the image; once the token in it has expired, it is refused."""
    w = sandbox
    await w.apply(cr("puller", parent=w.org, mode="Static", pullSecret={"name": "puller-pull"}))
    await w.wait_ready("shop", "puller")
    found = await wait_secret(w, "shop", "puller-pull", lambda s: True, "the pull secret")
    config = tmp_path / "docker"
    config.mkdir()
    (config / "config.json").write_bytes(base64.b64decode(found["data"][".dockerconfigjson"]))
    image = f"{w.registry.host}/{ORG_NAME}/python:latest"

    async def crane_manifest() -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            str(crane),
            "manifest",
            "--insecure",
            image,
            env={**os.environ, "DOCKER_CONFIG": str(config)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
        assert process.returncode is not None
        return process.returncode, out.decode()

    code, out = await crane_manifest()
    assert code == 0, out
    assert json.loads(out)["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert any(r.subject for r in w.registry.requests)  # the registry saw the identity behind the token

    await w.stop_operator()  # nobody refreshes it now
    w.clock.advance(datetime.timedelta(hours=1, minutes=1))
    code, out = await crane_manifest()
    assert code != 0
    assert "UNAUTHORIZED" in out
    assert "expired" in out
