"""The Chainguard emulator, held to chainguard-api.md through real HTTP on loopback.

Each test starts the emulator with a fake clock, talks to it with httpx like a client would, and
checks the wire answers (status, gRPC code, camelCase bodies) and the emulator's recorded state.
Presented OIDC tokens are signed with RSA keys made here; the claimMatch tests serve a tiny OIDC
issuer (discovery + JWKS) that the emulator reaches through ``issuer_routes``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import random
import re
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from cgid_testkit.chainguard import API_AUDIENCE, STS_ISSUER, ChainguardEmulator, Fault, RoleBindingStore
from chainguard_identity_operator.chainguard.types import format_time, parse_time

START = datetime.datetime(2026, 11, 23, 10, 0, tzinfo=datetime.UTC)
CLUSTER_ISSUER = "https://oidc.cluster.example"
SUBJECT = "system:serviceaccount:shop:default"
ORG_NAME = "my-org.example"
# One TLS context for every client: httpx builds a new one (~50 ms) per client otherwise. All traffic
# here is plain HTTP on loopback anyway.
TLS = ssl.create_default_context()


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += datetime.timedelta(**delta)


@dataclasses.dataclass(frozen=True)
class SigningKey:
    kid: str
    private: rsa.RSAPrivateKey

    def public_jwk(self) -> dict[str, Any]:
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}

    def private_jwk(self) -> dict[str, Any]:
        return {**jwt.algorithms.RSAAlgorithm.to_jwk(self.private, as_dict=True), "kid": self.kid}

    def jwks(self) -> str:
        return json.dumps({"keys": [self.public_jwk()]})

    def sign(self, **claims: Any) -> str:
        return jwt.encode(claims, self.private, algorithm="RS256", headers={"kid": self.kid})


@pytest.fixture(scope="module")
def keys() -> tuple[SigningKey, SigningKey]:
    """The cluster's signing key (registered with identities) and a key nobody registered."""
    return (
        SigningKey("cluster-key-1", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        SigningKey("other-key", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    )


@pytest.fixture(scope="module")
def emulator_key() -> rsa.RSAPrivateKey:
    """The emulator's own signing key, made once: RSA key generation dominates the run time otherwise."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def cg(clock: FakeClock, emulator_key: rsa.RSAPrivateKey) -> AsyncIterator[ChainguardEmulator]:
    async with ChainguardEmulator(clock=clock, signing_key=emulator_key) as emulator:
        yield emulator


@pytest.fixture
def org(cg: ChainguardEmulator) -> str:
    return cg.add_group(ORG_NAME, verified=True)


def client(cg: ChainguardEmulator, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=cg.api_url, headers=headers, timeout=5, verify=TLS)


@pytest.fixture
async def admin(cg: ChainguardEmulator) -> AsyncIterator[httpx.AsyncClient]:
    async with client(cg, cg.mint_api_token("admin@example.com")) as the_client:
        yield the_client


def claim_match_body(name: str = "puller", **claim_match: Any) -> dict[str, Any]:
    return {
        "name": name,
        "claimMatch": {"issuer": CLUSTER_ISSUER, "subject": SUBJECT, **claim_match},
    }


def static_body(key: SigningKey, expires: datetime.datetime, name: str = "ci-runner") -> dict[str, Any]:
    return {
        "name": name,
        "description": "made by a test",
        "staticKeys": {
            "issuer": CLUSTER_ISSUER,
            "subject": SUBJECT,
            "issuerKeys": key.jwks(),
            "expirationTime": format_time(expires),
        },
    }


def presented(key: SigningKey, clock: FakeClock, **overrides: Any) -> str:
    """A projected service-account token as the cluster would mint it (valid for ten minutes)."""
    now = int(clock().timestamp())
    claims = {
        "iss": CLUSTER_ISSUER,
        "sub": SUBJECT,
        "aud": ["issuer.enforce.dev"],
        "iat": now,
        "exp": now + 600,
        **overrides,
    }
    return key.sign(**claims)


async def exchange(
    cg: ChainguardEmulator, token: str, identity: str, audience: str = API_AUDIENCE
) -> httpx.Response:
    async with httpx.AsyncClient(verify=TLS, timeout=5) as http:
        return await http.post(
            f"{cg.sts_url}/sts/exchange",
            data={"aud": audience, "identity": identity},
            headers={"Authorization": f"Bearer {token}"},
        )


def assert_error(response: httpx.Response, status: int, code: int, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code
    assert fragment in body["message"]
    assert body["details"] == []


# -- identities ---------------------------------------------------------------------------------------


async def test_identity_create_get_update_delete(
    cg: ChainguardEmulator, org: str, admin: httpx.AsyncClient, clock: FakeClock
) -> None:
    created = await admin.post(f"/iam/v2/identities/{org}", json=claim_match_body())
    assert created.status_code == 200
    identity = created.json()
    uid = identity["uid"]
    assert re.fullmatch(rf"{org}/[0-9a-f]{{16}}", uid)
    assert identity["description"] == ""  # zero values are emitted
    assert identity["createTime"] == identity["updateTime"] == "2026-11-23T10:00:00Z"
    assert identity["lastSeenTime"] is None
    assert identity["claimMatch"]["issuer"] == CLUSTER_ISSUER
    assert identity["claimMatch"]["subject"] == SUBJECT
    assert "staticKeys" not in identity
    assert cg.identities[uid] == identity

    fetched = await admin.get(f"/iam/v2/identities/{uid}")  # the UIDP's "/" stays unescaped
    assert fetched.status_code == 200
    assert fetched.json() == identity

    clock.advance(minutes=5)
    masked = await admin.patch(
        f"/iam/v2/identities/{uid}",
        params={"updateMask": "description"},
        json={"description": "team shop", "name": "not-in-the-mask"},
    )
    assert masked.status_code == 200
    assert masked.json()["description"] == "team shop"
    assert masked.json()["name"] == "puller"
    assert masked.json()["updateTime"] == "2026-11-23T10:05:00Z"
    assert masked.json()["createTime"] == identity["createTime"]

    # Without a mask the server derives it from the fields sent: here claim_match.subject_pattern,
    # which replaces subject (a oneof) and leaves the issuer alone.
    derived = await admin.patch(
        f"/iam/v2/identities/{uid}", json={"claimMatch": {"subjectPattern": "system:serviceaccount:shop:.*"}}
    )
    assert derived.status_code == 200
    claim_match = derived.json()["claimMatch"]
    assert claim_match["subjectPattern"] == "system:serviceaccount:shop:.*"
    assert "subject" not in claim_match
    assert claim_match["issuer"] == CLUSTER_ISSUER
    assert derived.json()["description"] == "team shop"

    bad_mask = await admin.patch(f"/iam/v2/identities/{uid}", params={"updateMask": "uid"}, json={})
    assert_error(bad_mask, 400, 3, "update_mask")

    deleted = await admin.delete(f"/iam/v2/identities/{uid}")
    assert deleted.status_code == 200
    assert deleted.json() == {}
    assert uid not in cg.identities
    assert_error(await admin.get(f"/iam/v2/identities/{uid}"), 404, 5)
    assert_error(await admin.delete(f"/iam/v2/identities/{uid}"), 404, 5)


async def test_list_identities_pages_and_filters(
    cg: ChainguardEmulator, org: str, admin: httpx.AsyncClient
) -> None:
    folder = cg.add_group("folder", parent=org)
    made = []
    for name in ("dup", "dup", "other"):  # duplicate names under one parent are allowed
        response = await admin.post(f"/iam/v2/identities/{org}", json=claim_match_body(name))
        assert response.status_code == 200
        made.append(response.json()["uid"])
    nested = (await admin.post(f"/iam/v2/identities/{folder}", json=claim_match_body("deep"))).json()["uid"]

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        params = {"uidp.childrenOf": org, "pageSize": "1", **({"pageToken": token} if token else {})}
        page = (await admin.get("/iam/v2/identities", params=params)).json()
        pages += 1
        assert page["totalCount"] == "3"  # int64 as a JSON string
        seen += [identity["uid"] for identity in page["identities"]]
        token = page["nextPageToken"]
        if not token:
            break
    assert pages == 3
    assert seen == made

    dups = (await admin.get("/iam/v2/identities", params={"uidp.children_of": org, "name": "dup"})).json()
    assert [identity["uid"] for identity in dups["identities"]] == made[:2]
    assert dups["nextPageToken"] == ""

    everything = (await admin.get("/iam/v2/identities", params={"uidp.descendantsOf": org})).json()
    assert {identity["uid"] for identity in everything["identities"]} == {*made, nested}

    assert_error(await admin.get("/iam/v2/identities", params={"pageToken": "garbage"}), 400, 3, "page_token")
    assert_error(await admin.get("/iam/v2/identities", params={"pageSize": "-1"}), 400, 3, "page_size")


def _private_key_jwks(keys: tuple[SigningKey, SigningKey]) -> str:
    return json.dumps({"keys": [keys[0].private_jwk()]})


INVALID_BODIES: list[tuple[str, Callable[[dict[str, Any], tuple[SigningKey, SigningKey]], None], str]] = [
    ("uppercase name", lambda b, k: b.update(name="Bad-Name"), "name:"),
    ("short name", lambda b, k: b.update(name="ab"), "name:"),
    ("long name", lambda b, k: b.update(name="a" * 64), "name:"),
    ("description newline", lambda b, k: b.update(description="two\nlines"), "description"),
    ("description tab", lambda b, k: b.update(description="a\tb"), "description"),
    ("long description", lambda b, k: b.update(description="x" * 513), "description"),
    ("both oneofs", lambda b, k: b.update(claimMatch=claim_match_body()["claimMatch"]), "only one of"),
    ("no kind", lambda b, k: b.pop("staticKeys"), "static_keys is required"),
    ("private key", lambda b, k: b["staticKeys"].update(issuerKeys=_private_key_jwks(k)), "issuer_keys"),
    ("not a jwks", lambda b, k: b["staticKeys"].update(issuerKeys='{"keys": []}'), "issuer_keys"),
    ("two audiences", lambda b, k: b["staticKeys"].update(audiences=["a", "b"]), "static_keys.audiences"),
    ("no subject", lambda b, k: b["staticKeys"].pop("subject"), "static_keys.subject"),
    (
        "expiration too far",
        lambda b, k: b["staticKeys"].update(expirationTime=format_time(START + datetime.timedelta(days=366))),
        "static_keys.expiration_time",
    ),
    (
        "expiration in the past",
        lambda b, k: b["staticKeys"].update(
            expirationTime=format_time(START - datetime.timedelta(minutes=1))
        ),
        "static_keys.expiration_time",
    ),
    ("bad timestamp", lambda b, k: b["staticKeys"].update(expirationTime="tomorrow"), "expiration_time"),
]


@pytest.mark.parametrize(
    ("mutate", "field"), [case[1:] for case in INVALID_BODIES], ids=[c[0] for c in INVALID_BODIES]
)
async def test_invalid_identities_are_refused_with_the_field_named(
    cg: ChainguardEmulator,
    org: str,
    admin: httpx.AsyncClient,
    keys: tuple[SigningKey, SigningKey],
    mutate: Callable[[dict[str, Any], tuple[SigningKey, SigningKey]], None],
    field: str,
) -> None:
    body = static_body(keys[0], START + datetime.timedelta(days=30))
    mutate(body, keys)
    response = await admin.post(f"/iam/v2/identities/{org}", json=body)
    assert_error(response, 400, 3, field)
    assert keys[0].private_jwk()["d"] not in response.text  # key material is never echoed
    assert cg.identities == {}


@pytest.mark.parametrize(
    ("claim_match", "field"),
    [
        ({"issuerPattern": "https://.*"}, "only one of issuer and issuer_pattern"),
        ({"subject": None, "subjectPattern": "("}, "claim_match.subject_pattern"),
        ({"subject": None}, "claim_match.subject"),
        ({"claims": {"team": 7}}, "claim_match.claims"),
    ],
)
async def test_invalid_claim_matches_are_refused(
    org: str, admin: httpx.AsyncClient, claim_match: dict[str, Any], field: str
) -> None:
    body = claim_match_body()
    body["claimMatch"].update(claim_match)
    body["claimMatch"] = {key: value for key, value in body["claimMatch"].items() if value is not None}
    assert_error(await admin.post(f"/iam/v2/identities/{org}", json=body), 400, 3, field)


async def test_snake_case_is_accepted_and_unknown_fields_ignored(
    cg: ChainguardEmulator, org: str, admin: httpx.AsyncClient, keys: tuple[SigningKey, SigningKey]
) -> None:
    body = {
        "name": "snake",
        "unknown_field": {"anything": 1},
        "static_keys": {
            "issuer": CLUSTER_ISSUER,
            "subject": SUBJECT,
            "issuer_keys": keys[0].jwks(),
            "expiration_time": format_time(START + datetime.timedelta(days=10)),
        },
    }
    response = await admin.post(f"/iam/v2/identities/{org}", json=body)
    assert response.status_code == 200, response.text
    static = response.json()["staticKeys"]
    assert static["issuerKeys"] == keys[0].jwks()
    assert static["expirationTime"] == "2026-12-03T10:00:00Z"
    assert static["audiences"] == []
    assert "unknown_field" not in response.json()
    assert "unknownField" not in response.json()


async def test_create_needs_an_existing_parent_and_a_json_body(
    cg: ChainguardEmulator, org: str, admin: httpx.AsyncClient
) -> None:
    missing = "0" * 40
    assert_error(await admin.post(f"/iam/v2/identities/{missing}", json=claim_match_body()), 404, 5, missing)
    assert_error(await admin.post("/iam/v2/identities/NOT-A-UIDP", json=claim_match_body()), 400, 3, "UIDP")
    not_json = await admin.post(
        f"/iam/v2/identities/{org}", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert_error(not_json, 400, 3, "JSON")
    assert cg.identities == {}


# -- authentication and authorization -------------------------------------------------------------------


async def test_api_calls_need_a_valid_emulator_token(
    cg: ChainguardEmulator, org: str, clock: FakeClock, keys: tuple[SigningKey, SigningKey]
) -> None:
    async with client(cg) as anonymous:
        assert_error(await anonymous.get("/iam/v2/identities"), 401, 16, "missing bearer token")
    async with client(cg, cg.mint_api_token("admin@example.com", audience="cgr.dev")) as registry_token:
        assert_error(await registry_token.get("/iam/v2/identities"), 401, 16, "audience")
    forged = keys[1].sign(
        iss=STS_ISSUER, sub="admin@example.com", aud=API_AUDIENCE, exp=int(START.timestamp()) + 60
    )
    async with client(cg, forged) as forger:
        assert_error(await forger.get("/iam/v2/identities"), 401, 16)
    short_lived = cg.mint_api_token("admin@example.com", lifetime=datetime.timedelta(minutes=10))
    async with client(cg, short_lived) as admin:
        assert (await admin.get("/iam/v2/identities")).status_code == 200
        clock.advance(minutes=11)
        assert_error(await admin.get("/iam/v2/identities"), 401, 16, "expired")
    assert [r.status for r in cg.requests] == [401, 401, 401, 200, 401]
    assert cg.requests[3].subject == "admin@example.com"


async def test_role_bindings_authorize_by_group_and_ancestors(
    cg: ChainguardEmulator, org: str, keys: tuple[SigningKey, SigningKey]
) -> None:
    folder = cg.add_group("folder", parent=org)
    other_org = cg.add_group("other.example")

    def seeded(name: str, role: str) -> str:
        uid = cg.add_identity(org, claim_match_body(name))
        cg.bind(uid, org, role)
        return uid

    viewer, editor, puller = (
        seeded("viewer", "viewer"),
        seeded("editor", "editor"),
        seeded("puller", "registry.pull"),
    )
    async with client(cg, cg.mint_api_token(viewer)) as as_viewer:
        listed = await as_viewer.get("/iam/v2/identities", params={"uidp.childrenOf": org})
        assert listed.status_code == 200
        assert listed.json()["totalCount"] == "3"
        assert (await as_viewer.get(f"/iam/v2/identities/{editor}")).status_code == 200
        assert_error(await as_viewer.post(f"/iam/v2/identities/{org}", json=claim_match_body()), 403, 7)
        assert_error(await as_viewer.get("/iam/v2/identities", params={"uidp.childrenOf": other_org}), 403, 7)
    async with client(cg, cg.mint_api_token(editor)) as as_editor:
        # Bound on the organization, the editor may write in any folder below it, but not elsewhere.
        assert (
            await as_editor.post(f"/iam/v2/identities/{folder}", json=claim_match_body())
        ).status_code == 200
        assert_error(await as_editor.post(f"/iam/v2/identities/{other_org}", json=claim_match_body()), 403, 7)
    async with client(cg, cg.mint_api_token(puller)) as as_puller:
        assert_error(await as_puller.get(f"/iam/v2/identities/{viewer}"), 403, 7)
        assert_error(await as_puller.delete(f"/iam/v2/identities/{viewer}"), 403, 7)
    assert viewer in cg.identities


# -- roles, groups, role bindings ---------------------------------------------------------------------


async def test_roles_groups_and_role_bindings(
    cg: ChainguardEmulator, org: str, admin: httpx.AsyncClient
) -> None:
    builtin = (await admin.get("/iam/v2/roles", params={"name": "registry.pull"})).json()["roles"]
    assert [role["uid"] for role in builtin] == [cg.builtin_role_uid("registry.pull")]
    assert re.fullmatch(r"[0-9a-f]{40}", builtin[0]["uid"])
    custom = cg.add_custom_role(org, "registry.pull", ["repo.list"])
    both = (await admin.get("/iam/v2/roles", params={"name": "registry.pull"})).json()["roles"]
    assert [role["uid"] for role in both] == [builtin[0]["uid"], custom]
    assert custom.startswith(f"{org}/")

    groups = (await admin.get("/iam/v2/groups", params={"name": ORG_NAME})).json()["groups"]
    assert [(group["uid"], group["verified"]) for group in groups] == [(org, True)]

    identity = (await admin.post(f"/iam/v2/identities/{org}", json=claim_match_body())).json()["uid"]
    created = await admin.post(
        f"/iam/v2/roleBindings/{org}", json={"identityUid": identity, "roleUid": builtin[0]["uid"]}
    )
    assert created.status_code == 200, created.text
    binding = created.json()
    assert re.fullmatch(rf"{org}/[0-9a-f]{{16}}", binding["uid"])
    # The flat fields a create sets, and the hydrated views of the protos (never an identity's keys).
    assert (binding["identityUid"], binding["roleUid"]) == (identity, builtin[0]["uid"])
    assert "groupUid" not in binding  # the protos have no flat group: it is the parent of the UIDP
    assert binding["identity"] == {
        "uid": identity,
        "name": "puller",
        "description": "",
        "subject": SUBJECT,
        "issuer": CLUSTER_ISSUER,
        "email": "",
    }
    assert binding["group"] == {"uid": org, "name": ORG_NAME, "description": ""}
    assert binding["role"] == {
        "uid": builtin[0]["uid"],
        "name": "registry.pull",
        "description": builtin[0]["description"],
    }
    assert binding["createTime"] == "2026-11-23T10:00:00Z"
    viewer_role = cg.builtin_role_uid("viewer")
    snake = await admin.post(
        f"/iam/v2/roleBindings/{org}", json={"identity_uid": identity, "role_uid": viewer_role}
    )
    assert snake.status_code == 200
    assert_error(
        await admin.post(
            f"/iam/v2/roleBindings/{org}", json={"identityUid": identity, "roleUid": viewer_role}
        ),
        409,
        6,
    )
    assert_error(
        await admin.post(f"/iam/v2/roleBindings/{org}", json={"identityUid": identity, "roleUid": "f" * 40}),
        404,
        5,
    )
    assert_error(
        await admin.post(f"/iam/v2/roleBindings/{org}", json={"roleUid": viewer_role}), 400, 3, "identity_uid"
    )

    by_identity = (await admin.get("/iam/v2/roleBindings", params={"identity": identity})).json()
    assert [b["uid"] for b in by_identity["roleBindings"]] == [binding["uid"], snake.json()["uid"]]
    assert by_identity["roleBindings"][0] == binding
    by_role = (await admin.get("/iam/v2/roleBindings", params={"role": viewer_role})).json()["roleBindings"]
    assert [b["uid"] for b in by_role] == [snake.json()["uid"]]
    paged = (await admin.get("/iam/v2/roleBindings", params={"group": org, "pageSize": "1"})).json()
    assert len(paged["roleBindings"]) == 1
    assert paged["nextPageToken"]

    deleted = await admin.delete(f"/iam/v2/roleBindings/{binding['uid']}")
    assert deleted.status_code == 200
    assert deleted.json() == {}
    again = await admin.delete(f"/iam/v2/roleBindings/{binding['uid']}")  # idempotent (AIP-135)
    assert (again.status_code, again.json()) == (200, {})
    assert list(cg.role_bindings) == [snake.json()["uid"]]
    assert cg.writes() == {"identity.create": 1, "role_binding.create": 2, "role_binding.delete": 1}


@pytest.mark.parametrize("cascade", [False, True])
async def test_deleting_an_identity_keeps_its_bindings_unless_cascading(
    clock: FakeClock, emulator_key: rsa.RSAPrivateKey, cascade: bool
) -> None:
    async with ChainguardEmulator(clock=clock, signing_key=emulator_key, cascade_deletes=cascade) as cg:
        org = cg.add_group(ORG_NAME)
        uid = cg.add_identity(org, claim_match_body())
        kept = cg.add_identity(org, claim_match_body("kept"))
        cg.bind(uid, org, "registry.pull")
        survivor = cg.bind(kept, org, "viewer")
        async with client(cg, cg.mint_api_token("admin@example.com")) as admin:
            assert (await admin.delete(f"/iam/v2/identities/{uid}")).status_code == 200
            remaining = (await admin.get("/iam/v2/roleBindings", params={"group": org})).json()[
                "roleBindings"
            ]
        assert sorted(b["identity"]["uid"] for b in remaining) == sorted([kept] if cascade else [uid, kept])
        assert survivor in cg.role_bindings
        with pytest.raises(ValueError, match="name"):
            cg.add_identity(org, claim_match_body("NO"))


async def test_forbid_fresh_answers_403_while_permissions_propagate(
    cg: ChainguardEmulator, org: str, admin: httpx.AsyncClient, clock: FakeClock
) -> None:
    role = cg.builtin_role_uid("registry.pull")
    cg.faults.forbid_fresh(requests=2)
    first = (await admin.post(f"/iam/v2/identities/{org}", json=claim_match_body())).json()["uid"]
    statuses = [
        (
            await admin.post(f"/iam/v2/roleBindings/{org}", json={"identityUid": first, "roleUid": role})
        ).status_code
        for _ in range(3)
    ]
    assert statuses == [403, 403, 200]

    cg.faults.forbid_fresh(seconds=10)
    second = (await admin.post(f"/iam/v2/identities/{org}", json=claim_match_body("second"))).json()["uid"]
    body = {"identityUid": second, "roleUid": role}
    assert_error(await admin.post(f"/iam/v2/roleBindings/{org}", json=body), 403, 7)
    clock.advance(seconds=11)
    assert (await admin.post(f"/iam/v2/roleBindings/{org}", json=body)).status_code == 200


# -- STS ----------------------------------------------------------------------------------------------


@pytest.fixture
def static_identity(cg: ChainguardEmulator, org: str, keys: tuple[SigningKey, SigningKey]) -> str:
    uid = cg.add_identity(org, static_body(keys[0], START + datetime.timedelta(days=30)))
    cg.bind(uid, org, "registry.pull")
    cg.add_repo(org, "python")
    return uid


async def test_static_exchange_mints_a_token_that_works_on_the_api(
    cg: ChainguardEmulator, static_identity: str, keys: tuple[SigningKey, SigningKey], clock: FakeClock
) -> None:
    token = presented(keys[0], clock)
    response = await exchange(cg, token, static_identity)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["expiry"] == "2026-11-23T11:00:00Z"
    assert answer["refreshToken"]
    key = jwt.PyJWKSet.from_dict(cg.jwks()).keys[0]
    claims = jwt.decode(
        answer["token"],
        key,
        algorithms=["RS256"],
        audience=API_AUDIENCE,
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["iss"] == STS_ISSUER
    assert claims["sub"] == static_identity
    assert claims["exp"] == int((START + datetime.timedelta(hours=1)).timestamp())
    assert claims["act"] == {"iss": CLUSTER_ISSUER, "sub": SUBJECT, "aud": ["issuer.enforce.dev"]}
    assert cg.identities[static_identity]["lastSeenTime"] == "2026-11-23T10:00:00Z"

    async with client(cg, answer["token"]) as as_identity:
        repos = await as_identity.get("/registry/v1/repos")
        assert repos.status_code == 200
        assert [item["name"] for item in repos.json()["items"]] == ["python"]

    # Parameters may also come in the query string, with GET; a registry token is not an API token.
    async with httpx.AsyncClient(verify=TLS, timeout=5) as http:
        by_get = await http.get(
            f"{cg.sts_url}/sts/exchange",
            params={"aud": "cgr.dev", "identity": static_identity},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert by_get.status_code == 200
    async with client(cg, by_get.json()["token"]) as with_registry_token:
        assert_error(await with_registry_token.get("/registry/v1/repos"), 401, 16)

    assert [(e.identity, e.audiences, e.status) for e in cg.exchanges] == [
        (static_identity, (API_AUDIENCE,), 200),
        (static_identity, ("cgr.dev",), 200),
    ]
    assert token not in repr(cg.exchanges) + repr(cg.requests)


@pytest.mark.parametrize(
    ("signer", "overrides", "fragment"),
    [
        (0, {"sub": "system:serviceaccount:shop:intruder"}, "subject"),
        (0, {"aud": ["https://console-api.enforce.dev"]}, "audience"),
        (0, {"iss": "https://other.example"}, "different provider"),
        (0, {"exp": int(START.timestamp()) - 1}, "token is expired"),
        (1, {}, "no key with kid 'other-key'"),
    ],
    ids=["wrong subject", "wrong audience", "wrong issuer", "expired token", "unknown key"],
)
async def test_static_exchange_refusals(
    cg: ChainguardEmulator,
    static_identity: str,
    keys: tuple[SigningKey, SigningKey],
    clock: FakeClock,
    signer: int,
    overrides: dict[str, Any],
    fragment: str,
) -> None:
    response = await exchange(cg, presented(keys[signer], clock, **overrides), static_identity)
    assert_error(response, 403, 7, fragment)
    assert [(e.status, e.message) for e in cg.exchanges] == [(403, response.json()["message"])]


async def test_a_signature_by_another_key_under_a_known_kid_is_refused(
    cg: ChainguardEmulator, static_identity: str, keys: tuple[SigningKey, SigningKey], clock: FakeClock
) -> None:
    impostor = SigningKey(keys[0].kid, keys[1].private)
    assert_error(
        await exchange(cg, presented(impostor, clock), static_identity), 403, 7, "failed to verify signature"
    )


async def test_static_exchange_stops_when_the_identity_expires(
    cg: ChainguardEmulator, static_identity: str, keys: tuple[SigningKey, SigningKey], clock: FakeClock
) -> None:
    clock.advance(days=29, hours=23)
    assert (await exchange(cg, presented(keys[0], clock), static_identity)).status_code == 200
    clock.advance(hours=1)
    response = await exchange(cg, presented(keys[0], clock), static_identity)
    assert_error(response, 403, 7, "identity keys expired")


async def test_exchange_parameters(
    cg: ChainguardEmulator, static_identity: str, keys: tuple[SigningKey, SigningKey], clock: FakeClock
) -> None:
    token = presented(keys[0], clock)
    async with httpx.AsyncClient(base_url=cg.sts_url, timeout=5, verify=TLS) as http:
        auth = {"Authorization": f"Bearer {token}"}
        as_json = await http.post(
            "/sts/exchange", json={"aud": API_AUDIENCE, "identity": static_identity}, headers=auth
        )
        assert_error(as_json, 400, 3, "audience must be specified")
        no_identity = await http.post("/sts/exchange", data={"aud": API_AUDIENCE}, headers=auth)
        assert_error(no_identity, 400, 3, "identity")
        anonymous = await http.post("/sts/exchange", data={"aud": API_AUDIENCE, "identity": static_identity})
        assert_error(anonymous, 401, 16)
        unknown = await http.post(
            "/sts/exchange", data={"aud": API_AUDIENCE, "identity": f"{'a' * 40}/{'b' * 16}"}, headers=auth
        )
        assert_error(unknown, 403, 7)
        two = await http.post(
            "/sts/exchange",
            params=[("aud", API_AUDIENCE), ("aud", "cgr.dev"), ("identity", static_identity)],
            headers=auth,
        )
    assert two.status_code == 200
    claims = jwt.decode(two.json()["token"], options={"verify_signature": False})
    assert claims["aud"] == [API_AUDIENCE, "cgr.dev"]


@pytest.fixture
async def issuer(keys: tuple[SigningKey, SigningKey]) -> AsyncIterator[tuple[str, list[str]]]:
    """A cluster's OIDC issuer on loopback: discovery names the public issuer URL, as a real one does."""
    hits: list[str] = []

    async def discovery(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"issuer": CLUSTER_ISSUER, "jwks_uri": f"{CLUSTER_ISSUER}/openid/v1/jwks"})

    async def jwks(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"keys": [keys[0].public_jwk()]})

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/openid/v1/jwks", jwks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", hits
    finally:
        await runner.cleanup()


async def test_claim_match_exchange_fetches_the_issuer_keys(
    cg: ChainguardEmulator,
    org: str,
    keys: tuple[SigningKey, SigningKey],
    clock: FakeClock,
    issuer: tuple[str, list[str]],
) -> None:
    base, hits = issuer
    cg.issuer_routes[CLUSTER_ISSUER] = base
    body = claim_match_body(
        subject=None, subjectPattern="system:serviceaccount:shop:.*", claims={"team": "shop"}
    )
    body["claimMatch"] = {k: v for k, v in body["claimMatch"].items() if v is not None}
    uid = cg.add_identity(org, body)

    ok = await exchange(cg, presented(keys[0], clock, team="shop"), uid)
    assert ok.status_code == 200, ok.text
    assert hits == ["/.well-known/openid-configuration", "/openid/v1/jwks"]
    assert jwt.decode(ok.json()["token"], options={"verify_signature": False})["sub"] == uid

    refusals = {
        "claim 'team'": presented(keys[0], clock, team="other"),
        "subject": presented(keys[0], clock, team="shop", sub="x-system:serviceaccount:shop:default-x"),
        "audience": presented(keys[0], clock, team="shop", aud="sts.amazonaws.com"),
        "no key with kid": presented(keys[1], clock, team="shop"),
        "token is expired": presented(keys[0], clock, team="shop", exp=int(START.timestamp())),
    }
    for fragment, token in refusals.items():
        assert_error(await exchange(cg, token, uid), 403, 7, fragment)

    del cg.issuer_routes[CLUSTER_ISSUER]  # the issuer is private again: the STS cannot reach it
    assert_error(
        await exchange(cg, presented(keys[0], clock, team="shop"), uid), 403, 7, "failed to fetch keys"
    )


async def test_claim_match_refuses_an_unroutable_or_unmatched_issuer(
    cg: ChainguardEmulator, org: str, keys: tuple[SigningKey, SigningKey], clock: FakeClock
) -> None:
    body = claim_match_body()
    body["claimMatch"]["issuer"] = "https://unroutable.example"
    uid = cg.add_identity(org, body)
    token = presented(keys[0], clock, iss="https://unroutable.example")
    assert_error(await exchange(cg, token, uid), 403, 7, "failed to fetch keys")
    assert_error(await exchange(cg, presented(keys[0], clock), uid), 403, 7, "issuer does not match")


# -- lifetime switches ----------------------------------------------------------------------------------


@pytest.mark.parametrize("from_creation", [True, False])
async def test_max_lifetime_counted_from_creation_or_from_now(
    clock: FakeClock,
    keys: tuple[SigningKey, SigningKey],
    emulator_key: rsa.RSAPrivateKey,
    from_creation: bool,
) -> None:
    async with ChainguardEmulator(
        clock=clock,
        max_static_lifetime=datetime.timedelta(days=30),
        max_lifetime_from_creation=from_creation,
        signing_key=emulator_key,
    ) as cg:
        org = cg.add_group(ORG_NAME)
        token = cg.mint_api_token("admin@example.com", lifetime=datetime.timedelta(days=60))
        async with client(cg, token) as admin:
            too_long = static_body(keys[0], START + datetime.timedelta(days=31))
            assert_error(await admin.post(f"/iam/v2/identities/{org}", json=too_long), 400, 3, "30 days")
            created = await admin.post(
                f"/iam/v2/identities/{org}", json=static_body(keys[0], START + datetime.timedelta(days=20))
            )
            uid = created.json()["uid"]
            clock.advance(days=15)
            extended = START + datetime.timedelta(days=40)  # 25 days from now, 40 from creation
            response = await admin.patch(
                f"/iam/v2/identities/{uid}",
                params={"updateMask": "static_keys.expiration_time"},
                json={"staticKeys": {"expirationTime": format_time(extended)}},
            )
            if from_creation:
                assert_error(response, 400, 9, "create_time")
                assert parse_time(
                    cg.identities[uid]["staticKeys"]["expirationTime"]
                ) == START + datetime.timedelta(days=20)
            else:
                assert response.status_code == 200, response.text
                assert response.json()["staticKeys"]["expirationTime"] == format_time(extended)
                assert response.json()["staticKeys"]["issuerKeys"] == keys[0].jwks()
            beyond = await admin.patch(
                f"/iam/v2/identities/{uid}",
                params={"updateMask": "staticKeys.expirationTime"},
                json={"staticKeys": {"expirationTime": format_time(clock() + datetime.timedelta(days=31))}},
            )
            assert_error(beyond, 400, 9 if from_creation else 3, "expiration_time")
            # Keys alone may always be replaced, without touching the expiration.
            rotated = await admin.patch(
                f"/iam/v2/identities/{uid}",
                params={"updateMask": "static_keys.issuer_keys"},
                json={"staticKeys": {"issuerKeys": keys[1].jwks()}},
            )
            assert rotated.status_code == 200, rotated.text
            assert cg.identities[uid]["staticKeys"]["issuerKeys"] == keys[1].jwks()


# -- faults -------------------------------------------------------------------------------------------


async def test_injected_errors_with_retry_after(
    cg: ChainguardEmulator, org: str, admin: httpx.AsyncClient
) -> None:
    cg.faults.add("GET", r"^/iam/v2/identities$", status=503, retry_after=2)
    cg.faults.add("*", r"^/iam/v2/roles", status=429, times=2, retry_after=0.5)
    cg.faults.add("POST", r"^/iam/v2/identities/", status=500, grpc_code=2)

    unavailable = await admin.get("/iam/v2/identities")
    assert_error(unavailable, 503, 14)
    assert unavailable.headers["Retry-After"] == "2"
    assert (await admin.get("/iam/v2/identities")).status_code == 200

    for _ in range(2):
        limited = await admin.get("/iam/v2/roles", params={"name": "viewer"})
        assert_error(limited, 429, 8)
        assert limited.headers["Retry-After"] == "0.5"
    assert (await admin.get("/iam/v2/roles", params={"name": "viewer"})).status_code == 200

    failed = await admin.post(f"/iam/v2/identities/{org}", json=claim_match_body())
    assert_error(failed, 500, 2)
    assert "Retry-After" not in failed.headers
    assert cg.identities == {}  # a fault answers before the handler: nothing was created
    assert [(r.method, r.status) for r in cg.requests] == [
        ("GET", 503),
        ("GET", 200),
        ("GET", 429),
        ("GET", 429),
        ("GET", 200),
        ("POST", 500),
    ]
    assert cg.requests[2].query == {"name": ("viewer",)}

    cg.faults.add("GET", r"^/iam/v2/groups", status=503, times=5)
    cg.faults.clear()
    assert (await admin.get("/iam/v2/groups")).status_code == 200


async def test_delay_fault_times_a_client_out_and_stop_does_not_wait_for_it(
    clock: FakeClock, emulator_key: rsa.RSAPrivateKey
) -> None:
    cg = ChainguardEmulator(clock=clock, signing_key=emulator_key)
    await cg.start()
    try:
        token = cg.mint_api_token("admin@example.com")
        cg.faults.add("GET", r"^/iam/v2/groups", status=200, delay=0.05)
        async with client(cg, token) as admin:
            assert (await admin.get("/iam/v2/groups")).status_code == 200  # slow, then served
            cg.faults.add("GET", r"^/iam/v2/groups", status=504, delay=60)
            with pytest.raises(httpx.ReadTimeout):
                await admin.get("/iam/v2/groups", timeout=0.2)
    finally:
        await asyncio.wait_for(cg.stop(), timeout=5)
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(verify=TLS, timeout=2) as http:
            await http.get(f"{cg.api_url}/iam/v2/groups")


# -- registry -------------------------------------------------------------------------------------------


async def test_registry_repos_follow_pull_rights(
    cg: ChainguardEmulator, org: str, admin: httpx.AsyncClient
) -> None:
    folder = cg.add_group("team", parent=org)
    other = cg.add_group("other.example")
    for group, repo in ((org, "python"), (org, "nginx"), (folder, "curl"), (other, "secret")):
        cg.add_repo(group, repo)
    puller = cg.add_identity(org, claim_match_body("puller"))
    cg.bind(puller, org, "registry.pull")
    apk_only = cg.add_identity(org, claim_match_body("apk"))
    cg.bind(apk_only, org, "apk.pull")

    async with client(cg, cg.mint_api_token(puller)) as as_puller:
        names = [item["name"] for item in (await as_puller.get("/registry/v1/repos")).json()["items"]]
    assert sorted(names) == ["curl", "nginx", "python"]
    everything = (await admin.get("/registry/v1/repos")).json()["items"]
    assert sorted(item["name"] for item in everything) == ["curl", "nginx", "python", "secret"]
    async with client(cg, cg.mint_api_token(apk_only)) as as_apk:
        assert_error(await as_apk.get("/registry/v1/repos"), 403, 7)


async def test_urls_exist_only_while_running(clock: FakeClock, emulator_key: rsa.RSAPrivateKey) -> None:
    cg = ChainguardEmulator(clock=clock, signing_key=emulator_key)
    with pytest.raises(RuntimeError):
        _ = cg.api_url
    async with cg:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", cg.api_url)
        assert cg.sts_url == cg.api_url
        async with httpx.AsyncClient(verify=TLS, timeout=5) as http:
            assert_error(await http.get(f"{cg.api_url}/no/such/path"), 404, 5)


# -- committed, then the answer was lost ----------------------------------------------------------------


async def test_a_lost_status_after_commit_answers_a_gateway_error_but_keeps_the_write(
    cg: ChainguardEmulator, org: str, admin: httpx.AsyncClient
) -> None:
    cg.faults.add("POST", r"^/iam/v2/identities/", status=504, after_commit=True)
    lost = await admin.post(f"/iam/v2/identities/{org}", json=claim_match_body())
    assert_error(lost, 504, 4)
    assert [identity["name"] for identity in cg.identities.values()] == ["puller"]  # committed
    assert cg.writes() == {"identity.create": 1}
    assert [(f.kind, f.method, f.path, f.status, f.after_commit) for f in cg.faults.injected] == [
        ("status", "POST", f"/iam/v2/identities/{org}", 504, True)
    ]
    assert [(r.method, r.status) for r in cg.requests] == [("POST", 504)]
    again = await admin.post(f"/iam/v2/identities/{org}", json=claim_match_body())
    assert again.status_code == 200  # the fault was used up; a re-sent create makes a duplicate
    assert len(cg.identities) == 2


async def test_a_dropped_answer_after_commit_is_a_closed_connection(
    cg: ChainguardEmulator, org: str, admin: httpx.AsyncClient
) -> None:
    identity = cg.add_identity(org, claim_match_body())
    role = cg.builtin_role_uid("viewer")
    cg.faults.add("POST", r"^/iam/v2/roleBindings/", after_commit=True, lose="drop")
    with pytest.raises(httpx.RemoteProtocolError):
        await admin.post(f"/iam/v2/roleBindings/{org}", json={"identityUid": identity, "roleUid": role})
    assert [b["identityUid"] for b in cg.role_bindings.values()] == [identity]
    assert cg.writes() == {"role_binding.create": 1}
    assert cg.faults.injected[0].kind == "drop"
    assert cg.requests[-1].status == 0  # nothing was answered
    # The next request on a new connection is served as usual.
    assert (await admin.get("/iam/v2/roleBindings", params={"identity": identity})).status_code == 200


async def test_a_held_answer_after_commit_times_the_client_out_and_stop_does_not_wait(
    clock: FakeClock, emulator_key: rsa.RSAPrivateKey
) -> None:
    cg = ChainguardEmulator(clock=clock, signing_key=emulator_key)
    await cg.start()
    try:
        org = cg.add_group(ORG_NAME)
        uid = cg.add_identity(org, claim_match_body())
        cg.faults.add("DELETE", r"^/iam/v2/identities/", after_commit=True, lose="hold", delay=60)
        async with client(cg, cg.mint_api_token("admin@example.com")) as admin:
            with pytest.raises(httpx.ReadTimeout):
                await admin.delete(f"/iam/v2/identities/{uid}", timeout=0.2)
        assert uid not in cg.identities  # deleted before the answer was held
        assert cg.writes() == {"identity.delete": 1}
    finally:
        await asyncio.wait_for(cg.stop(), timeout=5)


async def test_a_lost_answer_to_a_refused_write_commits_nothing(
    cg: ChainguardEmulator, org: str, admin: httpx.AsyncClient
) -> None:
    cg.faults.add("POST", r"^/iam/v2/identities/", status=502, after_commit=True)
    lost = await admin.post(f"/iam/v2/identities/{org}", json=claim_match_body(name="NO"))
    assert_error(lost, 502, 14)  # the client cannot tell, which is the point
    assert cg.identities == {}
    assert cg.writes() == {}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"status": 503, "lose": "sometimes"}, "lose"),
        ({"status": 200, "after_commit": True}, "status"),
        ({"after_commit": True, "lose": "hold"}, "delay"),
        ({}, "status"),
        ({"status": 503, "times": 0}, "times"),
    ],
)
def test_fault_options_are_checked(
    emulator_key: rsa.RSAPrivateKey, options: dict[str, Any], message: str
) -> None:
    emulator = ChainguardEmulator(signing_key=emulator_key)
    with pytest.raises(ValueError, match=message):
        emulator.faults.add("POST", r"^/iam/", **options)


# -- a seeded fault policy --------------------------------------------------------------------------------


async def test_the_policy_decides_for_requests_no_pending_fault_matches(
    cg: ChainguardEmulator, org: str, admin: httpx.AsyncClient
) -> None:
    rng = random.Random(7)
    asked: list[tuple[str, str]] = []

    def policy(method: str, path: str) -> Fault | None:
        asked.append((method, path))
        if method == "GET" and rng.random() < 0.5:
            return Fault(status=503)
        return None

    cg.faults.policy = policy
    cg.faults.add("GET", r"^/iam/v2/groups", status=429, retry_after=1)
    assert_error(await admin.get("/iam/v2/groups"), 429, 8)  # the pending fault wins
    statuses = [(await admin.get("/iam/v2/roles")).status_code for _ in range(20)]
    assert asked == [("GET", "/iam/v2/roles")] * 20
    replay = random.Random(7)
    assert statuses == [503 if replay.random() < 0.5 else 200 for _ in range(20)]
    assert len(cg.faults.injected) == 1 + statuses.count(503)
    assert {(f.kind, f.status) for f in cg.faults.injected[1:]} == {("status", 503)}


async def test_a_policy_fault_may_lose_a_committed_answer(
    cg: ChainguardEmulator, org: str, admin: httpx.AsyncClient
) -> None:
    cg.faults.policy = lambda method, path: Fault(status=500, after_commit=True) if method == "POST" else None
    assert_error(await admin.post(f"/iam/v2/identities/{org}", json=claim_match_body()), 500, 13)
    assert len(cg.identities) == 1
    assert cg.faults.injected[0].after_commit


# -- permissions propagating after a create -------------------------------------------------------------


async def test_an_identity_create_in_a_fresh_group_answers_403_before_committing(
    cg: ChainguardEmulator, org: str, admin: httpx.AsyncClient
) -> None:
    folder = cg.add_group("folder", parent=org)
    cg.faults.forbid_fresh(identity_creates=2)
    statuses = [
        (await admin.post(f"/iam/v2/identities/{org}", json=claim_match_body())).status_code for _ in range(3)
    ]
    assert statuses == [403, 403, 200]
    assert len(cg.identities) == 1  # nothing was stored by the refused attempts
    # Counted per parent group: the folder is as new as the organization.
    assert (await admin.post(f"/iam/v2/identities/{folder}", json=claim_match_body())).status_code == 403
    assert [f.kind for f in cg.faults.injected] == ["propagation"] * 3
    assert cg.writes() == {"identity.create": 1}


# -- lifetime of static identities ------------------------------------------------------------------------


async def test_the_default_is_the_strict_reading_365_days_from_creation(
    cg: ChainguardEmulator,
    org: str,
    admin: httpx.AsyncClient,
    keys: tuple[SigningKey, SigningKey],
    clock: FakeClock,
) -> None:
    assert cg.max_static_lifetime == datetime.timedelta(days=365)
    assert cg.max_lifetime_from_creation
    assert cg.expiry_overrun == "refuse"
    created = await admin.post(
        f"/iam/v2/identities/{org}", json=static_body(keys[0], START + datetime.timedelta(days=30))
    )
    uid = created.json()["uid"]
    clock.advance(days=100)

    def extend(to: datetime.datetime) -> dict[str, Any]:
        return {"staticKeys": {"expirationTime": format_time(to)}}

    mask = {"updateMask": "static_keys.expiration_time"}
    async with client(cg, cg.mint_api_token("admin@example.com")) as later:
        past = await later.patch(
            f"/iam/v2/identities/{uid}",
            params=mask,
            json=extend(START + datetime.timedelta(days=365, seconds=1)),
        )
        assert_error(past, 400, 9, "create_time + 365 days")
        limit = await later.patch(
            f"/iam/v2/identities/{uid}", params=mask, json=extend(START + datetime.timedelta(days=365))
        )
    assert limit.status_code == 200, limit.text
    assert limit.json()["staticKeys"]["expirationTime"] == format_time(START + datetime.timedelta(days=365))


async def test_expiry_overrun_clamp_stores_the_limit_and_answers_200(
    clock: FakeClock, keys: tuple[SigningKey, SigningKey], emulator_key: rsa.RSAPrivateKey
) -> None:
    async with ChainguardEmulator(clock=clock, signing_key=emulator_key, expiry_overrun="clamp") as cg:
        org = cg.add_group(ORG_NAME)
        token = cg.mint_api_token("admin@example.com", lifetime=datetime.timedelta(days=400))
        async with client(cg, token) as admin:
            created = await admin.post(
                f"/iam/v2/identities/{org}", json=static_body(keys[0], START + datetime.timedelta(days=400))
            )
            assert created.status_code == 200, created.text
            limit = format_time(START + datetime.timedelta(days=365))
            assert created.json()["staticKeys"]["expirationTime"] == limit
            uid = created.json()["uid"]
            clock.advance(days=200)
            updated = await admin.patch(
                f"/iam/v2/identities/{uid}",
                params={"updateMask": "static_keys.expiration_time"},
                json={"staticKeys": {"expirationTime": format_time(clock() + datetime.timedelta(days=300))}},
            )
            assert updated.status_code == 200, updated.text
            assert updated.json()["staticKeys"]["expirationTime"] == limit  # silently clamped
            assert cg.identities[uid]["staticKeys"]["expirationTime"] == limit
            gone = await admin.patch(
                f"/iam/v2/identities/{uid}",
                params={"updateMask": "static_keys.expiration_time"},
                json={"staticKeys": {"expirationTime": format_time(clock() - datetime.timedelta(days=1))}},
            )
            assert_error(gone, 400, 3, "future")  # clamping never makes the past acceptable


def test_expiry_overrun_must_be_refuse_or_clamp(emulator_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="expiry_overrun"):
        ChainguardEmulator(signing_key=emulator_key, expiry_overrun="ignore")  # type: ignore[arg-type]


async def test_an_expiration_left_out_defaults_to_the_maximum(
    cg: ChainguardEmulator, org: str, admin: httpx.AsyncClient, keys: tuple[SigningKey, SigningKey]
) -> None:
    body = static_body(keys[0], START)
    del body["staticKeys"]["expirationTime"]
    created = await admin.post(f"/iam/v2/identities/{org}", json=body)
    assert created.status_code == 200, created.text
    assert created.json()["staticKeys"]["expirationTime"] == format_time(START + datetime.timedelta(days=365))


# -- the authorization index ------------------------------------------------------------------------------


async def test_authorization_follows_direct_edits_of_role_bindings(
    cg: ChainguardEmulator, org: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = cg.add_identity(org, claim_match_body("target"))
    viewer = cg.add_identity(org, claim_match_body("viewer"))
    binding = cg.bind(viewer, org, "viewer")
    for index in range(300):  # others' bindings, which a check for the viewer must not walk through
        cg.bind(cg.add_identity(org, claim_match_body(f"other-{index}")), org, "registry.pull")

    async def can_read() -> bool:
        async with client(cg, cg.mint_api_token(viewer)) as as_viewer:
            return (await as_viewer.get(f"/iam/v2/identities/{target}")).status_code == 200

    def no_scans(self: RoleBindingStore) -> Any:
        raise AssertionError("an authorization check scanned every role binding")

    with monkeypatch.context() as patched:
        patched.setattr(RoleBindingStore, "__iter__", no_scans)
        assert await can_read()

    saved = cg.role_bindings.pop(binding)
    assert not await can_read()
    cg.role_bindings[binding] = saved
    assert await can_read()
    del cg.role_bindings[binding]
    assert not await can_read()
    # A binding written by hand in the nested shape only, under a new key, counts too.
    cg.role_bindings["hand-made"] = {
        "uid": "hand-made",
        "identity": {"uid": viewer},
        "group": {"uid": org},
        "role": {"uid": cg.builtin_role_uid("viewer")},
    }
    assert await can_read()
    cg.role_bindings["hand-made"] = {**cg.role_bindings["hand-made"], "identity": {"uid": target}}
    assert not await can_read()  # replaced by one for somebody else
    cg.role_bindings.update({binding: saved})
    assert await can_read()
    cg.role_bindings.clear()
    assert not await can_read()
    cg.role_bindings = {binding: saved}  # a whole new dict
    assert isinstance(cg.role_bindings, RoleBindingStore)
    assert await can_read()
    cg.role_bindings[binding]["identity"]["uid"] = target  # edited in place: seen too
    cg.role_bindings[binding]["identityUid"] = target
    assert not await can_read()


async def test_updating_or_cascading_keeps_the_index_right(
    clock: FakeClock, emulator_key: rsa.RSAPrivateKey
) -> None:
    async with ChainguardEmulator(clock=clock, signing_key=emulator_key, cascade_deletes=True) as cg:
        org = cg.add_group(ORG_NAME)
        editor = cg.add_identity(org, claim_match_body("editor"))
        cg.bind(editor, org, "editor")
        doomed = cg.add_identity(org, claim_match_body("doomed"))
        cg.bind(doomed, org, "viewer")
        async with client(cg, cg.mint_api_token(editor)) as as_editor:
            renamed = await as_editor.patch(
                f"/iam/v2/identities/{editor}",
                params={"updateMask": "description"},
                json={"description": "x"},
            )
            assert renamed.status_code == 200
            assert (await as_editor.delete(f"/iam/v2/identities/{doomed}")).status_code == 200
            listed = (await as_editor.get("/iam/v2/roleBindings", params={"group": org})).json()
        assert [b["identityUid"] for b in listed["roleBindings"]] == [editor]
        assert listed["roleBindings"][0]["identity"]["description"] == "x"
        assert cg.writes() == {"identity.update": 1, "identity.delete": 1}
