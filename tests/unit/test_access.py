"""The pull secret and the exchange check, decided without I/O: ``access.decide_access`` and friends."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json

import pytest

from chainguard_identity_operator.access import (
    ANNOTATION_DIGEST,
    AccessDone,
    AccessObserved,
    AccessTarget,
    Checked,
    DeletePullSecret,
    Listed,
    ListPullSecret,
    PullSecretFacts,
    RefreshFailed,
    SecretWritten,
    VerifyExchange,
    WritePullSecret,
    access_conditions,
    access_retry,
    config_json,
    decide_access,
    digest,
    fold_access,
    required_role,
    secret_annotations,
)
from chainguard_identity_operator.model import PullSecretSpec
from chainguard_identity_operator.status import ExchangeRecord

UTC = datetime.UTC
NOW = datetime.datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
ID = "c95870ebffa72a258df087ea727ee92daf177e29/0123456789abcdef"
UPDATED = "2026-11-23T09:00:00+00:00"
SPEC = PullSecretSpec(name="puller-pull", attach_to_service_account=True)
TARGET = AccessTarget(
    namespace="shop",
    service_account="default",
    registry="cgr.dev",
    pull_secret=SPEC,
    verify=True,
    verify_interval=datetime.timedelta(hours=1),
)


def written(
    expires: datetime.datetime = NOW + datetime.timedelta(minutes=55), **changes: str
) -> PullSecretFacts:
    config = config_json("cgr.dev", "header.payload.signature")
    notes = {
        **secret_annotations(
            registry="cgr.dev", identity_id=ID, identity_updated_at=UPDATED, expires_at=expires, config=config
        ),
        **changes,
    }
    return PullSecretFacts(annotations=notes, config_digest=digest(config))


def checked(at: datetime.datetime = NOW, ok: bool = True) -> ExchangeRecord:
    return ExchangeRecord(ID, UPDATED, at, ok, "" if ok else "verifying token: failed to verify signature")


def settled(**changes: object) -> AccessObserved:
    observed = AccessObserved(
        identity_id=ID,
        identity_updated_at=UPDATED,
        secret=written(),
        account_pull_secrets=("other", "puller-pull"),
        attached_to="puller-pull",
        exchange=checked(),
    )
    return dataclasses.replace(observed, **changes)  # type: ignore[arg-type]


def test_the_registry_credential_is_what_a_kubelet_reads() -> None:
    config = json.loads(config_json("cgr.dev", "a.b.c"))
    assert config == {"auths": {"cgr.dev": {"auth": base64.b64encode(b"_token:a.b.c").decode()}}}


def test_a_settled_resource_needs_nothing_until_its_token_is_due() -> None:
    action = decide_access(TARGET, settled(), NOW)
    refresh_at = NOW + datetime.timedelta(minutes=45)  # 55 minutes left, refreshed 10 before
    assert action == AccessDone(wake_at=refresh_at)


@pytest.mark.parametrize(
    ("secret", "reason"),
    [
        (None, "missing"),
        (written(NOW + datetime.timedelta(minutes=9)), "expiring"),  # within refreshBefore (10m)
        (written(NOW - datetime.timedelta(minutes=1)), "expiring"),
        (written(**{"iam.chainguard.dev/identity": ID[:-1] + "0"}), "identity-changed"),  # replaced
        (
            written(**{"iam.chainguard.dev/identity-updated-at": "2026-11-01T00:00:00+00:00"}),
            "identity-changed",
        ),
        (written(**{"iam.chainguard.dev/registry": "registry.old"}), "registry-changed"),
        (written(**{ANNOTATION_DIGEST: "sha256:edited"}), "edited"),
        (written(**{"iam.chainguard.dev/token-expires-at": "not a time"}), "expiring"),
    ],
)
def test_the_pull_secret_is_written_when_it_must_be(secret: PullSecretFacts | None, reason: str) -> None:
    assert decide_access(TARGET, settled(secret=secret), NOW) == WritePullSecret(
        name="puller-pull", reason=reason
    )


def test_an_edited_secret_is_noticed_by_its_digest() -> None:
    edited = dataclasses.replace(written(), config_digest=digest(b'{"auths":{}}'))
    assert decide_access(TARGET, settled(secret=edited), NOW) == WritePullSecret("puller-pull", "edited")


def test_a_failed_refresh_is_not_retried_in_the_same_pass() -> None:
    observed = settled(secret=written(NOW + datetime.timedelta(minutes=5)), refresh_failed="STS said no")
    action = decide_access(TARGET, observed, NOW)
    assert not isinstance(action, WritePullSecret)


def test_an_old_name_is_deleted_after_the_new_one_is_written() -> None:
    observed = settled(stale_secrets=("old-pull",))
    assert decide_access(TARGET, observed, NOW) == DeletePullSecret("old-pull")
    assert decide_access(TARGET, settled(secret=None, stale_secrets=("old-pull",)), NOW) == WritePullSecret(
        "puller-pull", "missing"
    )


def test_attaching_adds_the_entry_once_and_leaves_the_others() -> None:
    observed = settled(account_pull_secrets=("other",), attached_to=None)
    assert decide_access(TARGET, observed, NOW) == ListPullSecret("default", "puller-pull", listed=True)
    after = fold_access(observed, Listed("default", "puller-pull", listed=True))
    assert after.account_pull_secrets == ("other", "puller-pull")
    assert after.attached_to == "puller-pull"
    assert isinstance(decide_access(TARGET, after, NOW), AccessDone)


def test_turning_attach_off_removes_only_the_entry_the_operator_added() -> None:
    detached = dataclasses.replace(
        TARGET, pull_secret=dataclasses.replace(SPEC, attach_to_service_account=False)
    )
    assert decide_access(detached, settled(), NOW) == ListPullSecret("default", "puller-pull", listed=False)
    # An entry of the same name that someone else put there (status records nothing) is left alone.
    theirs = settled(attached_to=None)
    assert isinstance(decide_access(detached, theirs, NOW), AccessDone)


def test_turning_the_pull_secret_off_deletes_it_and_its_entry() -> None:
    off = dataclasses.replace(TARGET, pull_secret=None)
    observed = settled(stale_secrets=("puller-pull",))
    assert decide_access(off, observed, NOW) == DeletePullSecret("puller-pull")
    gone = fold_access(observed, Listed("default", "puller-pull", listed=False))
    assert decide_access(off, dataclasses.replace(gone, stale_secrets=()), NOW) == AccessDone(
        wake_at=NOW + datetime.timedelta(hours=1)
    )


def test_the_exchange_is_checked_first_then_after_every_change_then_periodically() -> None:
    assert decide_access(TARGET, settled(exchange=None), NOW) == VerifyExchange("never")
    changed = dataclasses.replace(checked(), identity_updated_at="2026-11-01T00:00:00+00:00")
    assert decide_access(TARGET, settled(exchange=changed), NOW) == VerifyExchange("identity-changed")
    old = checked(NOW - datetime.timedelta(hours=1))
    assert decide_access(TARGET, settled(exchange=old), NOW) == VerifyExchange("due")
    off = dataclasses.replace(TARGET, verify=False)
    assert isinstance(decide_access(off, settled(exchange=None), NOW), AccessDone)


def test_fold_records_what_was_written_and_checked() -> None:
    notes = dict(written().annotations)
    after = fold_access(settled(secret=None), SecretWritten("puller-pull", notes))
    assert after.secret == PullSecretFacts(annotations=notes, config_digest=notes[ANNOTATION_DIGEST])
    failed = fold_access(settled(), RefreshFailed("nope"))
    assert failed.refresh_failed == "nope"
    record = checked(ok=False)
    assert fold_access(settled(), Checked(record)).exchange == record


def test_conditions_say_what_serves_and_what_failed() -> None:
    ok = access_conditions(TARGET, settled(), NOW)
    assert ok["PullSecretReady"][0:2] == ("True", "PullSecretCurrent")
    assert ok["ExchangeVerified"][0:2] == ("True", "ExchangeVerified")
    failing = access_conditions(TARGET, settled(refresh_failed="STS: forbidden"), NOW)
    assert failing["PullSecretReady"][0:2] == ("False", "PullSecretRefreshFailing")
    assert "the old token still serves" in failing["PullSecretReady"][2]
    expired = settled(secret=written(NOW - datetime.timedelta(minutes=1)), refresh_failed="STS: forbidden")
    assert "no valid token is left" in access_conditions(TARGET, expired, NOW)["PullSecretReady"][2]
    broken = access_conditions(TARGET, settled(exchange=checked(ok=False)), NOW)["ExchangeVerified"]
    assert broken == ("False", "ExchangeFailed", "verifying token: failed to verify signature")
    assert "ExchangeVerified" not in access_conditions(
        dataclasses.replace(TARGET, verify=False), settled(), NOW
    )


def test_the_role_a_tenant_grants_names_one_service_account_and_one_secret() -> None:
    role, binding = required_role(
        namespace="shop",
        service_account="builder",
        pull_secret=SPEC,
        operator_namespace="chainguard-system",
        operator_service_account="chainguard-identity-operator",
        resource="puller",
    )
    assert role["kind"] == "Role"
    assert role["metadata"]["namespace"] == "shop"
    rules = {
        (tuple(r["resources"]), tuple(r.get("resourceNames", ())), tuple(r["verbs"])) for r in role["rules"]
    }
    assert rules == {
        (("serviceaccounts/token",), ("builder",), ("create",)),
        (("secrets",), ("puller-pull",), ("get", "patch", "delete")),
        (("secrets",), (), ("create",)),  # a create names no object: it cannot be limited by name
        (("serviceaccounts",), ("builder",), ("patch",)),
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "chainguard-identity-operator", "namespace": "chainguard-system"}
    ]
    verify_only, _ = required_role(
        namespace="shop",
        service_account="builder",
        pull_secret=None,
        operator_namespace="chainguard-system",
        operator_service_account="chainguard-identity-operator",
        resource="puller",
    )
    assert [r["resources"] for r in verify_only["rules"]] == [["serviceaccounts/token"]]


def test_a_failed_check_is_tried_again_on_the_next_pass_not_an_hour_later() -> None:
    """A failed exchange check (the STS said no) is retried with the pass's backoff, once per pass:
    waiting a verification interval would leave a fixed identity reported broken for an hour."""
    failed = settled(exchange=checked(NOW - datetime.timedelta(seconds=5), ok=False))
    assert decide_access(TARGET, failed, NOW) == VerifyExchange("failed")
    again = fold_access(failed, Checked(checked(NOW, ok=False)))
    assert isinstance(decide_access(TARGET, again, NOW), AccessDone)  # once per pass: no hot loop
    assert access_retry(TARGET, again)
    fixed = fold_access(failed, Checked(checked(NOW)))
    assert isinstance(decide_access(TARGET, fixed, NOW), AccessDone)
    assert not access_retry(TARGET, fixed)


def test_a_failed_refresh_asks_for_the_backoff_and_a_settled_resource_does_not() -> None:
    assert not access_retry(TARGET, settled())
    assert access_retry(TARGET, settled(refresh_failed="STS said no"))
    assert not access_retry(dataclasses.replace(TARGET, verify=False), settled(exchange=checked(ok=False)))
