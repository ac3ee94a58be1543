"""The pure reconcile core: ``decide`` one step at a time, the target it decides against, and whole
reconcile loops run against an in-memory fake (no I/O, no clock: ``now`` is always given).

The fake (``FakeWorld``) folds each action into ``Observed`` the way ``reconcile`` does (new UIDs on
create, the replaced identity retired with a grace period, update masks applied path by path), so a
wrong or incomplete update mask shows up as a loop that never reaches ``Done``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import random
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from chainguard_identity_operator.chainguard.types import ClaimMatch, Identity, RoleBinding, StaticKeys
from chainguard_identity_operator.config import Settings
from chainguard_identity_operator.decide import (
    Action,
    BindRole,
    ClusterFacts,
    CreateIdentity,
    DeleteIdentity,
    Done,
    Observed,
    Target,
    UnbindRole,
    UpdateIdentity,
    WriteConfigMap,
    build_target,
    config_map_data,
    decide,
    desired_identity,
    issuer_is_public,
    renewal_due_at,
    resolve_mode,
)
from chainguard_identity_operator.jwks import KeySet, parse_jwks
from chainguard_identity_operator.model import Mode, SpecError, StaticSpec, parse_spec
from chainguard_identity_operator.naming import ownership_marker

UTC = datetime.UTC
td = datetime.timedelta

ORG = "c95870ebffa72a258df087ea727ee92daf177e29"
OTHER_ORG = "0123456789abcdef0123456789abcdef01234567"
ROLE_IDS = {
    "registry.pull": "1111111111111111111111111111111111111111",
    "apk.pull": "2222222222222222222222222222222222222222",
    "viewer": "3333333333333333333333333333333333333333",
}
OWNER_ROLE = "4444444444444444444444444444444444444444"

# Microseconds on purpose: expiry times the operator writes are whole seconds.
NOW = datetime.datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=UTC)
PUBLIC_ISSUER = "https://container.googleapis.com/v1/projects/p/locations/europe-west1/clusters/c"
PRIVATE_ISSUER = "https://kubernetes.default.svc.cluster.local"
DESCRIPTION = "managed-by=chainguard-identity-operator cluster=prod object=shop/puller"
SUBJECT = "system:serviceaccount:shop:default"

# A static identity written ten days ago with the default 720h/240h: renewal is due ten days from NOW.
GOOD_EXPIRY = datetime.datetime(2026, 12, 13, 10, 0, tzinfo=UTC)
RENEW_AT = datetime.datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
GRACE = td(minutes=10)  # Settings.replacement_grace by default


def uidp(n: int, parent: str = ORG) -> str:
    return f"{parent}/{n:016x}"


CURRENT = uidp(1)
OLD = uidp(2)


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
    **spec: Any,
) -> Target:
    parsed = parse_spec("shop", "puller", {"parent": ORG, "roles": list(roles), **spec}, settings)
    return build_target(
        parsed,
        parent=ORG,
        facts=ClusterFacts(issuer=discovered, keys=keys),
        settings=settings,
        role_ids={role: ROLE_IDS[role] for role in parsed.roles},
        adopted=adopted,
    )


@pytest.fixture
def static_target(settings: Settings, keys: KeySet) -> Target:
    return make_target(settings, keys)


@pytest.fixture
def claim_target(settings: Settings, keys: KeySet) -> Target:
    return make_target(settings, keys, discovered=PUBLIC_ISSUER)


def shaped(target: Target, uid: str = CURRENT, expires: datetime.datetime | None = GOOD_EXPIRY) -> Identity:
    """An identity exactly as ``target`` wants it (static ones expire at ``expires``)."""
    return dataclasses.replace(desired_identity(target, NOW, expires), uid=uid)


def bound(target: Target, identity: str = CURRENT) -> tuple[RoleBinding, ...]:
    return tuple(
        RoleBinding(uid=uidp(100 + index), identity_uid=identity, group_uid=target.parent, role_uid=role_id)
        for index, role_id in enumerate(target.role_ids.values())
    )


def converged(target: Target, identity: Identity | None = None, **changes: Any) -> Observed:
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


# ---------------------------------------------------------------------------------------------------
# 1. A usable identity must exist


def test_no_identity_creates_a_claim_match_identity(claim_target: Target) -> None:
    action = decide(claim_target, Observed(), NOW)
    assert action == CreateIdentity(
        parent=ORG,
        identity=Identity(
            uid="",
            name="prod.shop.puller",
            description=DESCRIPTION,
            claim_match=ClaimMatch(issuer=PUBLIC_ISSUER, subject=SUBJECT, audience="issuer.enforce.dev"),
        ),
        replaces=None,
    )
    assert action.identity.to_wire() == {
        "name": "prod.shop.puller",
        "description": DESCRIPTION,
        "claimMatch": {"issuer": PUBLIC_ISSUER, "subject": SUBJECT, "audience": "issuer.enforce.dev"},
    }


def test_no_identity_creates_a_static_identity(static_target: Target, keys: KeySet) -> None:
    action = decide(static_target, Observed(), NOW)
    assert action == CreateIdentity(
        parent=ORG,
        identity=Identity(
            uid="",
            name="prod.shop.puller",
            description=DESCRIPTION,
            static_keys=StaticKeys(
                issuer=PRIVATE_ISSUER,
                subject=SUBJECT,
                issuer_keys=keys.document,
                expiration_time=datetime.datetime(2026, 12, 23, 10, 0, tzinfo=UTC),  # now + 720h
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


def test_issuer_override_and_service_account_reach_the_claims(settings: Settings, keys: KeySet) -> None:
    target = make_target(
        settings,
        keys,
        discovered=PRIVATE_ISSUER,  # overridden by spec.issuer
        mode="ClaimMatch",
        serviceAccountName="image-puller",
        issuer="https://oidc.example.test/c",
    )
    action = decide(target, Observed(), NOW)
    assert isinstance(action, CreateIdentity)
    assert action.identity.claim_match == ClaimMatch(
        issuer="https://oidc.example.test/c",
        subject="system:serviceaccount:shop:image-puller",
        audience="issuer.enforce.dev",
    )


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
        ("in-place-rejected", "static"),
        ("in-place-rejected", "claim"),
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
        "in-place-rejected": shaped(target),
    }[case]
    observed = converged(target, current, in_place_rejected=case == "in-place-rejected")
    action = decide(target, observed, NOW)
    # A replacement starts a fresh lifetime: the old expiry is not carried over.
    assert action == CreateIdentity(
        parent=ORG, identity=desired_identity(target, NOW, None), replaces=current.uid
    )


# ---------------------------------------------------------------------------------------------------
# 2. Its shape is corrected in place


@pytest.mark.parametrize(
    ("description", "reason"),
    [
        (f"{DESCRIPTION}; an older user text", "drift"),
        (ownership_marker("staging", "shop", "puller"), "drift"),  # managed, by another instance
        ("", "adopt"),
        ("made by hand with chainctl", "adopt"),
    ],
)
@pytest.mark.parametrize("kind", ["static", "claim"])
def test_description_drift(
    static_target: Target, claim_target: Target, kind: str, description: str, reason: str
) -> None:
    target = static_target if kind == "static" else claim_target
    current = dataclasses.replace(shaped(target), description=description)
    action = decide(target, converged(target, current), NOW)
    assert action == UpdateIdentity(
        uid=CURRENT, identity=shaped(target, uid=""), mask=("description",), reason=reason
    )
    if kind == "static":  # the expiry is kept, not renewed
        assert action.identity.static_keys is not None
        assert action.identity.static_keys.expiration_time == GOOD_EXPIRY


@pytest.mark.parametrize(
    "claims",
    [
        ClaimMatch(issuer="https://old-issuer.example.test", subject=SUBJECT),
        ClaimMatch(issuer=PUBLIC_ISSUER, subject="system:serviceaccount:shop:other"),
        ClaimMatch(issuer=PUBLIC_ISSUER, subject="system:serviceaccount:other:default"),
        ClaimMatch(issuer=PUBLIC_ISSUER, subject=SUBJECT, audience="sts.example.test"),
        ClaimMatch(issuer=f"^{PUBLIC_ISSUER}$", subject="^system:serviceaccount:shop:.*$"),  # patterns
    ],
)
def test_claim_match_drift(claim_target: Target, claims: ClaimMatch) -> None:
    current = dataclasses.replace(shaped(claim_target), claim_match=claims)
    action = decide(claim_target, converged(claim_target, current), NOW)
    assert action == UpdateIdentity(
        uid=CURRENT, identity=shaped(claim_target, uid=""), mask=("claim_match",), reason="drift"
    )


def test_claim_and_description_drift_is_one_update(claim_target: Target) -> None:
    current = dataclasses.replace(
        shaped(claim_target),
        description="hand made",
        claim_match=ClaimMatch(issuer=PUBLIC_ISSUER, subject="system:serviceaccount:shop:x"),
    )
    action = decide(claim_target, converged(claim_target, current), NOW)
    assert isinstance(action, UpdateIdentity)
    assert action.mask == ("description", "claim_match")
    assert action.reason == "adopt"


def test_changed_cluster_keys_update_issuer_keys_and_keep_the_expiry(
    settings: Settings, keys: KeySet, new_keys: KeySet
) -> None:
    before = make_target(settings, keys)
    after = make_target(settings, new_keys)
    action = decide(after, converged(after, shaped(before)), NOW)
    assert isinstance(action, UpdateIdentity)
    assert (action.uid, action.mask, action.reason) == (CURRENT, ("static_keys.issuer_keys",), "keys-changed")
    assert action.identity.static_keys == StaticKeys(
        issuer=PRIVATE_ISSUER,
        subject=SUBJECT,
        issuer_keys=new_keys.document,
        expiration_time=GOOD_EXPIRY,
        audience="issuer.enforce.dev",
    )


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
        (RENEW_AT + td(days=3), True),
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
    assert action.identity.static_keys is not None
    new_expiry = action.identity.static_keys.expiration_time
    assert new_expiry == (now + td(hours=720)).replace(microsecond=0)


def test_missing_expiry_is_renewed(static_target: Target) -> None:
    current = with_static(shaped(static_target), expiration_time=None)
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


def test_key_change_and_renewal_together_are_one_update(
    settings: Settings, keys: KeySet, new_keys: KeySet
) -> None:
    before = make_target(settings, keys)
    after = make_target(settings, new_keys)
    action = decide(after, converged(after, shaped(before)), RENEW_AT)
    assert isinstance(action, UpdateIdentity)
    assert action.mask == ("static_keys.issuer_keys", "static_keys.expiration_time")
    assert action.reason == "renewal"
    assert action.identity.static_keys is not None
    assert action.identity.static_keys.issuer_keys == new_keys.document
    assert action.identity.static_keys.expiration_time == (RENEW_AT + td(hours=720))


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
    assert action == UpdateIdentity(
        uid=CURRENT,
        identity=shaped(static_target, uid="", expires=None),
        mask=("static_keys",),
        reason="drift",
    )


def test_forced_rotation_renews_static_keys_now(static_target: Target) -> None:
    action = decide(static_target, converged(static_target, force_rotation=True), NOW)
    assert action == UpdateIdentity(
        uid=CURRENT,
        identity=shaped(static_target, uid="", expires=None),
        mask=("static_keys.issuer_keys", "static_keys.expiration_time"),
        reason="forced",
    )


def test_forced_rotation_of_a_claim_match_identity_is_a_no_op(claim_target: Target) -> None:
    assert decide(claim_target, converged(claim_target, force_rotation=True), NOW) == Done(wake_at=None)


@pytest.mark.parametrize(
    ("change", "mask"),
    [
        ({"issuer": "https://old-issuer.example.test"}, ("static_keys",)),
        ({"expiration_time": RENEW_AT}, ("static_keys.expiration_time",)),  # renewal due anyway
    ],
)
def test_forced_rotation_with_other_static_changes_is_labelled_forced(
    static_target: Target, change: dict[str, Any], mask: tuple[str, ...]
) -> None:
    current = with_static(shaped(static_target), **change)
    action = decide(static_target, converged(static_target, current, force_rotation=True), NOW)
    assert action == UpdateIdentity(
        uid=CURRENT, identity=shaped(static_target, uid="", expires=None), mask=mask, reason="forced"
    )


def test_renewal_and_adoption_together_are_one_update_labelled_renewal(static_target: Target) -> None:
    # The rotation is what reconcile must record (lastRotatedAt, a Rotated event), not the adoption.
    current = dataclasses.replace(shaped(static_target), description="made by hand")
    action = decide(static_target, converged(static_target, current), RENEW_AT)
    assert isinstance(action, UpdateIdentity)
    assert (action.mask, action.reason) == (("description", "static_keys.expiration_time"), "renewal")


# ---------------------------------------------------------------------------------------------------
# 3. Roles


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


def test_bindings_in_other_groups_are_left_alone(static_target: Target) -> None:
    foreign = RoleBinding(uidp(9), CURRENT, OTHER_ORG, OWNER_ROLE)
    observed = converged(static_target, bindings=(*bound(static_target), foreign))
    assert decide(static_target, observed, NOW) == Done(wake_at=RENEW_AT)


# ---------------------------------------------------------------------------------------------------
# 4. ConfigMap, retired identities, Done


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
    assert action == WriteConfigMap(data=EXPECTED_CONFIG_MAP)


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


def test_retired_identity_goes_only_after_the_config_map_names_the_new_one(static_target: Target) -> None:
    old = dataclasses.replace(shaped(static_target), uid=OLD)
    stale = config_map_data(static_target, OLD)
    for config_map in (None, stale):
        observed = converged(static_target, retired=(old,), config_map=config_map)
        assert isinstance(decide(static_target, observed, NOW), WriteConfigMap)
    observed = converged(static_target, retired=(old,))
    assert decide(static_target, observed, NOW) == DeleteIdentity(uid=OLD, reason="replaced")


def test_retired_identity_waits_for_its_grace_period(static_target: Target) -> None:
    old = dataclasses.replace(shaped(static_target), uid=OLD)
    grace_ends = NOW + td(minutes=10)
    observed = converged(static_target, retired=(old,), retire_after={OLD: grace_ends})
    assert decide(static_target, observed, NOW) == Done(wake_at=grace_ends)
    assert decide(static_target, observed, grace_ends) == DeleteIdentity(uid=OLD, reason="replaced")


def test_retired_identities_go_one_at_a_time_when_due(static_target: Target) -> None:
    older = dataclasses.replace(shaped(static_target), uid=uidp(3))
    old = dataclasses.replace(shaped(static_target), uid=OLD)
    observed = converged(
        static_target,
        retired=(old, older),
        retire_after={OLD: NOW + td(minutes=5), uidp(3): NOW - td(seconds=1)},
    )
    assert decide(static_target, observed, NOW) == DeleteIdentity(uid=uidp(3), reason="replaced")


@pytest.mark.parametrize(
    ("kind", "retire_in", "wake_at"),
    [
        ("static", None, RENEW_AT),
        ("claim", None, None),
        ("claim", td(minutes=10), NOW + td(minutes=10)),
        ("static", td(minutes=10), NOW + td(minutes=10)),  # the earlier of grace end and renewal
        ("static", td(days=30), RENEW_AT),
    ],
)
def test_done_wakes_at_the_next_scheduled_change(
    static_target: Target, claim_target: Target, kind: str, retire_in: td | None, wake_at: Any
) -> None:
    target = static_target if kind == "static" else claim_target
    observed = converged(target)
    if retire_in is not None:
        old = dataclasses.replace(shaped(target), uid=OLD)
        observed = dataclasses.replace(observed, retired=(old,), retire_after={OLD: NOW + retire_in})
    assert decide(target, observed, NOW) == Done(wake_at=wake_at)


def test_the_current_identity_is_never_deleted(static_target: Target) -> None:
    # reconcile can list it as retired: _create may adopt an owned same-name identity that is still in
    # its grace period (e.g. spec.mode flipped back). Deleting it would break every pod using it.
    current = shaped(static_target)
    old = dataclasses.replace(shaped(static_target), uid=OLD)
    observed = converged(static_target, current, retired=(current, old), retire_after={})
    assert decide(static_target, observed, NOW) == DeleteIdentity(uid=OLD, reason="replaced")
    observed = converged(static_target, current, retired=(current,), retire_after={CURRENT: NOW})
    assert decide(static_target, observed, NOW) == Done(wake_at=RENEW_AT)


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


def _adoptable(kind: str) -> Identity:
    if kind == "static":
        static = StaticKeys(issuer=PRIVATE_ISSUER, subject=SUBJECT, issuer_keys="{}", expiration_time=None)
        return Identity(uid=CURRENT, name="hand-made", static_keys=static)
    return Identity(
        uid=CURRENT, name="hand-made", claim_match=ClaimMatch(issuer=PUBLIC_ISSUER, subject=SUBJECT)
    )


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
    elsewhere = dataclasses.replace(_adoptable("static"), uid=uidp(1, OTHER_ORG))
    parsed = parse_spec("shop", "puller", {"parentName": "my-org", "adopt": elsewhere.uid}, settings)
    with pytest.raises(SpecError) as caught:
        build_target(
            parsed,
            parent=ORG,
            facts=ClusterFacts(issuer=PRIVATE_ISSUER, keys=keys),
            settings=settings,
            role_ids={"registry.pull": ROLE_IDS["registry.pull"]},
            adopted=elsewhere,
        )
    assert (caught.value.field, caught.value.reason) == ("spec.adopt", "AdoptionRefused")
    assert ORG in caught.value.message


def test_target_of_an_adopted_identity_keeps_its_name(settings: Settings, keys: KeySet) -> None:
    target = make_target(settings, keys, discovered=PUBLIC_ISSUER, adopted=_adoptable("static"))
    assert target.mode is Mode.STATIC
    assert target.name == "hand-made"
    assert target.description == DESCRIPTION
    assert target.keys == keys


def test_target_fields(settings: Settings, keys: KeySet) -> None:
    claim = make_target(settings, keys, discovered=PUBLIC_ISSUER, roles=("viewer", "registry.pull"))
    assert claim.keys is None  # the JWKS is only uploaded for static identities
    assert list(claim.role_ids) == ["viewer", "registry.pull"]
    assert (claim.parent, claim.name, claim.issuer, claim.subject) == (
        ORG,
        "prod.shop.puller",
        PUBLIC_ISSUER,
        SUBJECT,
    )
    static = make_target(settings, keys, static={"validFor": "96h"})
    assert static.static == StaticSpec(valid_for=td(hours=96), renew_before=td(hours=32))


# ---------------------------------------------------------------------------------------------------
# Whole loops against an in-memory fake


@dataclasses.dataclass
class FakeWorld:
    """Folds actions into ``Observed`` as ``reconcile`` does, and checks the ordering invariants."""

    target: Target
    now: datetime.datetime
    grace: td = GRACE
    refuse_static_updates: bool = False  # the API refuses in-place static_keys updates
    next_id: int = 0x1000
    actions: list[Action] = dataclasses.field(default_factory=list)
    updates: dict[str, int] = dataclasses.field(default_factory=dict)  # identity -> writes

    def new_uid(self, parent: str) -> str:
        self.next_id += 1
        return uidp(self.next_id, parent)

    def apply(self, observed: Observed, action: Action) -> Observed:
        self.actions.append(action)
        current = observed.identity
        wanted = set(self.target.role_ids.values())
        in_parent = {b.role_uid for b in observed.bindings if b.group_uid == self.target.parent}
        match action:
            case CreateIdentity():
                assert action.replaces == (current.uid if current else None)
                created = dataclasses.replace(
                    action.identity, uid=self.new_uid(action.parent), create_time=self.now
                )
                retired, retire_after = observed.retired, dict(observed.retire_after)
                if current is not None:
                    retired += (current,)
                    retire_after[current.uid] = self.now + self.grace
                return dataclasses.replace(
                    observed,
                    identity=created,
                    bindings=(),
                    retired=retired,
                    retire_after=retire_after,
                    in_place_rejected=False,
                    force_rotation=False,
                )
            case UpdateIdentity():
                assert current is not None
                assert action.uid == current.uid
                self.updates[current.uid] = self.updates.get(current.uid, 0) + 1
                if self.refuse_static_updates and any(p.startswith("static_keys") for p in action.mask):
                    return dataclasses.replace(observed, in_place_rejected=True)
                updated = apply_mask(current, action.identity, action.mask)
                force = observed.force_rotation and action.reason not in ("renewal", "keys-changed", "forced")
                return dataclasses.replace(observed, identity=updated, force_rotation=force)
            case BindRole():
                assert current is not None
                assert (action.parent, action.identity) == (self.target.parent, current.uid)
                assert action.role_id not in in_parent
                new = RoleBinding(self.new_uid(ORG), current.uid, action.parent, action.role_id)
                return dataclasses.replace(observed, bindings=(*observed.bindings, new))
            case UnbindRole():
                assert wanted <= in_parent, "an unwanted binding went before every wanted one was bound"
                assert action.binding.group_uid == self.target.parent
                remaining = tuple(b for b in observed.bindings if b.uid != action.binding.uid)
                if action.binding.role_uid in wanted:  # only a duplicate of a wanted role may go
                    assert any(
                        b.role_uid == action.binding.role_uid and b.group_uid == self.target.parent
                        for b in remaining
                    ), "removed the only binding of a wanted role"
                return dataclasses.replace(observed, bindings=remaining)
            case WriteConfigMap():
                assert current is not None
                assert action.data["CHAINGUARD_IDENTITY"] == current.uid
                return dataclasses.replace(observed, config_map=dict(action.data))
            case DeleteIdentity():
                assert current is not None
                assert action.uid != current.uid, "deleted the identity in use"
                assert action.uid in {old.uid for old in observed.retired}
                assert observed.config_map is not None
                assert observed.config_map["CHAINGUARD_IDENTITY"] == current.uid, "deleted before publishing"
                due = observed.retire_after.get(action.uid)
                assert due is None or self.now >= due, "deleted inside the grace period"
                return dataclasses.replace(
                    observed, retired=tuple(i for i in observed.retired if i.uid != action.uid)
                )
        raise AssertionError(f"unexpected action {action!r}")


def apply_mask(current: Identity, body: Identity, mask: tuple[str, ...]) -> Identity:
    """What the server does with a PATCH and an updateMask: only the named paths change."""
    result = current
    for path in mask:
        if path == "description":
            result = dataclasses.replace(result, description=body.description)
        elif path == "claim_match":
            result = dataclasses.replace(result, claim_match=body.claim_match)
        elif path == "static_keys":
            result = dataclasses.replace(result, static_keys=body.static_keys)
        elif path in ("static_keys.issuer_keys", "static_keys.expiration_time"):
            assert result.static_keys is not None
            assert body.static_keys is not None
            member = path.split(".", 1)[1]
            value = getattr(body.static_keys, member)
            result = with_static(result, **{member: value})
        else:
            raise AssertionError(f"unknown update mask path {path!r}")
    return result


def run(world: FakeWorld, observed: Observed, limit: int = 20) -> tuple[list[str], Observed, Done]:
    """decide → apply → decide … until Done; returns the actions as short labels."""
    start = len(world.actions)
    for _ in range(limit):
        action = decide(world.target, observed, world.now)
        if isinstance(action, Done):
            return [label(a) for a in world.actions[start:]], observed, action
        observed = world.apply(observed, action)
    pytest.fail(f"no Done after {limit} steps: {[label(a) for a in world.actions[start:]]}")


def label(action: Action) -> str:
    match action:
        case CreateIdentity(replaces=None):
            return "create"
        case CreateIdentity():
            return f"replace {action.replaces}"
        case UpdateIdentity():
            return f"update {action.reason} {','.join(action.mask)}"
        case BindRole():
            return f"bind {action.role}"
        case UnbindRole():
            return f"unbind {action.binding.role_uid}"
        case WriteConfigMap():
            return "write configmap"
        case DeleteIdentity():
            return f"delete {action.uid}"
    raise AssertionError(action)


def assert_converged(target: Target, observed: Observed, now: datetime.datetime) -> None:
    """The state the loop ends in is the state the spec asks for."""
    identity = observed.identity
    assert identity is not None
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
        assert now < renewal_due_at(static.expiration_time, target.static)
    in_parent = [b.role_uid for b in observed.bindings if b.group_uid == target.parent]
    assert set(in_parent) == set(target.role_ids.values())
    assert observed.config_map == config_map_data(target, identity.uid)
    for old in observed.retired:
        assert old.uid != identity.uid
        assert now < observed.retire_after[old.uid]


def test_simulation_claim_match_from_nothing(settings: Settings, keys: KeySet) -> None:
    target = make_target(settings, keys, discovered=PUBLIC_ISSUER, roles=("registry.pull", "apk.pull"))
    world = FakeWorld(target, NOW)
    labels, final, done = run(world, Observed())
    assert labels == ["create", "bind registry.pull", "bind apk.pull", "write configmap"]
    assert done == Done(wake_at=None)
    assert_converged(target, final, NOW)
    # Idempotence: a second pass from the final state has nothing to do.
    assert run(world, final) == ([], final, done)


def test_simulation_static_lifecycle(settings: Settings, keys: KeySet, new_keys: KeySet) -> None:
    target = make_target(settings, keys)
    world = FakeWorld(target, NOW)
    labels, state, done = run(world, Observed())
    assert labels == ["create", "bind registry.pull", "write configmap"]
    first_renewal = datetime.datetime(2026, 12, 13, 10, 0, tzinfo=UTC)  # expiry 12-23 minus 240h
    assert done == Done(wake_at=first_renewal)
    assert_converged(target, state, NOW)

    # The cluster rotates its signing keys: one in-place write, expiry kept.
    world = FakeWorld(make_target(settings, new_keys), NOW + td(days=1))
    labels, state, done = run(world, state)
    assert labels == ["update keys-changed static_keys.issuer_keys"]
    assert done == Done(wake_at=first_renewal)
    assert_converged(world.target, state, world.now)

    # Woken at the renewal time: one in-place write, a fresh lifetime.
    world = FakeWorld(world.target, first_renewal)
    labels, state, done = run(world, state)
    assert labels == ["update renewal static_keys.expiration_time"]
    assert done == Done(wake_at=first_renewal + td(hours=720) - td(hours=240))
    assert_converged(world.target, state, world.now)

    # Keys change when renewal is also due: still one write for the identity.
    second_renewal = done.wake_at
    assert second_renewal is not None
    world = FakeWorld(make_target(settings, keys), second_renewal + td(hours=1))
    labels, state, done = run(world, state)
    assert labels == ["update renewal static_keys.issuer_keys,static_keys.expiration_time"]
    assert_converged(world.target, state, world.now)
    assert run(world, state)[0] == []


def test_simulation_rotation_by_replacement_when_the_api_refuses(settings: Settings, keys: KeySet) -> None:
    target = make_target(settings, keys, roles=("registry.pull", "viewer"))
    world = FakeWorld(target, RENEW_AT, refuse_static_updates=True)
    labels, state, done = run(world, converged(target))
    new = state.identity
    assert new is not None
    assert labels == [
        "update renewal static_keys.expiration_time",  # refused by the API
        f"replace {CURRENT}",
        "bind registry.pull",
        "bind viewer",
        "write configmap",
    ]
    # The old identity outlives the switch by the grace period, so mounted ConfigMaps can catch up.
    assert [old.uid for old in state.retired] == [CURRENT]
    assert done == Done(wake_at=RENEW_AT + GRACE)
    assert_converged(target, state, world.now)

    later = FakeWorld(target, RENEW_AT + GRACE)
    labels, state, done = run(later, state)
    assert labels == [f"delete {CURRENT}"]
    assert state.retired == ()
    assert state.identity == new
    assert isinstance(done.wake_at, datetime.datetime)
    assert done.wake_at > later.now


def test_simulation_issuer_becomes_private(settings: Settings, keys: KeySet) -> None:
    claim = make_target(settings, keys, discovered=PUBLIC_ISSUER)
    static = make_target(settings, keys, discovered=PRIVATE_ISSUER)
    world = FakeWorld(static, NOW, grace=td(0))
    labels, state, _ = run(world, converged(claim))
    assert labels == [f"replace {CURRENT}", "bind registry.pull", "write configmap", f"delete {CURRENT}"]
    assert_converged(static, state, NOW)


def test_simulation_adopting_a_hand_made_identity(settings: Settings, keys: KeySet) -> None:
    hand_made = Identity(
        uid=CURRENT,
        name="ci-puller",
        description="created with chainctl",
        claim_match=ClaimMatch(issuer=f"^{PUBLIC_ISSUER}$", subject=SUBJECT),
    )
    target = make_target(
        settings, keys, discovered=PUBLIC_ISSUER, roles=("registry.pull", "viewer"), adopted=hand_made
    )
    bindings = (
        RoleBinding(uidp(50), CURRENT, ORG, OWNER_ROLE),
        RoleBinding(uidp(51), CURRENT, OTHER_ORG, OWNER_ROLE),  # another organization: not ours to judge
        RoleBinding(uidp(52), CURRENT, ORG, ROLE_IDS["viewer"]),
    )
    world = FakeWorld(target, NOW)
    labels, state, done = run(world, Observed(identity=hand_made, bindings=bindings))
    assert labels == [
        "update adopt description,claim_match",
        "bind registry.pull",
        f"unbind {OWNER_ROLE}",
        "write configmap",
    ]
    assert done == Done(wake_at=None)
    assert_converged(target, state, NOW)
    assert state.identity is not None
    assert state.identity.name == "ci-puller"
    assert RoleBinding(uidp(51), CURRENT, OTHER_ORG, OWNER_ROLE) in state.bindings


@pytest.mark.parametrize("change", ["issuer", "adopt", "renewal"])
def test_forced_rotation_is_one_write_even_with_other_drift(static_target: Target, change: str) -> None:
    # reconcile clears the request only for renewal/keys-changed/forced updates; any other label on a
    # write that renews would make decide force a second, redundant rotation in the same pass.
    current = shaped(static_target)
    now = RENEW_AT if change == "renewal" else NOW
    if change == "issuer":
        current = with_static(current, issuer="https://old-issuer.example.test")
    else:
        current = dataclasses.replace(current, description="made by hand")
    world = FakeWorld(static_target, now)
    labels, state, _ = run(world, converged(static_target, current, force_rotation=True))
    assert world.updates == {CURRENT: 1}
    assert labels[0].startswith("update forced ")
    assert not state.force_rotation


def random_state(rng: random.Random, target: Target, other: Target, alt_keys: KeySet) -> Observed:
    """Whatever a crash, an outside edit or an old operator version could have left behind."""
    identity: Identity | None = None
    if rng.random() < 0.85:
        base = target if rng.random() < 0.8 else other
        expiry = rng.choice([GOOD_EXPIRY, NOW + td(days=2), NOW - td(days=1), None, NOW + td(days=400)])
        identity = shaped(base, uid=uidp(1, ORG if rng.random() < 0.85 else OTHER_ORG), expires=expiry)
        if identity.static_keys is not None:
            identity = with_static(identity, expiration_time=expiry)
        description = rng.choice(
            [base.description, "", "by hand", ownership_marker("staging", "shop", "puller")]
        )
        identity = dataclasses.replace(identity, description=description)
        if identity.claim_match is not None and rng.random() < 0.3:
            subject = rng.choice([SUBJECT, "system:serviceaccount:x:y"])
            identity = dataclasses.replace(
                identity, claim_match=ClaimMatch(rng.choice([PUBLIC_ISSUER, "https://o"]), subject)
            )
        if identity.static_keys is not None and rng.random() < 0.5:
            identity = with_static(
                identity,
                issuer_keys=rng.choice([alt_keys.document, "garbage", identity.static_keys.issuer_keys]),
                issuer=rng.choice([PRIVATE_ISSUER, "https://old.example.test"]),
            )
        if rng.random() < 0.05:
            identity = Identity(uid=uidp(1), name="aws", other_kind="awsIdentity")
    current_uid = identity.uid if identity is not None else CURRENT
    role_pool = [*ROLE_IDS.values(), OWNER_ROLE]
    bindings = tuple(
        RoleBinding(uidp(300 + i), current_uid, rng.choice([ORG, ORG, OTHER_ORG]), rng.choice(role_pool))
        for i in range(rng.randrange(0, 5))
    )
    config_map = rng.choice(
        [None, config_map_data(target, current_uid), config_map_data(target, OLD), {"X": "y"}]
    )
    retired = tuple(
        dataclasses.replace(shaped(target), uid=uidp(500 + i)) for i in range(rng.randrange(0, 3))
    )
    retire_after = {
        old.uid: rng.choice([NOW - td(minutes=1), NOW + td(minutes=5)])
        for old in retired
        if rng.random() < 0.7
    }
    return Observed(
        identity=identity,
        bindings=bindings,
        config_map=config_map,
        retired=retired,
        retire_after=retire_after,
        in_place_rejected=identity is not None and rng.random() < 0.1,
        force_rotation=rng.random() < 0.15,
    )


def test_simulation_from_random_states_converges(settings: Settings, keys: KeySet, new_keys: KeySet) -> None:
    # Seeded, so a failure is reproducible; every start state must reach Done, in shape, without
    # breaking an ordering invariant (FakeWorld asserts those), and a second pass must be a no-op.
    rng = random.Random(20261123)
    static = make_target(settings, keys, roles=("registry.pull", "viewer"))
    claim = make_target(settings, keys, discovered=PUBLIC_ISSUER, roles=("apk.pull",))
    for _ in range(300):
        target, other = (static, claim) if rng.random() < 0.5 else (claim, static)
        start = random_state(rng, target, other, new_keys)
        world = FakeWorld(target, NOW, refuse_static_updates=rng.random() < 0.2)
        labels, final, done = run(world, start, limit=16)
        assert_converged(target, final, NOW)
        assert run(world, final)[0] == [], labels
        if not start.force_rotation:
            # One write per identity: every drift found at once is fixed by a single update.
            assert all(count == 1 for count in world.updates.values()), labels
        wakes = (
            [renewal_due_at(final.identity.static_keys.expiration_time, target.static)]
            if (
                final.identity is not None
                and final.identity.static_keys is not None
                and final.identity.static_keys.expiration_time is not None
            )
            else []
        )
        wakes += [final.retire_after[old.uid] for old in final.retired]
        assert done == Done(wake_at=min(wakes) if wakes else None)
