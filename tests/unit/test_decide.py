"""The pure reconcile core: ``decide`` one step at a time, ``fold`` for every result it can get, the
target both work against, and whole reconcile loops against an in-memory Chainguard (no I/O, no clock:
``now`` is always given).

The loops drive the production ``decide`` and ``fold`` exactly as ``reconcile._run`` does. ``World``
plays only the API's part: it assigns UIDs and creation times, applies update masks to the identity it
stores (and, as the strict reading of the v2 API has it, refuses or clamps an expiry past creation plus
365 days), stores role bindings and ConfigMaps. ``observe`` builds the snapshot a pass starts from out
of the world and the status memory with the production ``policy.select``, as ``reconcile._observe``
does. After every pass the folded snapshot is compared with a fresh observation of the world, so a
``fold`` that forgets what an action did shows up as a mismatch; and every action is checked against
the safety rules before the world performs it (marked before anything else, deleted only after the
ConfigMap names the successor and the grace period is over, never touching the operator's own identity).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import math
import random
import re
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from chainguard_identity_operator import decide as decide_module
from chainguard_identity_operator import naming, policy, reconcile
from chainguard_identity_operator.chainguard.types import ClaimMatch, Identity, RoleBinding, StaticKeys
from chainguard_identity_operator.config import Settings
from chainguard_identity_operator.decide import (
    Action,
    BindRole,
    Bound,
    Created,
    CreateIdentity,
    DeleteConfigMap,
    DeleteIdentity,
    Done,
    Observed,
    Refused,
    Removed,
    Result,
    Rotation,
    Taken,
    TakeSpare,
    Target,
    UnbindRole,
    Updated,
    UpdateIdentity,
    WriteConfigMap,
    Written,
    build_target,
    config_map_data,
    decide,
    desired_identity,
    fold,
    forced_rotation,
    issuer_is_public,
    lifetime_limit,
    renewal_due_at,
    resolve_mode,
    shape_update,
)
from chainguard_identity_operator.jwks import KeySet, parse_jwks
from chainguard_identity_operator.model import Mode, SpecError, StaticSpec, parse_spec
from chainguard_identity_operator.naming import Owner, identity_description, ownership_marker

UTC = datetime.UTC
td = datetime.timedelta

ORG = "c95870ebffa72a258df087ea727ee92daf177e29"
OTHER_ORG = "0123456789abcdef0123456789abcdef01234567"
CLUSTER_ID = "3f0c5a8e-1b2d-4c6e-9f7a-0b1c2d3e4f5a"
OWNER = Owner("prod", CLUSTER_ID, "shop", "puller")
LEGACY_OWNER = Owner("prod", None, "shop", "puller")
ROLE_IDS = {
    "registry.pull": "1111111111111111111111111111111111111111",
    "apk.pull": "2222222222222222222222222222222222222222",
    "viewer": "3333333333333333333333333333333333333333",
}
OWNER_ROLE = "4444444444444444444444444444444444444444"
ROLE_NAMES = {**{uid: name for name, uid in ROLE_IDS.items()}, OWNER_ROLE: "owner"}

# Microseconds on purpose: expiry times the operator writes are whole seconds.
NOW = datetime.datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=UTC)
PUBLIC_ISSUER = "https://container.googleapis.com/v1/projects/p/locations/europe-west1/clusters/c"
PRIVATE_ISSUER = "https://kubernetes.default.svc.cluster.local"
DESCRIPTION = identity_description(OWNER)
NAME = "prod.shop.puller"
SUBJECT = "system:serviceaccount:shop:default"
CONFIG_MAP = "puller-chainguard-identity"

# A static identity created ten days ago with the default 720h/240h: renewal is due ten days from NOW.
CREATED = datetime.datetime(2026, 11, 13, 10, 0, tzinfo=UTC)
GOOD_EXPIRY = datetime.datetime(2026, 12, 13, 10, 0, tzinfo=UTC)
RENEW_AT = datetime.datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
GRACE = td(minutes=10)  # Settings.replacement_grace by default
LIFETIME = td(days=365)  # Settings.max_static_lifetime by default
VALID_FOR = td(hours=720)


def uidp(n: int, parent: str = ORG) -> str:
    return f"{parent}/{n:016x}"


CURRENT = uidp(1)
OLD = uidp(2)
SPARE = uidp(3)
OWN = uidp(9)  # the identity the operator authenticates as


# ---------------------------------------------------------------------------------------------------
# Building blocks


@pytest.fixture
def keys(ec_private_keys: tuple[ec.EllipticCurvePrivateKey, ...], public_jwk: Callable[..., Any]) -> KeySet:
    return parse_jwks({"keys": [public_jwk(ec_private_keys[0], "k1")]})


@pytest.fixture
def new_keys(
    ec_private_keys: tuple[ec.EllipticCurvePrivateKey, ...], public_jwk: Callable[..., Any]
) -> KeySet:
    """The cluster after a signing-key rotation: a new key next to the old one."""
    return parse_jwks({"keys": [public_jwk(ec_private_keys[0], "k1"), public_jwk(ec_private_keys[1], "k2")]})


def make_target(
    settings: Settings,
    keys: KeySet | None,
    *,
    discovered: str = PRIVATE_ISSUER,
    roles: Iterable[str] = ("registry.pull",),
    adopted: Identity | None = None,
    name: str | None = None,
    **spec: Any,
) -> Target:
    parsed = parse_spec("shop", "puller", {"parent": ORG, "roles": list(roles), **spec}, settings)
    return build_target(
        parsed,
        owner=OWNER,
        parent=ORG,
        issuer=discovered,
        keys=keys,
        settings=settings,
        role_ids={role: ROLE_IDS[role] for role in parsed.roles},
        adopted=adopted,
        name=name,
    )


@pytest.fixture
def static_target(settings: Settings, keys: KeySet) -> Target:
    return make_target(settings, keys)


@pytest.fixture
def claim_target(settings: Settings, keys: KeySet) -> Target:
    return make_target(settings, keys, discovered=PUBLIC_ISSUER)


@pytest.fixture(params=["static", "claim"])
def target(request: pytest.FixtureRequest, static_target: Target, claim_target: Target) -> Target:
    return static_target if request.param == "static" else claim_target


def body(
    target: Target, expires: datetime.datetime | None = GOOD_EXPIRY, now: datetime.datetime = NOW
) -> Identity:
    """The body of a write for ``target`` (``expires`` None: a fresh expiry from ``now``)."""
    return desired_identity(target, now, expires)


def shaped(
    target: Target,
    uid: str = CURRENT,
    expires: datetime.datetime | None = GOOD_EXPIRY,
    created: datetime.datetime | None = CREATED,
) -> Identity:
    """An identity exactly as ``target`` wants it (static ones expire at ``expires``)."""
    identity = dataclasses.replace(body(target, expires), uid=uid, create_time=created, update_time=created)
    if identity.static_keys is not None and expires is None:
        identity = with_static(identity, expiration_time=None)
    return identity


def bound(target: Target, identity: str = CURRENT) -> tuple[RoleBinding, ...]:
    return tuple(
        RoleBinding(uid=uidp(100 + index), identity_uid=identity, group_uid=target.parent, role_uid=role_id)
        for index, role_id in enumerate(target.role_ids.values())
    )


def converged(target: Target, identity: Identity | None = None, **changes: Any) -> Observed:
    """The snapshot of a resource with nothing left to do (changed by ``changes``)."""
    identity = identity or shaped(target)
    observed = Observed(
        identity=identity,
        bindings=bound(target, identity.uid),
        config_map=config_map_data(target, identity.uid),
    )
    return dataclasses.replace(observed, **changes)


def with_static(identity: Identity, **changes: Any) -> Identity:
    assert identity.static_keys is not None
    return dataclasses.replace(identity, static_keys=dataclasses.replace(identity.static_keys, **changes))


def test_reconcile_drives_this_decide_and_this_fold() -> None:
    # The loops below prove things about reconcile only if reconcile runs the very same functions.
    assert reconcile.decide is decide_module.decide
    assert reconcile.fold is decide_module.fold
    assert reconcile.forced_rotation is decide_module.forced_rotation


# ---------------------------------------------------------------------------------------------------
# Building the target: issuer reachability, mode, adoption


@pytest.mark.parametrize(
    ("issuer", "public"),
    [
        ("https://container.googleapis.com/v1/projects/p/locations/us-central1/clusters/c", True),  # GKE
        ("https://oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLED539D4633E53DE1B71EXAMPLE", True),  # EKS
        ("https://westeurope.oic.prod-aks.azure.com/00000000-0000-0000-0000-000000000000/1111/", True),  # AKS
        ("https://storage.googleapis.com/my-bucket/issuer", True),
        ("https://acct.blob.core.windows.net/oidc", True),
        ("https://kubernetes.default.svc", False),
        ("https://kubernetes.default.svc.cluster.local", False),
        ("https://KUBERNETES.default.svc.cluster.local:443", False),
        ("https://api.cluster.local", False),
        ("https://issuer.corp.internal", False),
        ("https://localhost:6443", False),
        ("https://127.0.0.1:6443", False),
        ("https://10.0.0.1", False),
        ("https://192.168.1.20:6443", False),
        ("https://172.16.5.4", False),
        ("https://100.64.0.1", False),  # carrier-grade NAT: not global
        ("https://169.254.169.254", False),
        ("https://[::1]:6443", False),
        ("https://[fd00::1]", False),
        ("https://8.8.8.8", False),  # a bare public IP has no certificate the STS would trust
        ("https://oidc.example.test", False),  # unknown hosts are not assumed reachable
        ("", False),
        ("not a url", False),
    ],
)
def test_issuer_is_public(settings: Settings, issuer: str, public: bool) -> None:
    assert issuer_is_public(issuer, settings) is public


@pytest.mark.parametrize(
    "issuer", [PRIVATE_ISSUER, PUBLIC_ISSUER, "https://10.0.0.1", "https://oidc.example.test"]
)
@pytest.mark.parametrize("override", [True, False])
def test_issuer_public_setting_overrides_both_ways(settings: Settings, issuer: str, override: bool) -> None:
    assert issuer_is_public(issuer, dataclasses.replace(settings, issuer_public=override)) is override


@pytest.mark.parametrize(
    ("issuer", "public"),
    [
        ("https://oidc.example.test", True),
        ("https://eu.oidc.example.test/cluster", True),
        ("https://notoidc.example.test", False),
        ("https://oidc.example.test.evil.test", False),
        ("https://other.example.test", False),
    ],
)
def test_public_issuer_hosts_setting(settings: Settings, issuer: str, public: bool) -> None:
    extended = dataclasses.replace(settings, public_issuer_hosts=("oidc.example.test",))
    assert issuer_is_public(issuer, extended) is public


def _spec(settings: Settings, mode: str) -> Any:
    return parse_spec("shop", "puller", {"parent": ORG, "mode": mode}, settings)


def _adoptable(kind: str, uid: str = CURRENT) -> Identity:
    if kind == "static":
        static = StaticKeys(issuer=PRIVATE_ISSUER, subject=SUBJECT, issuer_keys="{}", expiration_time=None)
        return Identity(uid=uid, name="hand-made", static_keys=static)
    return Identity(uid=uid, name="hand-made", claim_match=ClaimMatch(issuer=PUBLIC_ISSUER, subject=SUBJECT))


@pytest.mark.parametrize(
    ("mode", "issuer", "adopted", "expected"),
    [
        ("Auto", PUBLIC_ISSUER, None, Mode.CLAIM_MATCH),
        ("Auto", PRIVATE_ISSUER, None, Mode.STATIC),
        ("Static", PUBLIC_ISSUER, None, Mode.STATIC),
        ("ClaimMatch", PRIVATE_ISSUER, None, Mode.CLAIM_MATCH),
        ("Auto", PUBLIC_ISSUER, "static", Mode.STATIC),  # the adopted identity's kind wins under Auto
        ("Auto", PRIVATE_ISSUER, "claim", Mode.CLAIM_MATCH),
        ("ClaimMatch", PRIVATE_ISSUER, "static", Mode.CLAIM_MATCH),  # an explicit mode wins
        ("Static", PUBLIC_ISSUER, "claim", Mode.STATIC),
    ],
)
def test_resolve_mode(
    settings: Settings, mode: str, issuer: str, adopted: str | None, expected: Mode
) -> None:
    identity = _adoptable(adopted) if adopted else None
    assert resolve_mode(_spec(settings, mode), issuer, settings, identity) is expected


@pytest.mark.parametrize(("mode", "adopted"), [("ClaimMatch", "static"), ("Static", "claim")])
def test_adopting_an_identity_of_the_other_kind_is_refused(
    settings: Settings, keys: KeySet, mode: str, adopted: str
) -> None:
    with pytest.raises(SpecError) as caught:
        make_target(settings, keys, mode=mode, adopted=_adoptable(adopted))
    assert (caught.value.field, caught.value.reason) == ("spec.mode", "AdoptionRefused")


@pytest.mark.parametrize("other_kind", ["awsIdentity", "servicePrincipal", ""])
def test_adopting_a_non_oidc_identity_is_refused(settings: Settings, keys: KeySet, other_kind: str) -> None:
    aws = Identity(uid=CURRENT, name="ci", other_kind=other_kind)
    with pytest.raises(SpecError) as caught:
        make_target(settings, keys, adopted=aws)
    assert (caught.value.field, caught.value.reason) == ("spec.adopt", "AdoptionRefused")
    assert CURRENT in caught.value.message


def test_adopting_an_identity_outside_the_parent_is_refused(settings: Settings, keys: KeySet) -> None:
    # Possible with spec.parentName, which parse_spec cannot check; decide would otherwise "replace"
    # the adopted identity with a new one, silently ignoring spec.adopt.
    elsewhere = _adoptable("static", uid=uidp(1, OTHER_ORG))
    parsed = parse_spec("shop", "puller", {"parentName": "my-org", "adopt": elsewhere.uid}, settings)
    with pytest.raises(SpecError) as caught:
        build_target(
            parsed,
            owner=OWNER,
            parent=ORG,
            issuer=PRIVATE_ISSUER,
            keys=None,
            settings=settings,
            role_ids={"registry.pull": ROLE_IDS["registry.pull"]},
            adopted=elsewhere,
        )
    assert (caught.value.field, caught.value.reason) == ("spec.adopt", "AdoptionRefused")
    assert ORG in caught.value.message


def test_target_name_is_deterministic_unless_the_identity_in_use_has_its_own(
    settings: Settings, keys: KeySet
) -> None:
    adopted = _adoptable("static")
    assert make_target(settings, keys, adopted=adopted).name == NAME
    kept = make_target(settings, keys, discovered=PUBLIC_ISSUER, adopted=adopted, name="hand-made")
    assert (kept.name, kept.mode, kept.keys) == ("hand-made", Mode.STATIC, keys)
    assert kept.description == DESCRIPTION  # the marker names the adopter, whatever the name


def test_target_fields(settings: Settings, keys: KeySet) -> None:
    claim = make_target(settings, keys, discovered=PUBLIC_ISSUER, roles=("viewer", "registry.pull"))
    assert claim.keys is None  # the JWKS is only uploaded for static identities
    assert list(claim.role_ids) == ["viewer", "registry.pull"]
    assert (claim.parent, claim.name, claim.issuer, claim.subject, claim.audience) == (
        ORG,
        NAME,
        PUBLIC_ISSUER,
        SUBJECT,
        "issuer.enforce.dev",
    )
    assert claim.description == DESCRIPTION
    assert naming.parse_marker(claim.description) == OWNER  # the cluster ID is in the marker
    assert claim.config_map_name == CONFIG_MAP
    assert claim.max_lifetime == LIFETIME
    static = make_target(settings, keys, static={"validFor": "96h"})
    assert static.static == StaticSpec(valid_for=td(hours=96), renew_before=td(hours=32))
    assert static.keys == keys


def test_target_takes_issuer_description_config_map_and_lifetime_from_spec_and_settings(
    settings: Settings, keys: KeySet
) -> None:
    custom = dataclasses.replace(settings, max_static_lifetime=td(days=90))
    target = make_target(
        custom,
        keys,
        discovered=PRIVATE_ISSUER,  # overridden by spec.issuer
        mode="ClaimMatch",
        serviceAccountName="image-puller",
        issuer="https://oidc.example.test/c",
        description="pulls images",
        configMap={"name": "pull-config"},
    )
    assert (target.issuer, target.subject) == (
        "https://oidc.example.test/c",
        "system:serviceaccount:shop:image-puller",
    )
    assert target.description == f"{DESCRIPTION}; pulls images"
    assert target.config_map_name == "pull-config"
    assert target.max_lifetime == td(days=90)


def test_config_map_endpoints_come_from_settings_and_spec(settings: Settings, keys: KeySet) -> None:
    custom = dataclasses.replace(
        settings,
        api_url="http://127.0.0.1:9001",
        issuer_url="http://127.0.0.1:9002",
        registry="127.0.0.1:5000",
    )
    target = make_target(custom, keys, audience="sts.example.test")
    assert config_map_data(target, CURRENT) == {
        "CHAINGUARD_IDENTITY": CURRENT,
        "CHAINGUARD_ISSUER": "http://127.0.0.1:9002",
        "CHAINGUARD_API": "http://127.0.0.1:9001",
        "CHAINGUARD_AUDIENCE": "sts.example.test",
        "CHAINGUARD_REGISTRY": "127.0.0.1:5000",
    }


def test_a_static_body_needs_the_cluster_keys(settings: Settings) -> None:
    target = make_target(settings, None)
    with pytest.raises(ValueError, match="needs the cluster's keys"):
        desired_identity(target, NOW, None)


# ---------------------------------------------------------------------------------------------------
# 1. An identity being taken over is marked first


@pytest.mark.parametrize(
    ("description", "reason"),
    [
        ("", "adopt"),
        ("made by hand with chainctl", "adopt"),
        (ownership_marker(LEGACY_OWNER), "migrate"),  # from before cluster IDs
        (f"{ownership_marker(LEGACY_OWNER)}; pulls images", "migrate"),
    ],
)
def test_an_unmarked_or_legacy_identity_is_marked_first(
    target: Target, description: str, reason: str
) -> None:
    current = dataclasses.replace(shaped(target), description=description)
    action = decide(target, converged(target, current), NOW)
    # Only the description: the expiry is kept, nothing else is written with the marker.
    assert action == UpdateIdentity(uid=CURRENT, identity=body(target), mask=("description",), reason=reason)


def _unmarked_needing(case: str, static: Target, claim: Target, new_keys: KeySet) -> tuple[Target, Observed]:
    """A snapshot whose identity is not yet marked and also needs ``case``."""
    target = claim if case in ("claim-drift", "kind") else static
    current = shaped(target)
    changes: dict[str, Any] = {}
    if case == "kind":
        current = shaped(static)  # static identity, claim target
    elif case == "parent":
        current = shaped(target, uid=uidp(1, OTHER_ORG))
    elif case == "replace":
        changes["replace"] = "the API refused the new expiry"
    elif case == "past-lifetime":
        current = shaped(target, created=RENEW_AT - td(days=350))
    elif case == "forced":
        changes["force_rotation"] = True
    elif case == "claim-drift":
        current = dataclasses.replace(
            current, claim_match=ClaimMatch(issuer=PUBLIC_ISSUER, subject_pattern=".*")
        )
    elif case == "keys":
        current = with_static(current, issuer_keys=new_keys.document)
    elif case == "static-drift":
        current = with_static(current, issuer="https://old.example.test")
    elif case == "unwanted-binding":
        changes["bindings"] = (*bound(target), RoleBinding(uidp(60), CURRENT, ORG, OWNER_ROLE))
    elif case == "no-config-map":
        changes["config_map"] = None
    elif case == "retired":
        changes["retired"] = (shaped(target, uid=OLD),)
    current = dataclasses.replace(current, description="made by hand")
    return target, converged(target, current, **changes)


@pytest.mark.parametrize(
    "case",
    [
        "kind",
        "parent",
        "replace",
        "past-lifetime",
        "forced",
        "claim-drift",
        "keys",
        "static-drift",
        "unwanted-binding",
        "no-config-map",
        "retired",
    ],
)
def test_marking_comes_before_anything_else(
    static_target: Target, claim_target: Target, new_keys: KeySet, case: str
) -> None:
    target, observed = _unmarked_needing(case, static_target, claim_target, new_keys)
    now = RENEW_AT if case == "past-lifetime" else NOW
    action = decide(target, observed, now)
    assert observed.identity is not None
    assert isinstance(action, UpdateIdentity)
    assert (action.uid, action.mask, action.reason) == (observed.identity.uid, ("description",), "adopt")
    assert action.identity.description == target.description
    # Once marked, the other need is served.
    marked = dataclasses.replace(observed.identity, description=target.description)
    follow_up = decide(target, dataclasses.replace(observed, identity=marked), now)
    assert not (isinstance(follow_up, UpdateIdentity) and follow_up.mask == ("description",))
    assert not isinstance(follow_up, Done)


def test_a_marker_of_ours_with_other_text_is_description_drift_not_marking(target: Target) -> None:
    current = dataclasses.replace(shaped(target), description=f"{DESCRIPTION}; an older user text")
    action = decide(target, converged(target, current), NOW)
    assert action == UpdateIdentity(uid=CURRENT, identity=body(target), mask=("description",), reason="drift")


# ---------------------------------------------------------------------------------------------------
# 2. A usable identity must exist


def test_no_identity_creates_a_claim_match_identity(claim_target: Target) -> None:
    action = decide(claim_target, Observed(), NOW)
    assert action == CreateIdentity(
        parent=ORG,
        identity=Identity(
            uid="",
            name=NAME,
            description=DESCRIPTION,
            claim_match=ClaimMatch(issuer=PUBLIC_ISSUER, subject=SUBJECT, audience="issuer.enforce.dev"),
        ),
        replaces=None,
    )
    assert action.identity.to_wire() == {
        "name": NAME,
        "description": DESCRIPTION,
        "claimMatch": {"issuer": PUBLIC_ISSUER, "subject": SUBJECT, "audience": "issuer.enforce.dev"},
    }


def test_no_identity_creates_a_static_identity(static_target: Target, keys: KeySet) -> None:
    action = decide(static_target, Observed(), NOW)
    assert action == CreateIdentity(
        parent=ORG,
        identity=Identity(
            uid="",
            name=NAME,
            description=DESCRIPTION,
            static_keys=StaticKeys(
                issuer=PRIVATE_ISSUER,
                subject=SUBJECT,
                issuer_keys=keys.document,
                expiration_time=datetime.datetime(2026, 12, 23, 10, 0, tzinfo=UTC),  # now + 720h, whole s
                audience="issuer.enforce.dev",
            ),
        ),
    )
    wire = action.identity.to_wire()["staticKeys"]
    assert wire["expirationTime"] == "2026-12-23T10:00:00Z"
    assert wire["audiences"] == ["issuer.enforce.dev"]
    uploaded = json.loads(wire["issuerKeys"])["keys"]
    assert [sorted(key) for key in uploaded] == [["crv", "kid", "kty", "x", "y"]]  # public members only


def test_static_expiry_follows_valid_for_and_audience_follows_spec(settings: Settings, keys: KeySet) -> None:
    target = make_target(settings, keys, static={"validFor": "48h"}, audience="sts.example.test")
    action = decide(target, Observed(), NOW)
    assert isinstance(action, CreateIdentity)
    assert action.identity.static_keys is not None
    assert action.identity.static_keys.expiration_time == datetime.datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
    assert action.identity.to_wire()["staticKeys"]["audiences"] == ["sts.example.test"]


def _aws(target: Target) -> Identity:
    return Identity(uid=CURRENT, name=target.name, description=target.description, other_kind="awsIdentity")


@pytest.mark.parametrize(
    ("case", "target_kind"),
    [
        ("claim-for-static", "static"),
        ("static-for-claim", "claim"),
        ("aws-for-static", "static"),
        ("aws-for-claim", "claim"),
        ("other-parent", "static"),
        ("other-parent", "claim"),
        ("replace-requested", "static"),
        ("replace-requested", "claim"),
    ],
)
def test_unusable_identity_is_replaced(
    static_target: Target, claim_target: Target, case: str, target_kind: str
) -> None:
    target = static_target if target_kind == "static" else claim_target
    other = claim_target if target_kind == "static" else static_target
    current = {
        "claim-for-static": shaped(other),
        "static-for-claim": shaped(other),
        "aws-for-static": _aws(target),
        "aws-for-claim": _aws(target),
        "other-parent": shaped(target, uid=uidp(1, OTHER_ORG)),
        "replace-requested": shaped(target),
    }[case]
    replace = "the API set the expiry to nothing" if case == "replace-requested" else None
    observed = converged(target, current, replace=replace)
    action = decide(target, observed, NOW)
    # A replacement starts a fresh lifetime: the old expiry is not carried over.
    assert action == CreateIdentity(parent=ORG, identity=body(target, None), replaces=current.uid)


def test_replacement_comes_before_any_shape_update(static_target: Target, new_keys: KeySet) -> None:
    current = with_static(
        shaped(static_target), issuer="https://old.example.test", issuer_keys=new_keys.document
    )
    current = dataclasses.replace(current, description=f"{DESCRIPTION}; edited")
    observed = converged(static_target, current, replace="the API refused the new expiry: too long")
    assert decide(static_target, observed, RENEW_AT) == CreateIdentity(
        parent=ORG, identity=body(static_target, None, RENEW_AT), replaces=CURRENT
    )


def test_a_renewal_that_would_pass_the_maximum_lifetime_replaces_up_front(static_target: Target) -> None:
    # Created 340 days before the renewal time: a fresh 30 days would end 5 days past creation + 365 d.
    current = shaped(static_target, created=RENEW_AT - td(days=340))
    action = decide(static_target, converged(static_target, current), RENEW_AT)
    assert action == CreateIdentity(
        parent=ORG, identity=body(static_target, None, RENEW_AT), replaces=CURRENT
    )
    # Not even tried in place, although an in-place renewal is what the shape alone would ask for.
    assert shape_update(static_target, converged(static_target, current), RENEW_AT) is not None


@pytest.mark.parametrize(
    ("over", "replaced"),
    [(-td(days=1), False), (td(0), False), (td(seconds=1), True), (td(days=30), True)],
)
def test_the_lifetime_limit_is_creation_plus_max_lifetime(
    static_target: Target, over: td, replaced: bool
) -> None:
    fresh = RENEW_AT + VALID_FOR  # what a renewal at RENEW_AT asks for
    created = fresh - LIFETIME - over  # so that ``fresh`` is ``over`` past the limit
    current = shaped(static_target, created=created)
    assert lifetime_limit(static_target, current) == created + LIFETIME
    action = decide(static_target, converged(static_target, current), RENEW_AT)
    if replaced:
        assert isinstance(action, CreateIdentity)
        assert action.replaces == CURRENT
    else:
        assert isinstance(action, UpdateIdentity)
        assert (action.mask, action.reason) == (("static_keys.expiration_time",), "renewal")


def test_the_lifetime_check_is_made_only_when_a_renewal_is_wanted(static_target: Target) -> None:
    # 360 days old, but renewal is ten days away: nothing to do yet, and no early replacement.
    current = shaped(static_target, created=NOW - td(days=360))
    assert decide(static_target, converged(static_target, current), NOW) == Done(wake_at=RENEW_AT)


def test_a_forced_rotation_that_would_pass_the_lifetime_replaces_up_front(static_target: Target) -> None:
    current = shaped(static_target, created=NOW - td(days=340))  # NOW + 30 d is 5 days past the limit
    observed = converged(static_target, current, force_rotation=True)
    assert decide(static_target, observed, NOW) == CreateIdentity(
        parent=ORG, identity=body(static_target, None), replaces=CURRENT
    )


def test_an_identity_without_a_creation_time_renews_in_place(static_target: Target) -> None:
    current = shaped(static_target, created=None)
    assert lifetime_limit(static_target, current) is None
    action = decide(static_target, converged(static_target, current), RENEW_AT)
    assert isinstance(action, UpdateIdentity)
    assert action.reason == "renewal"


def test_the_lifetime_comes_from_the_target(settings: Settings, keys: KeySet) -> None:
    short = make_target(dataclasses.replace(settings, max_static_lifetime=td(days=45)), keys)
    # At RENEW_AT (20 days after creation) a fresh 30 days ends 50 days after creation.
    action = decide(short, converged(short), RENEW_AT)
    assert isinstance(action, CreateIdentity)
    assert action.replaces == CURRENT


def test_a_spare_is_taken_instead_of_creating(target: Target) -> None:
    assert decide(target, Observed(spares=(SPARE, OLD)), NOW) == TakeSpare(uid=SPARE, replaces=None)
    observed = converged(target, replace="the API refused the new expiry", spares=(SPARE,))
    assert decide(target, observed, NOW) == TakeSpare(uid=SPARE, replaces=CURRENT)


# ---------------------------------------------------------------------------------------------------
# 3. Its shape is corrected in place, one concern per write


@pytest.mark.parametrize(
    "claims",
    [
        ClaimMatch(issuer="https://old-issuer.example.test", subject=SUBJECT),
        ClaimMatch(issuer=PUBLIC_ISSUER, subject="system:serviceaccount:shop:other"),
        ClaimMatch(issuer=PUBLIC_ISSUER, subject="system:serviceaccount:other:default"),
        ClaimMatch(issuer=PUBLIC_ISSUER, subject=SUBJECT, audience="sts.example.test"),
        ClaimMatch(issuer_pattern=f"^{re.escape(PUBLIC_ISSUER)}$", subject=SUBJECT),
        ClaimMatch(issuer=PUBLIC_ISSUER, subject_pattern="system:serviceaccount:shop:.*"),
        ClaimMatch(issuer=PUBLIC_ISSUER, subject=SUBJECT, audience_pattern=".*"),
        ClaimMatch(issuer=PUBLIC_ISSUER, subject=SUBJECT, claims={"repository": "shop"}),
        ClaimMatch(issuer=PUBLIC_ISSUER, subject=SUBJECT, claim_patterns={"repository": ".*"}),
        # An exact value and a pattern side by side: the pattern still widens what is trusted.
        ClaimMatch(issuer=PUBLIC_ISSUER, subject=SUBJECT, subject_pattern=".*"),
    ],
    ids=[
        "issuer",
        "subject",
        "namespace",
        "audience",
        "issuer-pattern",
        "subject-pattern",
        "audience-pattern",
        "claims",
        "claim-patterns",
        "exact-and-pattern",
    ],
)
def test_claim_match_drift(claim_target: Target, claims: ClaimMatch) -> None:
    current = dataclasses.replace(shaped(claim_target), claim_match=claims)
    action = decide(claim_target, converged(claim_target, current), NOW)
    assert action == UpdateIdentity(
        uid=CURRENT, identity=body(claim_target), mask=("claim_match",), reason="drift"
    )


@pytest.mark.parametrize(
    ("wire", "drift"),
    [
        ({"issuer": PUBLIC_ISSUER, "subject": SUBJECT}, False),  # the default audience
        ({"issuer": PUBLIC_ISSUER, "subject": SUBJECT, "audience": ""}, False),
        ({"issuer": PUBLIC_ISSUER, "subject": SUBJECT, "claimPatterns": {"repo": ".*"}}, True),
        ({"issuer": PUBLIC_ISSUER, "subject": SUBJECT, "claim_patterns": {"repo": ".*"}}, True),
        ({"issuer": PUBLIC_ISSUER, "subjectPattern": ".*"}, True),
        ({"issuerPattern": ".*", "subject": SUBJECT}, True),
        ({"issuer": PUBLIC_ISSUER, "subject": SUBJECT, "audiencePattern": "issuer.*"}, True),
        ({"issuer": PUBLIC_ISSUER, "subject": SUBJECT, "claims": {"email": "x@example.test"}}, True),
    ],
)
def test_claim_match_drift_as_read_from_the_wire(
    claim_target: Target, wire: dict[str, Any], drift: bool
) -> None:
    current = dataclasses.replace(shaped(claim_target), claim_match=ClaimMatch.from_wire(wire))
    action = decide(claim_target, converged(claim_target, current), NOW)
    if drift:
        assert isinstance(action, UpdateIdentity)
        assert action.mask == ("claim_match",)
    else:
        assert action == Done(wake_at=None)


@pytest.mark.parametrize(
    "changes",
    [
        {"issuer": "https://old-issuer.example.test"},
        {"subject": "system:serviceaccount:shop:other"},
        {"audience": "sts.example.test"},
    ],
)
def test_static_issuer_subject_or_audience_drift_rewrites_static_keys(
    static_target: Target, changes: dict[str, str]
) -> None:
    current = with_static(shaped(static_target), **changes)
    action = decide(static_target, converged(static_target, current), NOW)
    # The whole static trust is written, with the expiry it already has.
    assert action == UpdateIdentity(
        uid=CURRENT, identity=body(static_target), mask=("static_keys",), reason="drift"
    )


def test_changed_cluster_keys_update_issuer_keys_only_and_keep_the_expiry(
    settings: Settings, keys: KeySet, new_keys: KeySet
) -> None:
    before = make_target(settings, keys)
    after = make_target(settings, new_keys)
    action = decide(after, converged(after, shaped(before)), NOW)
    assert isinstance(action, UpdateIdentity)
    assert (action.uid, action.mask, action.reason) == (CURRENT, ("static_keys.issuer_keys",), "keys-changed")
    assert not action.sets_expiry
    assert action.identity.static_keys == StaticKeys(
        issuer=PRIVATE_ISSUER,
        subject=SUBJECT,
        issuer_keys=new_keys.document,
        expiration_time=GOOD_EXPIRY,
        audience="issuer.enforce.dev",
    )


def test_changed_keys_and_a_due_renewal_are_two_writes_keys_first(
    settings: Settings, keys: KeySet, new_keys: KeySet
) -> None:
    # So a refused expiry never takes the key upload down with it.
    after = make_target(settings, new_keys)
    action = decide(after, converged(after, shaped(make_target(settings, keys))), RENEW_AT)
    assert isinstance(action, UpdateIdentity)
    assert (action.mask, action.reason) == (("static_keys.issuer_keys",), "keys-changed")
    assert action.identity.static_keys is not None
    assert action.identity.static_keys.expiration_time == GOOD_EXPIRY
    action = decide(after, converged(after, shaped(after)), RENEW_AT)
    assert isinstance(action, UpdateIdentity)
    assert (action.mask, action.reason) == (("static_keys.expiration_time",), "renewal")


def test_registered_keys_equal_in_substance_are_not_drift(static_target: Target, keys: KeySet) -> None:
    document = json.loads(keys.document)
    variants = [
        json.dumps(document, indent=2),
        json.dumps({"keys": [{**document["keys"][0], "x5c": ["MIIB"], "key_ops": ["verify"]}]}),
        json.dumps({"keys": [dict(reversed(list(document["keys"][0].items())))]}),
    ]
    for registered in variants:
        current = with_static(shaped(static_target), issuer_keys=registered)
        assert decide(static_target, converged(static_target, current), NOW) == Done(wake_at=RENEW_AT)


@pytest.mark.parametrize(
    "registered",
    ["", "not json", '{"keys": []}', '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'],
)
def test_unreadable_registered_keys_are_replaced(
    static_target: Target, keys: KeySet, registered: str
) -> None:
    current = with_static(shaped(static_target), issuer_keys=registered)
    action = decide(static_target, converged(static_target, current), NOW)
    assert isinstance(action, UpdateIdentity)
    assert (action.mask, action.reason) == (("static_keys.issuer_keys",), "keys-changed")
    assert action.identity.static_keys is not None
    assert action.identity.static_keys.issuer_keys == keys.document


@pytest.mark.parametrize(
    ("now", "renews"),
    [
        (RENEW_AT - td(seconds=1), False),
        (RENEW_AT, True),  # now >= expires - renewBefore
        (RENEW_AT + td(days=3, microseconds=999), True),
        (GOOD_EXPIRY + td(days=1), True),  # already expired: still renewed in place
    ],
)
def test_renewal_is_due_at_expiry_minus_renew_before(
    static_target: Target, now: datetime.datetime, renews: bool
) -> None:
    action = decide(static_target, converged(static_target), now)
    if not renews:
        assert action == Done(wake_at=RENEW_AT)
        return
    assert isinstance(action, UpdateIdentity)
    assert (action.uid, action.mask, action.reason) == (CURRENT, ("static_keys.expiration_time",), "renewal")
    assert action.sets_expiry
    assert action.identity == body(static_target, None, now)
    assert action.identity.static_keys is not None
    new_expiry = action.identity.static_keys.expiration_time
    assert new_expiry == (now + VALID_FOR).replace(microsecond=0)
    assert new_expiry is not None
    assert new_expiry.microsecond == 0


def test_missing_expiry_is_renewed(static_target: Target) -> None:
    current = shaped(static_target, expires=None)
    action = decide(static_target, converged(static_target, current), NOW)
    assert isinstance(action, UpdateIdentity)
    assert (action.mask, action.reason) == (("static_keys.expiration_time",), "renewal")
    assert action.identity.static_keys is not None
    assert action.identity.static_keys.expiration_time == datetime.datetime(2026, 12, 23, 10, 0, tzinfo=UTC)


def test_renew_before_comes_from_the_spec(settings: Settings, keys: KeySet) -> None:
    target = make_target(settings, keys, static={"validFor": "720h", "renewBefore": "24h"})
    observed = converged(target)
    assert decide(target, observed, NOW) == Done(wake_at=GOOD_EXPIRY - td(hours=24))
    assert renewal_due_at(GOOD_EXPIRY, target.static) == GOOD_EXPIRY - td(hours=24)
    assert isinstance(decide(target, observed, GOOD_EXPIRY - td(hours=24)), UpdateIdentity)


def test_forced_rotation_writes_keys_and_a_fresh_expiry_now(static_target: Target) -> None:
    action = decide(static_target, converged(static_target, force_rotation=True), NOW)
    assert action == UpdateIdentity(
        uid=CURRENT,
        identity=body(static_target, None),
        mask=("static_keys.issuer_keys", "static_keys.expiration_time"),
        reason="forced",
    )


def test_forced_rotation_waits_for_a_static_drift_write_first(static_target: Target) -> None:
    current = with_static(shaped(static_target), issuer="https://old-issuer.example.test")
    action = decide(static_target, converged(static_target, current, force_rotation=True), NOW)
    assert isinstance(action, UpdateIdentity)
    assert (action.mask, action.reason) == (("static_keys",), "drift")
    after = decide(static_target, converged(static_target, force_rotation=True), NOW)
    assert isinstance(after, UpdateIdentity)
    assert after.reason == "forced"


def test_forced_rotation_of_a_claim_match_identity_is_a_no_op(claim_target: Target) -> None:
    assert decide(claim_target, converged(claim_target, force_rotation=True), NOW) == Done(wake_at=None)


@pytest.mark.parametrize("kind", ["static", "claim"])
def test_description_drift_is_corrected_last(static_target: Target, claim_target: Target, kind: str) -> None:
    target = static_target if kind == "static" else claim_target
    current = dataclasses.replace(shaped(target), description=f"{DESCRIPTION}; edited by hand")
    if kind == "static":
        expected = (("static_keys.expiration_time",), "renewal")
        now = RENEW_AT
    else:
        current = dataclasses.replace(
            current, claim_match=ClaimMatch(issuer=PUBLIC_ISSUER, subject_pattern=".*")
        )
        expected = (("claim_match",), "drift")
        now = NOW
    action = decide(target, converged(target, current), now)
    assert isinstance(action, UpdateIdentity)
    assert (action.mask, action.reason) == expected
    assert action.identity.description == target.description  # the body is whole; the mask says what goes


# ---------------------------------------------------------------------------------------------------
# 4. Roles


@pytest.mark.parametrize(
    ("already", "expected"),
    [
        ((), "viewer"),
        (("viewer",), "registry.pull"),
        (("viewer", "apk.pull"), "registry.pull"),
        (("registry.pull", "apk.pull"), "viewer"),
        (("viewer", "registry.pull"), "apk.pull"),
    ],
)
def test_missing_roles_are_bound_in_spec_order(
    settings: Settings, keys: KeySet, already: tuple[str, ...], expected: str
) -> None:
    target = make_target(settings, keys, roles=("viewer", "registry.pull", "apk.pull"))
    bindings = tuple(
        RoleBinding(uid=uidp(200 + i), identity_uid=CURRENT, group_uid=ORG, role_uid=ROLE_IDS[role])
        for i, role in enumerate(already)
    )
    action = decide(target, converged(target, bindings=bindings), NOW)
    assert action == BindRole(parent=ORG, identity=CURRENT, role=expected, role_id=ROLE_IDS[expected])


def test_inherited_roles_are_bound_after_the_spec_roles(static_target: Target) -> None:
    observed = converged(static_target, bindings=(), inherited_roles=(OWNER_ROLE,))
    pull = ROLE_IDS["registry.pull"]
    assert decide(static_target, observed, NOW) == BindRole(ORG, CURRENT, "registry.pull", pull)
    observed = dataclasses.replace(observed, bindings=bound(static_target))
    assert decide(static_target, observed, NOW) == BindRole(ORG, CURRENT, OWNER_ROLE, OWNER_ROLE)
    with_owner = (*bound(static_target), RoleBinding(uidp(70), CURRENT, ORG, OWNER_ROLE))
    assert decide(static_target, dataclasses.replace(observed, bindings=with_owner), NOW) == Done(
        wake_at=RENEW_AT
    )


def test_an_inherited_role_the_spec_also_names_is_bound_once(static_target: Target) -> None:
    observed = converged(static_target, inherited_roles=(ROLE_IDS["registry.pull"],))
    assert decide(static_target, observed, NOW) == Done(wake_at=RENEW_AT)


def test_a_binding_in_another_group_does_not_count(static_target: Target) -> None:
    elsewhere = RoleBinding(uidp(7), CURRENT, OTHER_ORG, ROLE_IDS["registry.pull"])
    action = decide(static_target, converged(static_target, bindings=(elsewhere,)), NOW)
    assert action == BindRole(
        parent=ORG, identity=CURRENT, role="registry.pull", role_id=ROLE_IDS["registry.pull"]
    )


def test_unwanted_bindings_go_only_after_all_wanted_are_bound(settings: Settings, keys: KeySet) -> None:
    target = make_target(settings, keys, roles=("registry.pull", "apk.pull"))
    owner = RoleBinding(uidp(9), CURRENT, ORG, OWNER_ROLE)
    pull = RoleBinding(uidp(10), CURRENT, ORG, ROLE_IDS["registry.pull"])
    apk = RoleBinding(uidp(11), CURRENT, ORG, ROLE_IDS["apk.pull"])
    assert isinstance(decide(target, converged(target, bindings=(owner, pull)), NOW), BindRole)
    assert decide(target, converged(target, bindings=(owner, pull, apk)), NOW) == UnbindRole(binding=owner)


def test_a_duplicate_binding_of_a_wanted_role_is_removed_and_the_first_kept(static_target: Target) -> None:
    first = RoleBinding(uidp(10), CURRENT, ORG, ROLE_IDS["registry.pull"])
    second = RoleBinding(uidp(11), CURRENT, ORG, ROLE_IDS["registry.pull"])
    assert decide(static_target, converged(static_target, bindings=(first, second)), NOW) == UnbindRole(
        second
    )
    assert decide(static_target, converged(static_target, bindings=(second, first)), NOW) == UnbindRole(first)


def test_bindings_in_other_groups_are_left_alone(static_target: Target) -> None:
    foreign = RoleBinding(uidp(9), CURRENT, OTHER_ORG, OWNER_ROLE)
    observed = converged(static_target, bindings=(*bound(static_target), foreign))
    assert decide(static_target, observed, NOW) == Done(wake_at=RENEW_AT)


def test_the_operators_own_identity_never_loses_a_binding(static_target: Target) -> None:
    extra = (
        RoleBinding(uidp(9), CURRENT, ORG, OWNER_ROLE),  # unwanted
        RoleBinding(uidp(10), CURRENT, ORG, ROLE_IDS["registry.pull"]),  # a duplicate
    )
    observed = converged(
        static_target, bindings=(*bound(static_target), *extra), protected=frozenset({CURRENT})
    )
    assert decide(static_target, observed, NOW) == Done(wake_at=RENEW_AT)
    # Its missing roles are still bound.
    missing = dataclasses.replace(observed, bindings=extra[:1])
    assert isinstance(decide(static_target, missing, NOW), BindRole)
    # Another protected identity does not shield this one.
    other = dataclasses.replace(observed, protected=frozenset({OWN}))
    assert isinstance(decide(static_target, other, NOW), UnbindRole)


# ---------------------------------------------------------------------------------------------------
# 5. ConfigMap, stale ConfigMaps, retired identities, Done


EXPECTED_CONFIG_MAP = {
    "CHAINGUARD_IDENTITY": CURRENT,
    "CHAINGUARD_ISSUER": "https://issuer.enforce.dev",
    "CHAINGUARD_API": "https://console-api.enforce.dev",
    "CHAINGUARD_AUDIENCE": "issuer.enforce.dev",
    "CHAINGUARD_REGISTRY": "cgr.dev",
}


@pytest.mark.parametrize(
    "config_map",
    [
        None,
        {},
        {**EXPECTED_CONFIG_MAP, "CHAINGUARD_IDENTITY": OLD},
        {**EXPECTED_CONFIG_MAP, "CHAINGUARD_REGISTRY": "registry.example.test"},
        {**EXPECTED_CONFIG_MAP, "EXTRA": "x"},
        {key: value for key, value in EXPECTED_CONFIG_MAP.items() if key != "CHAINGUARD_AUDIENCE"},
    ],
)
def test_config_map_is_written_with_all_five_keys(static_target: Target, config_map: Any) -> None:
    action = decide(static_target, converged(static_target, config_map=config_map), NOW)
    assert action == WriteConfigMap(name=CONFIG_MAP, data=EXPECTED_CONFIG_MAP)


def test_config_map_is_written_under_the_spec_name(settings: Settings, keys: KeySet) -> None:
    target = make_target(settings, keys, configMap={"name": "pull-config"})
    assert decide(target, converged(target, config_map=None), NOW) == WriteConfigMap(
        name="pull-config", data=config_map_data(target, CURRENT)
    )


def test_config_map_is_written_only_after_every_role_is_bound(static_target: Target) -> None:
    observed = converged(static_target, bindings=(), config_map=None)
    assert isinstance(decide(static_target, observed, NOW), BindRole)


def test_stale_config_maps_go_after_the_new_one_is_written_and_before_retired_identities(
    static_target: Target,
) -> None:
    old = shaped(static_target, uid=OLD)
    observed = converged(
        static_target, config_map=None, stale_config_maps=("old-name", "older"), retired=(old,)
    )
    assert isinstance(decide(static_target, observed, NOW), WriteConfigMap)
    observed = dataclasses.replace(observed, config_map=config_map_data(static_target, CURRENT))
    assert decide(static_target, observed, NOW) == DeleteConfigMap(name="old-name")
    observed = dataclasses.replace(observed, stale_config_maps=("older",))
    assert decide(static_target, observed, NOW) == DeleteConfigMap(name="older")
    observed = dataclasses.replace(observed, stale_config_maps=())
    assert decide(static_target, observed, NOW) == DeleteIdentity(uid=OLD, bindings=(), reason="retired")


def test_retired_identity_goes_only_after_the_config_map_names_the_new_one(static_target: Target) -> None:
    old = shaped(static_target, uid=OLD)
    old_bindings = (
        RoleBinding(uidp(80), OLD, ORG, ROLE_IDS["registry.pull"]),
        RoleBinding(uidp(81), OLD, ORG, OWNER_ROLE),
    )
    for config_map in (None, config_map_data(static_target, OLD)):
        observed = converged(static_target, retired=(old,), config_map=config_map)
        assert isinstance(decide(static_target, observed, NOW), WriteConfigMap)
    observed = converged(static_target, retired=(old,), retired_bindings={OLD: old_bindings})
    # Its bindings go with it, so none is left behind.
    assert decide(static_target, observed, NOW) == DeleteIdentity(
        uid=OLD, bindings=(uidp(80), uidp(81)), reason="retired"
    )


def test_retired_identity_waits_for_its_grace_period(static_target: Target) -> None:
    old = shaped(static_target, uid=OLD)
    grace_ends = NOW + GRACE
    observed = converged(static_target, retired=(old,), retire_after={OLD: grace_ends})
    assert decide(static_target, observed, NOW) == Done(wake_at=grace_ends)
    assert decide(static_target, observed, grace_ends - td(microseconds=1)) == Done(wake_at=grace_ends)
    assert decide(static_target, observed, grace_ends) == DeleteIdentity(
        uid=OLD, bindings=(), reason="retired"
    )


def test_retired_identities_go_one_at_a_time_when_due(static_target: Target) -> None:
    older = shaped(static_target, uid=uidp(3))
    old = shaped(static_target, uid=OLD)
    observed = converged(
        static_target,
        retired=(old, older),
        retire_after={OLD: NOW + td(minutes=5), uidp(3): NOW - td(seconds=1)},
    )
    assert decide(static_target, observed, NOW) == DeleteIdentity(uid=uidp(3), bindings=(), reason="retired")


def test_the_current_identity_is_never_deleted(static_target: Target) -> None:
    current = shaped(static_target)
    old = shaped(static_target, uid=OLD)
    observed = converged(static_target, current, retired=(current, old), retire_after={})
    assert decide(static_target, observed, NOW) == DeleteIdentity(uid=OLD, bindings=(), reason="retired")
    observed = converged(static_target, current, retired=(current,), retire_after={CURRENT: NOW})
    assert decide(static_target, observed, NOW) == Done(wake_at=RENEW_AT)


def test_the_operators_own_identity_is_never_deleted(static_target: Target) -> None:
    own = shaped(static_target, uid=OWN)
    observed = converged(
        static_target, retired=(own,), retire_after={OWN: NOW - td(days=1)}, protected=frozenset({OWN})
    )
    # Not deleted, and not waited for either: it would otherwise wake the resource forever.
    assert decide(static_target, observed, NOW) == Done(wake_at=RENEW_AT)


@pytest.mark.parametrize(
    ("kind", "retire_in", "wake_at"),
    [
        ("static", None, RENEW_AT),
        ("claim", None, None),
        ("claim", GRACE, NOW + GRACE),
        ("static", GRACE, NOW + GRACE),  # the earlier of grace end and renewal
        ("static", td(days=30), RENEW_AT),
        ("claim", td(days=30), NOW + td(days=30)),
    ],
)
def test_done_wakes_at_the_next_scheduled_change(
    static_target: Target, claim_target: Target, kind: str, retire_in: td | None, wake_at: Any
) -> None:
    target = static_target if kind == "static" else claim_target
    observed = converged(target)
    if retire_in is not None:
        old = shaped(target, uid=OLD)
        observed = dataclasses.replace(observed, retired=(old,), retire_after={OLD: NOW + retire_in})
    assert decide(target, observed, NOW) == Done(wake_at=wake_at)


def test_done_wakes_at_the_earliest_of_several_retirements(claim_target: Target) -> None:
    retired = (shaped(claim_target, uid=OLD), shaped(claim_target, uid=SPARE))
    observed = converged(
        claim_target, retired=retired, retire_after={OLD: NOW + td(hours=2), SPARE: NOW + td(hours=1)}
    )
    assert decide(claim_target, observed, NOW) == Done(wake_at=NOW + td(hours=1))


# ---------------------------------------------------------------------------------------------------
# forced_rotation: what the rotate annotation asks of a pass


@pytest.mark.parametrize(
    ("asked", "done", "pending", "updated_at", "expected"),
    [
        (None, None, None, "t0", Rotation.NONE),
        (None, "r1", ("r1", "t0"), "t1", Rotation.NONE),
        ("r1", "r1", None, "t0", Rotation.NONE),  # acted on already
        ("r1", "r1", ("r1", "t0"), "t1", Rotation.NONE),
        ("r2", None, None, "", Rotation.DUE),
        ("r2", "r1", None, "t0", Rotation.DUE),
        (
            "r2",
            "r1",
            ("r2", "t0"),
            "t0",
            Rotation.DUE,
        ),  # recorded, but the identity did not change: not written
        (
            "r2",
            "r1",
            ("r2", "t0"),
            "t1",
            Rotation.WRITTEN,
        ),  # the identity changed since: written, crash after
        ("r2", "r1", ("r2", ""), "t1", Rotation.WRITTEN),
        ("r2", "r1", ("r1", "t0"), "t1", Rotation.DUE),  # a checkpoint of another request says nothing
    ],
)
def test_forced_rotation_truth_table(
    asked: str | None, done: str | None, pending: tuple[str, str] | None, updated_at: str, expected: Rotation
) -> None:
    assert (
        forced_rotation(request=asked, done=done, pending=pending, identity_updated_at=updated_at) is expected
    )


# ---------------------------------------------------------------------------------------------------
# fold: the snapshot after each result


def _bindings(identity: str, *roles: str, start: int = 400) -> tuple[RoleBinding, ...]:
    return tuple(RoleBinding(uidp(start + i), identity, ORG, role) for i, role in enumerate(roles))


def test_fold_created_switches_to_the_new_identity_and_retires_the_replaced_one(
    static_target: Target,
) -> None:
    later = shaped(static_target, uid=uidp(5))
    old_bindings = _bindings(CURRENT, ROLE_IDS["registry.pull"], OWNER_ROLE)
    before = converged(
        static_target,
        bindings=old_bindings,
        retired=(later,),
        retire_after={later.uid: NOW + td(minutes=3)},
        replace="the API refused the new expiry: no",
        force_rotation=True,
    )
    action = CreateIdentity(parent=ORG, identity=body(static_target, None), replaces=CURRENT)
    new = dataclasses.replace(action.identity, uid=uidp(6), create_time=NOW)
    after = fold(before, action, Created(new), NOW, GRACE)
    assert after.identity == new
    assert after.bindings == ()
    assert [i.uid for i in after.retired] == [later.uid, CURRENT]
    assert after.retire_after == {later.uid: NOW + td(minutes=3), CURRENT: NOW + GRACE}
    assert after.retired_bindings[CURRENT] == old_bindings  # so its deletion removes them too
    assert after.replace is None
    assert after.force_rotation is False  # a new identity is a rotation
    assert after.config_map == before.config_map  # still names the old one until written


def test_fold_created_without_a_replaced_identity(claim_target: Target) -> None:
    action = CreateIdentity(parent=ORG, identity=body(claim_target, None), replaces=None)
    new = dataclasses.replace(action.identity, uid=uidp(6))
    after = fold(Observed(), action, Created(new), NOW, GRACE)
    assert after == Observed(identity=new)


def test_fold_created_retires_only_the_identity_it_replaces(claim_target: Target) -> None:
    # A stale ``replaces`` (not the identity in the snapshot) retires nothing it does not name.
    action = CreateIdentity(parent=ORG, identity=body(claim_target, None), replaces=OLD)
    new = dataclasses.replace(action.identity, uid=uidp(6))
    after = fold(converged(claim_target), action, Created(new), NOW, GRACE)
    assert (after.identity, after.retired, after.retire_after) == (new, (), {})


def test_fold_taken_uses_the_spare_with_its_bindings(static_target: Target) -> None:
    spare = shaped(static_target, uid=SPARE)
    spare_bindings = _bindings(SPARE, ROLE_IDS["registry.pull"], start=500)
    old_bindings = _bindings(CURRENT, ROLE_IDS["registry.pull"])
    before = converged(
        static_target,
        bindings=old_bindings,
        retired=(spare,),
        spares=(SPARE,),
        retire_after={SPARE: NOW + GRACE},
        retired_bindings={SPARE: spare_bindings},
        replace="the API set the expiry to nothing instead of 2027",
    )
    action = TakeSpare(uid=SPARE, replaces=CURRENT)
    after = fold(before, action, Taken(), NOW + td(minutes=1), GRACE)
    assert after.identity == spare
    assert after.bindings == spare_bindings
    assert [i.uid for i in after.retired] == [CURRENT]
    assert after.retire_after == {CURRENT: NOW + td(minutes=1) + GRACE}
    assert after.retired_bindings == {CURRENT: old_bindings}
    assert after.spares == ()
    assert after.replace is None


def test_fold_updated_takes_the_returned_identity(static_target: Target) -> None:
    action = decide(static_target, converged(static_target), RENEW_AT)
    assert isinstance(action, UpdateIdentity)
    returned = dataclasses.replace(action.identity, uid=CURRENT, create_time=CREATED, update_time=RENEW_AT)
    after = fold(converged(static_target), action, Updated(returned), RENEW_AT, GRACE)
    assert after.identity == returned
    assert after.replace is None


@pytest.mark.parametrize(
    ("short_by", "replaced"),
    [(td(0), False), (td(seconds=1), False), (td(seconds=2), True), (td(days=5), True), (None, True)],
)
@pytest.mark.parametrize("reason", ["renewal", "forced"])
def test_fold_updated_with_a_clamped_expiry_asks_for_a_replacement(
    static_target: Target, short_by: td | None, replaced: bool, reason: str
) -> None:
    before = converged(static_target, force_rotation=reason == "forced")
    action = decide(static_target, before, RENEW_AT if reason == "renewal" else NOW)
    assert isinstance(action, UpdateIdentity)
    assert action.reason == reason
    assert action.identity.static_keys is not None
    asked = action.identity.static_keys.expiration_time
    assert asked is not None
    got = None if short_by is None else asked - short_by
    returned = with_static(dataclasses.replace(action.identity, uid=CURRENT), expiration_time=got)
    after = fold(before, action, Updated(returned), NOW, GRACE)
    assert after.identity == returned
    if replaced:
        assert after.replace is not None
        assert asked.isoformat() in after.replace
        assert (got.isoformat() if got else "nothing") in after.replace
        # Not renewed: a forced rotation is still owed (the replacement pays it).
        assert after.force_rotation is (reason == "forced")
    else:
        assert after.replace is None
        assert after.force_rotation is False


def test_fold_updated_with_an_expiry_later_than_asked_is_accepted(static_target: Target) -> None:
    action = decide(static_target, converged(static_target), RENEW_AT)
    assert isinstance(action, UpdateIdentity)
    returned = with_static(
        dataclasses.replace(action.identity, uid=CURRENT), expiration_time=GOOD_EXPIRY + td(days=60)
    )
    assert fold(converged(static_target), action, Updated(returned), RENEW_AT, GRACE).replace is None


def test_fold_updated_drops_a_static_identity_returned_without_keys_as_clamped(static_target: Target) -> None:
    action = decide(static_target, converged(static_target), RENEW_AT)
    assert isinstance(action, UpdateIdentity)
    returned = dataclasses.replace(action.identity, uid=CURRENT, static_keys=None)
    assert fold(converged(static_target), action, Updated(returned), RENEW_AT, GRACE).replace is not None


@pytest.mark.parametrize(
    ("mask", "reason"),
    [
        (("description",), "adopt"),
        (("description",), "drift"),
        (("static_keys.issuer_keys",), "keys-changed"),
        (("static_keys",), "drift"),
    ],
)
def test_fold_updated_other_writes_leave_a_forced_rotation_owed(
    static_target: Target, mask: tuple[str, ...], reason: str
) -> None:
    before = converged(static_target, force_rotation=True)
    action = UpdateIdentity(uid=CURRENT, identity=body(static_target), mask=mask, reason=reason)
    returned = shaped(static_target)
    after = fold(before, action, Updated(returned), NOW, GRACE)
    assert after.force_rotation is True
    assert after.replace is None


def test_fold_refused_asks_for_a_replacement_and_keeps_the_identity(static_target: Target) -> None:
    before = converged(static_target)
    action = decide(static_target, before, RENEW_AT)
    assert isinstance(action, UpdateIdentity)
    after = fold(
        before, action, Refused("expiration_time must be within 365 days of creation"), RENEW_AT, GRACE
    )
    assert after.identity == before.identity
    assert after.replace is not None
    assert "expiration_time must be within 365 days of creation" in after.replace
    assert decide(static_target, after, RENEW_AT) == CreateIdentity(
        parent=ORG, identity=body(static_target, None, RENEW_AT), replaces=CURRENT
    )


def test_fold_bound_unbound_written_and_deleted(static_target: Target) -> None:
    pull = RoleBinding(uidp(10), CURRENT, ORG, ROLE_IDS["registry.pull"])
    owner = RoleBinding(uidp(11), CURRENT, ORG, OWNER_ROLE)
    before = converged(static_target, bindings=(owner,), config_map=None, stale_config_maps=("a", "b"))

    after = fold(before, BindRole(ORG, CURRENT, "registry.pull", pull.role_uid), Bound(pull), NOW, GRACE)
    assert after.bindings == (owner, pull)

    after = fold(after, UnbindRole(owner), Removed(), NOW, GRACE)
    assert after.bindings == (pull,)

    data = config_map_data(static_target, CURRENT)
    after = fold(after, WriteConfigMap(CONFIG_MAP, data), Written(), NOW, GRACE)
    assert after.config_map == data

    after = fold(after, DeleteConfigMap("a"), Removed(), NOW, GRACE)
    assert after.stale_config_maps == ("b",)

    old = shaped(static_target, uid=OLD)
    with_old = dataclasses.replace(after, retired=(old,), retire_after={OLD: NOW})
    after = fold(with_old, DeleteIdentity(OLD, (), "retired"), Removed(), NOW, GRACE)
    assert after.retired == ()
    assert after.identity == before.identity


def test_fold_deleted_identity_leaves_no_trace_in_the_snapshot(static_target: Target) -> None:
    spare = shaped(static_target, uid=SPARE)
    before = converged(
        static_target,
        retired=(spare,),
        spares=(SPARE,),
        retire_after={SPARE: NOW},
        retired_bindings={SPARE: _bindings(SPARE, OWNER_ROLE)},
    )
    after = fold(before, DeleteIdentity(SPARE, (uidp(400),), "retired"), Removed(), NOW, GRACE)
    assert after.retired == ()
    assert SPARE not in after.spares
    assert SPARE not in after.retire_after
    assert SPARE not in after.retired_bindings


def _sample_actions(target: Target) -> dict[str, Action]:
    return {
        "create": CreateIdentity(ORG, body(target, None)),
        "take": TakeSpare(SPARE),
        "update": UpdateIdentity(CURRENT, body(target), ("description",), "drift"),
        "delete": DeleteIdentity(OLD, (), "retired"),
        "bind": BindRole(ORG, CURRENT, "registry.pull", ROLE_IDS["registry.pull"]),
        "unbind": UnbindRole(bound(target)[0]),
        "write": WriteConfigMap(CONFIG_MAP, config_map_data(target, CURRENT)),
        "delete-config-map": DeleteConfigMap("old"),
        "done": Done(None),
    }


def _sample_results(target: Target) -> dict[str, Result]:
    return {
        "created": Created(shaped(target, uid=uidp(6))),
        "taken": Taken(),
        "updated": Updated(dataclasses.replace(shaped(target), description="changed")),
        "refused": Refused("no"),
        "bound": Bound(RoleBinding(uidp(12), CURRENT, ORG, ROLE_IDS["registry.pull"])),
        "written": Written(),
        "removed": Removed(),
    }


VALID_PAIRS = {
    ("create", "created"),
    ("take", "taken"),
    ("update", "updated"),
    ("update", "refused"),
    ("delete", "removed"),
    ("bind", "bound"),
    ("unbind", "removed"),
    ("write", "written"),
    ("delete-config-map", "removed"),
}
ALL_PAIRS = [
    (action, result)
    for action in (
        "create",
        "take",
        "update",
        "delete",
        "bind",
        "unbind",
        "write",
        "delete-config-map",
        "done",
    )
    for result in ("created", "taken", "updated", "refused", "bound", "written", "removed")
]


@pytest.mark.parametrize(("action", "result"), ALL_PAIRS)
def test_fold_accepts_exactly_the_results_each_action_can_have(
    static_target: Target, action: str, result: str
) -> None:
    spare = shaped(static_target, uid=SPARE)
    before = converged(
        static_target,
        retired=(spare, shaped(static_target, uid=OLD)),
        spares=(SPARE,),
        config_map=None,
        stale_config_maps=("old",),
    )
    performed = _sample_actions(static_target)[action]
    came_to = _sample_results(static_target)[result]
    if (action, result) in VALID_PAIRS:
        assert fold(before, performed, came_to, NOW, GRACE) != before
    else:
        with pytest.raises(
            ValueError, match=f"{type(came_to).__name__} is not a result of {type(performed).__name__}"
        ):
            fold(before, performed, came_to, NOW, GRACE)


# ---------------------------------------------------------------------------------------------------
# The in-memory world: Chainguard's side only


NAME_RULE = re.compile(r"^[a-z0-9._-]{3,63}$")
ONE_CONCERN = {
    ("description",),
    ("claim_match",),
    ("static_keys",),
    ("static_keys.issuer_keys",),
    ("static_keys.expiration_time",),
}
FORCED_MASK = ("static_keys.issuer_keys", "static_keys.expiration_time")


def apply_mask(current: Identity, body: Identity, mask: tuple[str, ...]) -> Identity:
    """What the server does with a PATCH and an updateMask: only the named paths change."""
    result = current
    for path in mask:
        if path == "description":
            result = dataclasses.replace(result, description=body.description)
        elif path == "claim_match":
            assert body.claim_match is not None
            result = dataclasses.replace(result, claim_match=body.claim_match)
        elif path == "static_keys":
            assert body.static_keys is not None
            result = dataclasses.replace(result, static_keys=body.static_keys)
        elif path in ("static_keys.issuer_keys", "static_keys.expiration_time"):
            assert result.static_keys is not None, f"{path} on an identity without static keys"
            assert body.static_keys is not None
            member = path.split(".", 1)[1]
            result = with_static(result, **{member: getattr(body.static_keys, member)})
        else:
            raise AssertionError(f"unknown update mask path {path!r}")
    return result


@dataclasses.dataclass
class World:
    """Chainguard and the cluster, as far as one resource is concerned: only what the APIs do.

    ``max_lifetime`` is the strict reading of the v2 API (an expiry at most that long after creation;
    None: the lenient one), and ``past_limit`` what an update past it gets: refused (the reconcile turns
    the 400 into ``Refused``) or clamped to the limit.
    """

    now: datetime.datetime
    identities: dict[str, Identity] = dataclasses.field(default_factory=dict)
    bindings: dict[str, RoleBinding] = dataclasses.field(default_factory=dict)
    config_maps: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    max_lifetime: td | None = LIFETIME
    past_limit: str = "refuse"
    grace: td = GRACE  # the operator's replacement_grace, which fold and policy.select are given
    next_id: int = 0x1000
    ticks: int = 0
    calls: list[Action] = dataclasses.field(default_factory=list)
    asked_past_limit: int = 0
    orphaned: list[RoleBinding] = dataclasses.field(default_factory=list)

    def new_uid(self, parent: str) -> str:
        self.next_id += 1
        return uidp(self.next_id, parent)

    def tick(self) -> datetime.datetime:
        self.ticks += 1
        return self.now + td(microseconds=self.ticks % 1000)

    def put(self, identity: Identity, *roles: str, group: str = ORG) -> Identity:
        self.identities[identity.uid] = identity
        for role in roles:
            self.bind(identity.uid, role, group)
        return identity

    def bind(self, identity: str, role: str, group: str = ORG) -> RoleBinding:
        binding = RoleBinding(self.new_uid(group), identity, group, role)
        self.bindings[binding.uid] = binding
        return binding

    def bindings_of(self, identity: str) -> tuple[RoleBinding, ...]:
        return tuple(
            sorted((b for b in self.bindings.values() if b.identity_uid == identity), key=lambda b: b.uid)
        )

    def drop(self, uid: str) -> None:
        """Someone deletes an identity (the server removes its bindings with it)."""
        self.identities.pop(uid, None)
        for binding in self.bindings_of(uid):
            del self.bindings[binding.uid]

    def _limit(self, identity: Identity) -> datetime.datetime | None:
        if self.max_lifetime is None or identity.create_time is None:
            return None
        return identity.create_time + self.max_lifetime

    def perform(self, action: Action) -> Result:
        self.calls.append(action)
        match action:
            case CreateIdentity():
                new = action.identity
                assert new.uid == "", "the server makes the UID"
                assert (new.claim_match is None) != (new.static_keys is None), "exactly one kind"
                assert NAME_RULE.fullmatch(new.name)
                assert len(new.description) <= 512
                assert not set(new.description) & set("\n\t")
                created = dataclasses.replace(
                    new, uid=self.new_uid(action.parent), create_time=self.now, update_time=self.tick()
                )
                limit = self._limit(created)
                if limit is not None and created.static_keys is not None:
                    expiry = created.static_keys.expiration_time
                    assert expiry is not None, "the operator always sends an explicit expiry"
                    assert expiry <= limit, "asked the API to create an identity past its maximum lifetime"
                self.identities[created.uid] = created
                return Created(created)
            case TakeSpare():
                assert action.uid in self.identities, "took a spare that does not exist"
                return Taken()
            case UpdateIdentity():
                stored = self.identities[action.uid]
                updated = apply_mask(stored, action.identity, action.mask)
                limit = self._limit(stored)
                static = updated.static_keys
                expiry = static.expiration_time if static is not None else None
                if action.sets_expiry and limit is not None and expiry is not None and expiry > limit:
                    self.asked_past_limit += 1
                    if self.past_limit == "refuse":
                        return Refused("expiration_time must be at most 365 days after creation")
                    updated = with_static(updated, expiration_time=limit)
                updated = dataclasses.replace(updated, update_time=self.tick())
                self.identities[action.uid] = updated
                return Updated(updated)
            case BindRole():
                assert action.identity in self.identities, "bound a role to an identity that does not exist"
                return Bound(self.bind(action.identity, action.role_id, action.parent))
            case UnbindRole():
                self.bindings.pop(action.binding.uid, None)  # idempotent, as AIP-135 says
                return Removed()
            case WriteConfigMap():
                self.config_maps[action.name] = dict(action.data)
                return Written()
            case DeleteConfigMap():
                self.config_maps.pop(action.name, None)
                return Removed()
            case DeleteIdentity():
                for binding in action.bindings:
                    self.bindings.pop(binding, None)
                self.orphaned += [b for b in self.bindings.values() if b.identity_uid == action.uid]
                self.identities.pop(action.uid, None)
                return Removed()
        raise AssertionError(f"unexpected action {action!r}")


@dataclasses.dataclass
class Memory:
    """What status keeps between passes, as ``reconcile.next_status`` writes it."""

    identity_id: str | None = None
    retiring: dict[str, datetime.datetime] = dataclasses.field(default_factory=dict)
    config_map_name: str | None = None
    inherited_roles: tuple[str, ...] = ()

    def remember(self, target: Target, observed: Observed, now: datetime.datetime) -> None:
        if observed.identity is not None:
            self.identity_id = observed.identity.uid
        self.retiring = {old.uid: observed.retire_after.get(old.uid, now) for old in observed.retired}
        if observed.config_map is not None:
            self.config_map_name = target.config_map_name
        self.inherited_roles = observed.inherited_roles


def observe(
    world: World,
    target: Target,
    memory: Memory,
    *,
    protected: frozenset[str] = frozenset(),
    force: bool = False,
    adopted: Identity | None = None,
) -> Observed:
    """The snapshot a pass starts from, chosen by the production ``policy.select`` as reconcile does."""
    recorded = world.identities.get(memory.identity_id) if memory.identity_id else None
    config_map = world.config_maps.get(target.config_map_name)
    selection = policy.select(
        owner=OWNER,
        listed=[i for i in world.identities.values() if i.parent == target.parent],
        recorded=recorded,
        recorded_retiring=memory.retiring,
        retiring_found=[world.identities[uid] for uid in memory.retiring if uid in world.identities],
        config_map_identity=config_map.get("CHAINGUARD_IDENTITY") if config_map else None,
        names={NAME, target.name, *([recorded.name] if recorded else [])},
        wanted_static=target.mode is Mode.STATIC,
        now=world.now,
        grace=world.grace,
        adopted=adopted,
        # The world's identities were all made for this cluster: the evidence check (policy.
        # legacy_evidence, tested in test_policy.py) would pass for a legacy one.
        legacy_ok=lambda _identity: True,
    )
    current = selection.current
    stale = ()
    if memory.config_map_name and memory.config_map_name != target.config_map_name:
        stale = (memory.config_map_name,)
    return Observed(
        identity=current,
        bindings=world.bindings_of(current.uid) if current is not None else (),
        config_map=dict(config_map) if config_map is not None else None,
        stale_config_maps=stale,
        retired=selection.retired,
        spares=selection.spares,
        retired_bindings={old.uid: world.bindings_of(old.uid) for old in selection.retired},
        retire_after=dict(selection.retire_after),
        force_rotation=force and target.mode is Mode.STATIC,
        inherited_roles=memory.inherited_roles,
        protected=protected,
    )


def wanted_roles(target: Target, observed: Observed) -> set[str]:
    return {*target.role_ids.values(), *observed.inherited_roles}


def marked(target: Target, identity: Identity | None) -> bool:
    return identity is not None and naming.parse_marker(identity.description) == naming.parse_marker(
        target.description
    )


def check_safe(world: World, target: Target, observed: Observed, action: Action) -> None:
    """The rules no action may break, whatever the snapshot."""
    current = observed.identity
    published = world.config_maps.get(target.config_map_name)
    match action:
        case UpdateIdentity(reason="adopt" | "migrate"):
            assert action.mask == ("description",), "marking wrote more than the marker"
        case UpdateIdentity():
            assert current is not None
            assert marked(target, current), f"{action.reason} before the identity was marked"
            allowed = ONE_CONCERN | ({FORCED_MASK} if action.reason == "forced" else set())
            assert action.mask in allowed, f"more than one concern in one write: {action.mask}"
            if action.reason in ("renewal", "forced"):
                # Never asks for more than the lifetime allows: such a renewal is a replacement up front.
                assert action.identity.static_keys is not None
                asked = action.identity.static_keys.expiration_time
                limit = lifetime_limit(target, current)
                assert asked is not None
                assert limit is None or asked <= limit, "asked for an expiry past the maximum lifetime"
        case CreateIdentity() | TakeSpare():
            assert current is None or marked(target, current), "replaced before the identity was marked"
        case BindRole():
            assert marked(target, current)
        case UnbindRole():
            assert current is not None
            assert action.binding.identity_uid not in observed.protected, (
                "unbound the operator's own identity"
            )
            in_parent = [b.role_uid for b in observed.bindings if b.group_uid == target.parent]
            assert wanted_roles(target, observed) <= set(in_parent), (
                "unbound before every wanted role was bound"
            )
            if action.binding.role_uid in wanted_roles(target, observed):
                assert in_parent.count(action.binding.role_uid) >= 2, (
                    "removed the only binding of a wanted role"
                )
        case WriteConfigMap():
            assert current is not None
            assert action.name == target.config_map_name
            assert action.data == config_map_data(target, current.uid)
        case DeleteConfigMap():
            assert current is not None
            assert published == config_map_data(target, current.uid), (
                "deleted an old ConfigMap before publishing"
            )
        case DeleteIdentity():
            assert current is not None
            assert action.uid not in observed.protected, "deleted the identity the operator authenticates as"
            assert action.uid != current.uid, "deleted the identity in use"
            assert published == config_map_data(target, current.uid), (
                "deleted before publishing its successor"
            )
            assert not observed.stale_config_maps, "deleted an identity before the stale ConfigMaps"
            due = observed.retire_after.get(action.uid)
            assert due is None or world.now >= due, "deleted inside the grace period"
            assert naming.parse_marker(world.identities[action.uid].description) == OWNER, "deleted another's"
            assert set(action.bindings) == {b.uid for b in world.bindings_of(action.uid)}, (
                "left bindings behind"
            )


def label(action: Action, result: Result | None = None) -> str:
    refused = " (refused)" if isinstance(result, Refused) else ""
    match action:
        case CreateIdentity(replaces=None):
            return "create"
        case CreateIdentity():
            return f"replace {action.replaces}"
        case TakeSpare():
            return f"take {action.uid}" + (f" for {action.replaces}" if action.replaces else "")
        case UpdateIdentity():
            return f"update {action.reason} {','.join(action.mask)}{refused}"
        case BindRole():
            return f"bind {ROLE_NAMES.get(action.role_id, action.role)}"
        case UnbindRole():
            return f"unbind {ROLE_NAMES[action.binding.role_uid]}"
        case WriteConfigMap():
            return f"write {action.name}"
        case DeleteConfigMap():
            return f"delete configmap {action.name}"
        case DeleteIdentity():
            return f"delete {action.uid}"
    raise AssertionError(action)


def run_pass(world: World, target: Target, observed: Observed) -> tuple[list[str], Observed, Done]:
    """decide → perform → fold … until Done, within the bound reconcile enforces."""
    labels: list[str] = []
    for _ in range(reconcile.MAX_STEPS):
        action = decide(target, observed, world.now)
        if isinstance(action, Done):
            return labels, observed, action
        check_safe(world, target, observed, action)
        result = world.perform(action)
        observed = fold(observed, action, result, world.now, world.grace)
        labels.append(label(action, result))
    pytest.fail(f"no Done after {reconcile.MAX_STEPS} steps: {labels}")


def assert_matches_world(world: World, target: Target, memory: Memory, folded: Observed) -> None:
    """What fold says the pass left is what the APIs hold."""
    again = observe(world, target, memory, protected=folded.protected)
    assert again.identity == folded.identity
    assert sorted(again.bindings, key=lambda b: b.uid) == sorted(folded.bindings, key=lambda b: b.uid)
    assert again.config_map == folded.config_map
    assert sorted(i.uid for i in again.retired) == sorted(i.uid for i in folded.retired)
    assert not world.orphaned, "a deleted identity left role bindings behind"


def reconcile_pass(
    world: World,
    target: Target,
    memory: Memory,
    *,
    protected: frozenset[str] = frozenset(),
    force: bool = False,
    adopted: Identity | None = None,
) -> tuple[list[str], Observed, Done]:
    """One reconcile pass: observe, run to Done, remember (status), and check fold against the world."""
    observed = observe(world, target, memory, protected=protected, force=force, adopted=adopted)
    labels, folded, done = run_pass(world, target, observed)
    memory.remember(target, folded, world.now)
    assert_matches_world(world, target, memory, folded)
    if force and target.mode is Mode.STATIC:
        assert not folded.force_rotation, "a forced rotation was asked for and not done"
    return labels, folded, done


def owned(world: World) -> dict[str, Identity]:
    return {uid: i for uid, i in world.identities.items() if naming.parse_marker(i.description) == OWNER}


def assert_converged(world: World, target: Target, folded: Observed) -> None:
    """The end state is what the spec asks for."""
    identity = folded.identity
    assert identity is not None
    assert world.identities[identity.uid] == identity
    assert identity.parent == target.parent
    assert (identity.name, identity.description) == (target.name, target.description)
    if target.mode is Mode.CLAIM_MATCH:
        assert identity.claim_match == ClaimMatch(target.issuer, target.subject, target.audience)
        assert identity.static_keys is None
    else:
        static = identity.static_keys
        assert static is not None
        assert target.keys is not None
        assert (static.issuer, static.subject, static.audience) == (
            target.issuer,
            target.subject,
            target.audience,
        )
        assert parse_jwks(static.issuer_keys).fingerprint == target.keys.fingerprint
        assert static.expiration_time is not None
        assert world.now < renewal_due_at(static.expiration_time, target.static)
    roles = collections.Counter(
        b.role_uid for b in world.bindings_of(identity.uid) if b.group_uid == target.parent
    )
    wanted = wanted_roles(target, folded)
    if identity.uid in folded.protected:
        assert wanted <= set(roles)
    else:
        assert roles == dict.fromkeys(wanted, 1), "every wanted role bound exactly once, nothing else"
    assert world.config_maps[target.config_map_name] == config_map_data(target, identity.uid)
    for name in folded.stale_config_maps:
        assert name not in world.config_maps
    for uid in owned(world):
        if uid != identity.uid:
            assert uid in folded.protected or world.now < folded.retire_after[uid], (
                f"{uid} outlived its grace"
            )


def settle(
    world: World, target: Target, memory: Memory, *, protected: frozenset[str] = frozenset()
) -> tuple[list[str], Observed]:
    """Let every grace period pass: afterwards only the current (and the protected) identity remain."""
    world.now += world.grace + td(seconds=1)
    labels, folded, _ = reconcile_pass(world, target, memory, protected=protected)
    assert_converged(world, target, folded)
    assert folded.identity is not None
    assert set(owned(world)) <= {folded.identity.uid, *protected}
    # Idempotence: another pass at the same moment has nothing to do.
    assert reconcile_pass(world, target, memory, protected=protected)[0] == []
    return labels, folded


# ---------------------------------------------------------------------------------------------------
# Whole loops


def test_loop_claim_match_from_nothing(settings: Settings, keys: KeySet) -> None:
    target = make_target(settings, keys, discovered=PUBLIC_ISSUER, roles=("registry.pull", "apk.pull"))
    world, memory = World(NOW), Memory()
    labels, folded, done = reconcile_pass(world, target, memory)
    assert labels == ["create", "bind registry.pull", "bind apk.pull", f"write {CONFIG_MAP}"]
    assert done == Done(wake_at=None)
    assert_converged(world, target, folded)
    settle(world, target, memory)


def test_loop_static_lifecycle(settings: Settings, keys: KeySet, new_keys: KeySet) -> None:
    target = make_target(settings, keys)
    world, memory = World(NOW), Memory()
    labels, folded, done = reconcile_pass(world, target, memory)
    assert labels == ["create", "bind registry.pull", f"write {CONFIG_MAP}"]
    first_renewal = datetime.datetime(2026, 12, 13, 10, 0, tzinfo=UTC)  # expiry 12-23 minus 240h
    assert done == Done(wake_at=first_renewal)
    assert_converged(world, target, folded)
    uid = memory.identity_id

    # The cluster rotates its signing keys: one in-place write, the expiry kept.
    world.now += td(days=1)
    target = make_target(settings, new_keys)
    labels, folded, done = reconcile_pass(world, target, memory)
    assert labels == ["update keys-changed static_keys.issuer_keys"]
    assert done == Done(wake_at=first_renewal)

    # Woken at the renewal time: one in-place write, a fresh expiry.
    world.now = first_renewal
    labels, folded, done = reconcile_pass(world, target, memory)
    assert labels == ["update renewal static_keys.expiration_time"]
    assert done == Done(wake_at=first_renewal + td(hours=720) - td(hours=240))
    assert_converged(world, target, folded)
    assert memory.identity_id == uid  # the same identity all along
    assert world.asked_past_limit == 0


def test_loop_every_concern_is_its_own_write_in_the_documented_order(
    settings: Settings, keys: KeySet, new_keys: KeySet
) -> None:
    target = make_target(settings, new_keys)
    stale = with_static(shaped(make_target(settings, keys)), subject="system:serviceaccount:shop:old")
    world, memory = World(RENEW_AT), Memory(identity_id=CURRENT)
    world.put(dataclasses.replace(stale, description="made by hand"), ROLE_IDS["registry.pull"])
    labels, folded, _ = reconcile_pass(world, target, memory, adopted=world.identities[CURRENT])
    assert labels == [
        "update adopt description",
        "update drift static_keys",  # the whole static trust, with the keys it should have
        "update renewal static_keys.expiration_time",
        f"write {CONFIG_MAP}",
    ]
    assert_converged(world, target, folded)

    # Keys, renewal and description, without the static drift: each its own write, in that order.
    assert folded.identity is not None
    world.now = RENEW_AT + td(days=1)
    edited = with_static(folded.identity, issuer_keys=keys.document, expiration_time=GOOD_EXPIRY)
    world.put(dataclasses.replace(edited, description=f"{DESCRIPTION}; edited"))
    labels, folded, _ = reconcile_pass(world, target, memory)
    assert labels == [
        "update keys-changed static_keys.issuer_keys",
        "update renewal static_keys.expiration_time",
        "update drift description",
    ]
    assert_converged(world, target, folded)


def test_loop_rotation_by_replacement_when_the_api_refuses(settings: Settings, keys: KeySet) -> None:
    # The operator believes in 365 days; this API allows 40 days from creation and refuses more.
    target = make_target(settings, keys, roles=("registry.pull", "viewer"))
    world, memory = World(RENEW_AT, max_lifetime=td(days=40)), Memory(identity_id=CURRENT)
    world.put(shaped(target), *target.role_ids.values())
    world.config_maps[CONFIG_MAP] = config_map_data(target, CURRENT)
    labels, folded, done = reconcile_pass(world, target, memory)
    new = folded.identity
    assert new is not None
    assert labels == [
        "update renewal static_keys.expiration_time (refused)",
        f"replace {CURRENT}",
        "bind registry.pull",
        "bind viewer",
        f"write {CONFIG_MAP}",
    ]
    # The old identity outlives the switch by the grace period, so mounted ConfigMaps can catch up.
    assert [old.uid for old in folded.retired] == [CURRENT]
    assert done == Done(wake_at=RENEW_AT + GRACE)
    assert_converged(world, target, folded)
    labels, folded = settle(world, target, memory)
    assert labels == [f"delete {CURRENT}"]
    assert folded.identity == new


def test_loop_rotation_by_replacement_when_the_api_clamps(settings: Settings, keys: KeySet) -> None:
    target = make_target(settings, keys)
    world, memory = World(RENEW_AT, max_lifetime=td(days=40), past_limit="clamp"), Memory(identity_id=CURRENT)
    world.put(shaped(target), ROLE_IDS["registry.pull"])
    world.config_maps[CONFIG_MAP] = config_map_data(target, CURRENT)
    labels, folded, _ = reconcile_pass(world, target, memory)
    assert labels == [
        "update renewal static_keys.expiration_time",  # answered with an earlier expiry than asked
        f"replace {CURRENT}",
        "bind registry.pull",
        f"write {CONFIG_MAP}",
    ]
    assert world.asked_past_limit == 1
    assert_converged(world, target, folded)
    settle(world, target, memory)


def test_loop_issuer_becomes_private(settings: Settings, keys: KeySet) -> None:
    claim = make_target(settings, keys, discovered=PUBLIC_ISSUER)
    static = make_target(settings, keys, discovered=PRIVATE_ISSUER)
    world, memory = World(NOW), Memory(identity_id=CURRENT, config_map_name=CONFIG_MAP)
    world.put(shaped(claim), ROLE_IDS["registry.pull"])
    world.config_maps[CONFIG_MAP] = config_map_data(claim, CURRENT)
    labels, _folded, _ = reconcile_pass(world, static, memory)
    assert labels == [f"replace {CURRENT}", "bind registry.pull", f"write {CONFIG_MAP}"]
    labels, _ = settle(world, static, memory)
    assert labels == [f"delete {CURRENT}"]


def test_loop_without_a_grace_period_the_replaced_identity_goes_in_the_same_pass(
    settings: Settings, keys: KeySet
) -> None:
    claim = make_target(settings, keys, discovered=PUBLIC_ISSUER, roles=("registry.pull", "viewer"))
    static = make_target(settings, keys, discovered=PRIVATE_ISSUER, roles=("registry.pull", "viewer"))
    world, memory = World(NOW, grace=td(0)), Memory(identity_id=CURRENT, config_map_name=CONFIG_MAP)
    world.put(shaped(claim), *claim.role_ids.values(), OWNER_ROLE)
    world.config_maps[CONFIG_MAP] = config_map_data(claim, CURRENT)
    labels, folded, _ = reconcile_pass(world, static, memory)
    # Its bindings were known from before the switch (fold keeps them): all deleted with it.
    assert labels == [
        f"replace {CURRENT}",
        "bind registry.pull",
        "bind viewer",
        f"write {CONFIG_MAP}",
        f"delete {CURRENT}",
    ]
    deleted = world.calls[-1]
    assert isinstance(deleted, DeleteIdentity)
    assert len(deleted.bindings) == 3
    assert_converged(world, static, folded)


def test_loop_a_forced_rotation_paid_by_a_replacement_is_not_written_again(
    settings: Settings, keys: KeySet
) -> None:
    target = make_target(settings, keys)
    world, memory = World(NOW), Memory(identity_id=CURRENT, config_map_name=CONFIG_MAP)
    world.put(shaped(target, created=NOW - td(days=340)), ROLE_IDS["registry.pull"])  # near its end
    world.config_maps[CONFIG_MAP] = config_map_data(target, CURRENT)
    labels, _, _ = reconcile_pass(world, target, memory, force=True)
    assert labels == [f"replace {CURRENT}", "bind registry.pull", f"write {CONFIG_MAP}"]
    assert [c for c in world.calls if isinstance(c, UpdateIdentity)] == []


def test_loop_adopting_a_hand_made_identity_keeps_its_owner_role(settings: Settings, keys: KeySet) -> None:
    hand_made = Identity(
        uid=CURRENT,
        name="ci-puller",
        description="created with chainctl",
        claim_match=ClaimMatch(issuer_pattern=f"^{re.escape(PUBLIC_ISSUER)}$", subject=SUBJECT),
        create_time=CREATED,
    )
    world = World(NOW)
    world.put(hand_made, OWNER_ROLE, ROLE_IDS["apk.pull"])
    world.bind(CURRENT, OWNER_ROLE, OTHER_ORG)  # another organization: not ours to judge
    wanted = set(ROLE_IDS[r] for r in ("registry.pull", "viewer"))
    inherited = policy.inherited_roles(world.bindings_of(CURRENT), ORG, wanted=wanted)
    assert inherited == tuple(sorted({OWNER_ROLE, ROLE_IDS["apk.pull"]}))
    memory = Memory(inherited_roles=(OWNER_ROLE,))  # say the admin kept only owner
    adopting = make_target(
        settings,
        keys,
        discovered=PUBLIC_ISSUER,
        roles=("registry.pull", "viewer"),
        adopted=hand_made,
        name="ci-puller",
    )
    labels, folded, done = reconcile_pass(world, adopting, memory, adopted=hand_made)
    assert labels == [
        "update adopt description",
        "update drift claim_match",
        "bind registry.pull",
        "bind viewer",
        "unbind apk.pull",
        f"write {CONFIG_MAP}",
    ]
    assert done == Done(wake_at=None)
    assert_converged(world, adopting, folded)
    assert folded.identity is not None
    assert folded.identity.name == "ci-puller"
    assert any(b.group_uid == OTHER_ORG for b in world.bindings_of(CURRENT))
    # Later passes know it as theirs, and keep the same name.
    later = make_target(
        settings, keys, discovered=PUBLIC_ISSUER, roles=("registry.pull", "viewer"), name="ci-puller"
    )
    settle(world, later, memory)


def test_loop_the_operators_own_identity_is_replaced_but_never_deleted_or_unbound(
    settings: Settings, keys: KeySet
) -> None:
    # The operator's own static identity, adopted with owner, reaches the end of its lifetime.
    own = shaped(make_target(settings, keys), uid=OWN, created=RENEW_AT - td(days=340))
    world = World(RENEW_AT)
    world.put(
        dataclasses.replace(own, description=DESCRIPTION),
        OWNER_ROLE,
        ROLE_IDS["registry.pull"],
        ROLE_IDS["viewer"],
    )
    world.config_maps[CONFIG_MAP] = {"CHAINGUARD_IDENTITY": OWN}
    target = make_target(settings, keys)
    memory = Memory(identity_id=OWN, inherited_roles=(OWNER_ROLE,))
    protected = frozenset({OWN})
    before = set(world.bindings_of(OWN))
    labels, _folded, _ = reconcile_pass(world, target, memory, protected=protected)
    assert labels == [f"replace {OWN}", "bind registry.pull", "bind owner", f"write {CONFIG_MAP}"]
    for _ in range(3):
        settle(world, target, memory, protected=protected)
    assert OWN in world.identities
    assert set(world.bindings_of(OWN)) == before


def test_loop_a_lost_create_answer_is_used_as_the_replacement(settings: Settings, keys: KeySet) -> None:
    target = make_target(settings, keys)
    world, memory = World(RENEW_AT), Memory(identity_id=CURRENT, config_map_name=CONFIG_MAP)
    world.put(shaped(target, created=RENEW_AT - td(days=345)), ROLE_IDS["registry.pull"])
    world.config_maps[CONFIG_MAP] = config_map_data(target, CURRENT)
    # The previous pass created the replacement, but its answer was lost: never recorded or published.
    world.put(shaped(target, uid=SPARE, created=RENEW_AT - td(minutes=1), expires=RENEW_AT + td(days=29)))
    labels, _folded, _ = reconcile_pass(world, target, memory)
    assert labels == [f"take {SPARE} for {CURRENT}", "bind registry.pull", f"write {CONFIG_MAP}"]
    assert [c for c in world.calls if isinstance(c, CreateIdentity)] == []
    labels, _ = settle(world, target, memory)
    assert labels == [f"delete {CURRENT}"]


def test_loop_duplicates_are_deleted_after_the_grace_period(settings: Settings, keys: KeySet) -> None:
    target = make_target(settings, keys, discovered=PUBLIC_ISSUER)
    world, memory = World(NOW), Memory(identity_id=CURRENT, config_map_name=CONFIG_MAP)
    world.put(shaped(target), ROLE_IDS["registry.pull"])
    world.put(shaped(target, uid=OLD, created=CREATED + td(hours=1)), ROLE_IDS["registry.pull"])
    world.put(shaped(target, uid=SPARE, created=CREATED - td(hours=1)))
    world.config_maps[CONFIG_MAP] = config_map_data(target, CURRENT)
    labels, folded, done = reconcile_pass(world, target, memory)
    assert labels == []  # nothing is deleted inside the grace period
    assert done == Done(wake_at=NOW + GRACE)
    assert {i.uid for i in folded.retired} == {OLD, SPARE}
    labels, _ = settle(world, target, memory)
    assert sorted(labels) == sorted([f"delete {OLD}", f"delete {SPARE}"])


def test_loop_half_replaced_with_a_recorded_successor(settings: Settings, keys: KeySet) -> None:
    # A crash after status recorded the successor but before it was bound and published.
    target = make_target(settings, keys)
    world = World(NOW)
    world.put(shaped(target, uid=OLD), ROLE_IDS["registry.pull"])
    world.put(shaped(target, uid=CURRENT, created=NOW - td(minutes=2), expires=NOW + td(days=30)))
    world.config_maps[CONFIG_MAP] = config_map_data(target, OLD)
    memory = Memory(identity_id=CURRENT, retiring={OLD: NOW + td(minutes=5)}, config_map_name=CONFIG_MAP)
    labels, _folded, done = reconcile_pass(world, target, memory)
    assert labels == ["bind registry.pull", f"write {CONFIG_MAP}"]
    assert done.wake_at == NOW + td(minutes=5)  # the recorded grace is kept, not restarted
    labels, _ = settle(world, target, memory)
    assert labels == [f"delete {OLD}"]


def test_loop_a_renamed_config_map_is_written_before_the_old_one_goes(
    settings: Settings, keys: KeySet
) -> None:
    target = make_target(settings, keys, configMap={"name": "pull-config"})
    world, memory = World(NOW), Memory(identity_id=CURRENT, config_map_name=CONFIG_MAP)
    world.put(shaped(target), ROLE_IDS["registry.pull"])
    world.config_maps[CONFIG_MAP] = config_map_data(target, CURRENT)
    labels, _folded, _ = reconcile_pass(world, target, memory)
    assert labels == ["write pull-config", f"delete configmap {CONFIG_MAP}"]
    assert set(world.config_maps) == {"pull-config"}
    assert memory.config_map_name == "pull-config"
    assert reconcile_pass(world, target, memory)[0] == []


def test_loop_legacy_marker_is_migrated_in_place(settings: Settings, keys: KeySet) -> None:
    target = make_target(settings, keys)
    world, memory = World(NOW), Memory(identity_id=CURRENT, config_map_name=CONFIG_MAP)
    world.put(
        dataclasses.replace(shaped(target), description=ownership_marker(LEGACY_OWNER)),
        ROLE_IDS["registry.pull"],
    )
    world.config_maps[CONFIG_MAP] = config_map_data(target, CURRENT)
    labels, folded, _ = reconcile_pass(world, target, memory)
    assert labels == ["update migrate description"]
    assert_converged(world, target, folded)


def test_loop_forced_rotation_is_one_write(settings: Settings, keys: KeySet) -> None:
    target = make_target(settings, keys)
    world, memory = World(NOW), Memory(identity_id=CURRENT, config_map_name=CONFIG_MAP)
    world.put(shaped(target), ROLE_IDS["registry.pull"])
    world.config_maps[CONFIG_MAP] = config_map_data(target, CURRENT)
    labels, _folded, done = reconcile_pass(world, target, memory, force=True)
    assert labels == ["update forced static_keys.issuer_keys,static_keys.expiration_time"]
    assert done == Done(wake_at=(NOW + td(hours=720)).replace(microsecond=0) - td(hours=240))
    assert reconcile_pass(world, target, memory)[0] == []


# Starting states a crash, an outside edit, an old operator version or time could leave behind.
def _start(
    case: str, settings: Settings, keys: KeySet, new_keys: KeySet
) -> tuple[World, Memory, Target, dict[str, Any]]:
    static = make_target(settings, keys, roles=("registry.pull", "viewer"))
    claim = make_target(settings, keys, discovered=PUBLIC_ISSUER, roles=("registry.pull",))
    world, memory, extra = World(NOW), Memory(identity_id=CURRENT, config_map_name=CONFIG_MAP), {}
    target = static
    pull, viewer = ROLE_IDS["registry.pull"], ROLE_IDS["viewer"]

    def publish(uid: str = CURRENT) -> None:
        world.config_maps[CONFIG_MAP] = config_map_data(target, uid)

    if case == "fresh":
        memory = Memory()
    elif case == "drifted-claim":
        target = claim
        current = dataclasses.replace(
            shaped(claim),
            description=f"{DESCRIPTION}; edited",
            claim_match=ClaimMatch(issuer=PUBLIC_ISSUER, subject_pattern=".*", claims={"x": "y"}),
        )
        world.put(current, OWNER_ROLE, viewer, viewer)
        world.config_maps[CONFIG_MAP] = {"CHAINGUARD_IDENTITY": OLD}
    elif case == "drifted-static":
        world.put(
            with_static(shaped(static), issuer="https://old.example.test", audience="x"),
            pull,
            pull,
            OWNER_ROLE,
        )
    elif case == "half-replaced":
        world.put(shaped(static, created=NOW - td(days=350), expires=NOW + td(days=2)), pull, viewer)
        world.put(shaped(static, uid=SPARE, created=NOW - td(minutes=1), expires=NOW + td(days=30)))
        publish()
    elif case == "duplicates":
        world.put(shaped(static), pull, viewer)
        world.put(shaped(static, uid=OLD, created=CREATED + td(hours=1)), pull)
        world.put(shaped(static, uid=SPARE, created=CREATED + td(hours=2)))
        world.put(
            dataclasses.replace(shaped(static, uid=uidp(4)), name="prod.shop.other"), viewer
        )  # ours, renamed
        publish()
    elif case == "expired":
        world.put(shaped(static, expires=NOW - td(days=3), created=NOW - td(days=33)), pull, viewer)
        publish()
    elif case == "keys-rotated":
        target = make_target(settings, new_keys, roles=("registry.pull", "viewer"))
        world.put(shaped(static), pull, viewer)
        publish()
    elif case == "forced":
        world.put(shaped(static), pull, viewer)
        publish()
        extra["force"] = True
    elif case == "adopted-owner":
        hand_made = Identity(
            uid=CURRENT,
            name="ci-puller",
            claim_match=ClaimMatch(issuer=PUBLIC_ISSUER, subject=SUBJECT),
            create_time=CREATED,
        )
        world.put(hand_made, OWNER_ROLE, viewer)
        memory = Memory(inherited_roles=(OWNER_ROLE,))
        target = make_target(settings, keys, discovered=PUBLIC_ISSUER, adopted=hand_made, name="ci-puller")
        extra["adopted"] = hand_made
        extra["later"] = make_target(settings, keys, discovered=PUBLIC_ISSUER, name="ci-puller")
    elif case == "adopted-own":
        own = dataclasses.replace(
            shaped(static, uid=OWN, created=NOW - td(days=340), expires=NOW + td(days=5)), description=""
        )
        world.put(own, OWNER_ROLE, ROLE_IDS["apk.pull"])
        memory = Memory(inherited_roles=(OWNER_ROLE,))
        extra["adopted"] = world.identities[OWN]
        extra["protected"] = frozenset({OWN})
    elif case == "past-max-lifetime":
        world.put(shaped(static, created=NOW - td(days=400), expires=NOW + td(days=2)), pull, viewer)
        publish()
    elif case == "legacy":
        world.put(dataclasses.replace(shaped(static), description=ownership_marker(LEGACY_OWNER)), pull)
        publish()
    elif case == "stale-config-map":
        world.put(shaped(static), pull, viewer)
        world.config_maps["old-name"] = config_map_data(static, CURRENT)
        memory.config_map_name = "old-name"
    elif case == "other-parent":
        world.put(shaped(static, uid=uidp(1, OTHER_ORG)), pull, viewer, group=OTHER_ORG)
        memory.identity_id = uidp(1, OTHER_ORG)
        publish(uidp(1, OTHER_ORG))
    elif case == "deleted-behind-our-back":
        publish()  # status and ConfigMap name an identity that no longer exists
    elif case == "refusing-api":
        world.now = RENEW_AT
        world.max_lifetime = td(days=40)
        world.put(shaped(static), pull, viewer)
        publish()
    elif case == "clamping-api":
        world.now = RENEW_AT
        world.max_lifetime, world.past_limit = td(days=40), "clamp"
        world.put(shaped(static), pull, viewer)
        publish()
    elif case == "protected-drifted":
        world.put(shaped(static), pull, OWNER_ROLE, pull)
        publish()
        extra["protected"] = frozenset({CURRENT})
    else:
        raise AssertionError(case)
    return world, memory, target, extra


START_CASES = [
    "fresh",
    "drifted-claim",
    "drifted-static",
    "half-replaced",
    "duplicates",
    "expired",
    "keys-rotated",
    "forced",
    "adopted-owner",
    "adopted-own",
    "past-max-lifetime",
    "legacy",
    "stale-config-map",
    "other-parent",
    "deleted-behind-our-back",
    "refusing-api",
    "clamping-api",
    "protected-drifted",
]


@pytest.mark.parametrize("case", START_CASES)
def test_loop_converges_from(settings: Settings, keys: KeySet, new_keys: KeySet, case: str) -> None:
    world, memory, target, extra = _start(case, settings, keys, new_keys)
    protected = extra.get("protected", frozenset())
    protected_bindings = {uid: set(world.bindings_of(uid)) for uid in protected}
    _labels, folded, _ = reconcile_pass(
        world,
        target,
        memory,
        protected=protected,
        force=extra.get("force", False),
        adopted=extra.get("adopted"),
    )
    assert_converged(world, target, folded)
    target = extra.get("later", target)
    settle(world, target, memory, protected=protected)
    for uid, bindings in protected_bindings.items():
        assert uid in world.identities
        assert set(world.bindings_of(uid)) >= bindings


# ---------------------------------------------------------------------------------------------------
# The strict lifetime, end to end over three years


def run_until(
    world: World, target: Target, memory: Memory, end: datetime.datetime
) -> list[tuple[datetime.datetime, list[str]]]:
    """Wake the resource whenever Done asks to be woken, until ``end``; what every pass did."""
    passes = []
    while world.now <= end:
        labels, folded, done = reconcile_pass(world, target, memory)
        assert_converged(world, target, folded)
        passes.append((world.now, labels))
        assert done.wake_at is not None
        assert done.wake_at > world.now
        world.now = done.wake_at
    return passes


@pytest.mark.parametrize(
    ("operator_lifetime", "api", "asked_past_limit"),
    [
        (LIFETIME, {"max_lifetime": LIFETIME}, 0),  # strict API: replaced up front, never asked
        (LIFETIME, {"max_lifetime": None}, 0),  # lenient API: the operator keeps to the limit anyway
        # An operator that believes in 400 days learns the limit from the API, once per lifetime.
        (td(days=400), {"max_lifetime": LIFETIME, "past_limit": "refuse"}, 3),
        (td(days=400), {"max_lifetime": LIFETIME, "past_limit": "clamp"}, 3),
    ],
)
def test_strict_lifetime_renews_in_place_then_replaces_once_per_lifetime(
    settings: Settings, keys: KeySet, operator_lifetime: td, api: dict[str, Any], asked_past_limit: int
) -> None:
    target = make_target(dataclasses.replace(settings, max_static_lifetime=operator_lifetime), keys)
    world, memory = World(NOW, **api), Memory()
    end = NOW + 3 * LIFETIME
    passes = run_until(world, target, memory, end)

    # Renewals every validFor - renewBefore = 20 days; the 17th would end 370 days after creation,
    # so each identity is replaced at its 17th renewal time: 340 days after its creation.
    step = VALID_FOR - td(hours=240)
    renewals_per_lifetime = next(k for k in range(1, 100) if k * step + VALID_FOR > LIFETIME) - 1
    assert renewals_per_lifetime == 16
    lifetime = (renewals_per_lifetime + 1) * step
    assert lifetime == td(days=340)

    creations = [c for c in world.calls if isinstance(c, CreateIdentity)]
    assert len(creations) == math.ceil((end - NOW) / lifetime) == 4
    assert len(world.identities) == 1  # every replaced identity was deleted after its grace period
    assert world.asked_past_limit == asked_past_limit
    # Each identity renews in place 16 times, then is replaced exactly once, then the successor renews.
    updates: collections.Counter[str] = collections.Counter(
        c.uid for c in world.calls if isinstance(c, UpdateIdentity) and c.reason == "renewal"
    )
    replaced = [c.replaces for c in creations if c.replaces]
    assert len(set(replaced)) == len(replaced) == 3  # each identity is replaced exactly once
    refused_or_clamped = 1 if asked_past_limit else 0
    assert all(updates[uid] == renewals_per_lifetime + refused_or_clamped for uid in replaced)
    (last,) = world.identities
    assert updates[last] == 3  # the successor renews in place again
    kinds = collections.Counter(
        "renewal" if labels == ["update renewal static_keys.expiration_time"] else labels[0].split(" ")[0]
        for _, labels in passes
        if labels
    )
    assert kinds["renewal"] == 16 * 3 + 3  # the fourth identity, made at day 1020, renews at 1040, 1060, 1080
    # Every replacement happened exactly 340 days after the creation of the identity it replaced.
    made_at = [when for when, labels in passes if any(step_.startswith("replace ") for step_ in labels)]
    first = NOW.replace(microsecond=0)
    assert made_at == [first + lifetime * n for n in (1, 2, 3)]


# ---------------------------------------------------------------------------------------------------
# Seeded random worlds, changed between passes


def _random_identity(
    rng: random.Random, target: Target, other: Target, keys_pool: list[KeySet], uid: str
) -> Identity:
    base = target if rng.random() < 0.8 else other
    created = NOW - td(days=rng.choice([1, 10, 200, 340, 355, 400]))
    expires = rng.choice([GOOD_EXPIRY, NOW + td(days=2), NOW - td(days=1), None, created + td(days=30)])
    identity = shaped(base, uid=uid, expires=expires, created=created)
    description = rng.choice(
        [DESCRIPTION, DESCRIPTION, f"{DESCRIPTION}; edited", ownership_marker(LEGACY_OWNER)]
    )
    identity = dataclasses.replace(identity, description=description)
    if identity.claim_match is not None and rng.random() < 0.3:
        identity = dataclasses.replace(
            identity,
            claim_match=rng.choice(
                [
                    ClaimMatch(issuer=PUBLIC_ISSUER, subject_pattern=".*"),
                    ClaimMatch(issuer="https://o.example.test", subject=SUBJECT),
                    ClaimMatch(issuer=PUBLIC_ISSUER, subject=SUBJECT, claim_patterns={"a": ".*"}),
                ]
            ),
        )
    if identity.static_keys is not None and rng.random() < 0.4:
        identity = with_static(
            identity,
            issuer_keys=rng.choice([*(k.document for k in keys_pool), "garbage"]),
            issuer=rng.choice([PRIVATE_ISSUER, "https://old.example.test"]),
        )
    return identity


def _mutate(
    rng: random.Random,
    world: World,
    memory: Memory,
    targets: dict[str, Target],
    now_target: str,
    protected: frozenset[str],
) -> str:
    """Someone or something changes the world between two passes; returns the target the spec now is."""
    current = world.identities.get(memory.identity_id or "")
    roll = rng.random()
    if roll < 0.1:
        now_target = rng.choice(sorted(targets))  # the spec, the cluster keys or the issuer changed
    elif roll < 0.2 and current is not None:
        bindings = world.bindings_of(current.uid)
        if bindings:
            del world.bindings[rng.choice(bindings).uid]
    elif roll < 0.3 and current is not None:
        world.bind(
            current.uid, rng.choice([*ROLE_IDS.values(), OWNER_ROLE]), rng.choice([ORG, ORG, OTHER_ORG])
        )
    elif roll < 0.38 and current is not None:
        world.identities[current.uid] = dataclasses.replace(
            current, description=f"{current.description}; touched"
        )
    elif roll < 0.44 and current is not None and current.claim_match is not None:
        world.identities[current.uid] = dataclasses.replace(
            current, claim_match=ClaimMatch(issuer=PUBLIC_ISSUER, subject_pattern=".*")
        )
    elif roll < 0.5 and current is not None and current.static_keys is not None:
        world.identities[current.uid] = with_static(
            current, expiration_time=rng.choice([None, world.now - td(hours=1)])
        )
    elif roll < 0.56:
        world.config_maps.pop(CONFIG_MAP, None)
    elif roll < 0.62:
        world.config_maps[CONFIG_MAP] = {"CHAINGUARD_IDENTITY": rng.choice([OLD, "garbage"])}
    elif roll < 0.7:
        # A create whose answer was lost: an identity of ours nobody recorded.
        target = targets[now_target]
        world.put(shaped(target, uid=world.new_uid(ORG), created=world.now, expires=world.now + td(days=30)))
    elif roll < 0.74 and current is not None and current.uid not in protected:
        world.drop(current.uid)  # deleted behind the operator's back
    elif roll < 0.8:
        world.max_lifetime, world.past_limit = rng.choice(
            [(LIFETIME, "refuse"), (td(days=40), "refuse"), (td(days=40), "clamp"), (None, "refuse")]
        )
    return now_target


def test_loop_converges_from_random_worlds_changed_between_passes(
    settings: Settings, keys: KeySet, new_keys: KeySet
) -> None:
    # Seeded, so a failure is reproducible: every pass reaches Done within the bound, every action keeps
    # the safety rules (check_safe), fold agrees with the world after every pass, and once the world is
    # left alone and the grace periods pass, exactly one identity of ours is left, in shape.
    for seed in range(300):
        rng = random.Random(seed)
        targets = {
            "static": make_target(settings, keys, roles=("registry.pull", "viewer")),
            "static-rotated": make_target(settings, new_keys, roles=("registry.pull", "viewer")),
            "static-other-roles": make_target(
                settings, keys, roles=("apk.pull",), configMap={"name": "renamed"}
            ),
            "claim": make_target(settings, keys, discovered=PUBLIC_ISSUER, roles=("apk.pull",)),
        }
        name = rng.choice(sorted(targets))
        target = targets[name]
        other = targets["claim" if target.mode is Mode.STATIC else "static"]
        world = World(NOW)
        memory = Memory(config_map_name=rng.choice([None, CONFIG_MAP]))
        if rng.random() < 0.85:
            identity = _random_identity(rng, target, other, [keys, new_keys], CURRENT)
            world.put(identity, *rng.sample([*ROLE_IDS.values(), OWNER_ROLE], rng.randrange(0, 4)))
            memory.identity_id = CURRENT
            if rng.random() < 0.7:
                world.config_maps[CONFIG_MAP] = config_map_data(target, rng.choice([CURRENT, OLD]))
        for n in range(rng.randrange(0, 3)):
            dup = _random_identity(rng, target, other, [keys, new_keys], uidp(50 + n))
            world.put(dataclasses.replace(dup, description=DESCRIPTION), ROLE_IDS["viewer"])
            if rng.random() < 0.5:
                memory.retiring[dup.uid] = NOW + rng.choice([-td(minutes=1), td(minutes=5)])
        protected = frozenset({CURRENT}) if rng.random() < 0.1 else frozenset()
        memory.inherited_roles = (OWNER_ROLE,) if rng.random() < 0.2 else ()
        protected_ids = [uid for uid in protected if uid in world.identities]
        try:
            for _ in range(6):
                force = rng.random() < 0.15
                _, folded, _ = reconcile_pass(world, target, memory, protected=protected, force=force)
                assert_converged(world, target, folded)
                name = _mutate(rng, world, memory, targets, name, protected)
                target = targets[name]
                jump = rng.choice([td(0), td(minutes=3), td(minutes=11), td(days=5), td(days=25)])
                world.now += jump
            # Left alone: the resource settles, one identity of ours remains.
            _labels, folded, _ = reconcile_pass(world, target, memory, protected=protected)
            assert_converged(world, target, folded)
            settle(world, target, memory, protected=protected)
            for uid in protected_ids:
                assert uid in world.identities, "the operator's own identity was deleted"
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}: {exc}") from exc
