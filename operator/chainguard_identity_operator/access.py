"""What a resource's pods get besides the identity: a pull secret, and a check that the exchange works.

Both need a token of the resource's service account — the pull secret's registry token is exchanged for
it, and the check presents one — and the operator gets those from the TokenRequest API. That API cannot
be limited by audience, so a cluster-wide grant would let the operator act as every service account
against the Kubernetes API. It has none: a tenant who turns either feature on grants the operator, in
their own namespace, ``create`` on ``serviceaccounts/token`` for that one service account, and what the
pull secret needs (``required_role`` renders it; a missing grant stalls the resource with it).

Every decision here is pure: ``decide_access`` says what to do next once the identity itself is in
shape — write (or refresh) the pull secret, drop one under an old name, add or remove it in the service
account's ``imagePullSecrets``, check the exchange — and ``access_conditions`` what the extra conditions
say. Tokens never pass through here; only when they expire and digests of what was written.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from chainguard_identity_operator.model import PullSecretSpec
from chainguard_identity_operator.status import ExchangeRecord
from chainguard_identity_operator.timestamps import format_time, parse_time

ANNOTATION_EXPIRES = "iam.chainguard.dev/token-expires-at"
ANNOTATION_IDENTITY = "iam.chainguard.dev/identity"
ANNOTATION_IDENTITY_UPDATED = "iam.chainguard.dev/identity-updated-at"
ANNOTATION_REGISTRY = "iam.chainguard.dev/registry"
ANNOTATION_DIGEST = "iam.chainguard.dev/config-sha256"  # of what was written: an edit changes it


@dataclasses.dataclass(frozen=True)
class AccessTarget:
    namespace: str
    service_account: str
    registry: str
    pull_secret: PullSecretSpec | None
    verify: bool
    verify_interval: datetime.timedelta


@dataclasses.dataclass(frozen=True)
class PullSecretFacts:
    """The pull secret as the cluster holds it (only when owned by the resource)."""

    annotations: Mapping[str, str]
    config_digest: str  # of the .dockerconfigjson it holds now


@dataclasses.dataclass(frozen=True)
class AccessObserved:
    identity_id: str
    identity_updated_at: str
    secret: PullSecretFacts | None = None
    stale_secrets: tuple[str, ...] = ()  # owned, under a name the spec no longer uses (or turned off)
    account_pull_secrets: tuple[str, ...] | None = None  # the service account's; None when it is missing
    attached_to: str | None = None  # the account the operator added the secret to, as status records
    exchange: ExchangeRecord | None = None
    refresh_failed: str | None = None  # the STS's answer when a refresh failed in this pass
    checked: bool = False  # the exchange was checked in this pass


# -- actions ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WritePullSecret:
    name: str
    reason: str  # "missing", "expiring", "identity-changed", "edited", "registry-changed"


@dataclasses.dataclass(frozen=True)
class DeletePullSecret:
    name: str


@dataclasses.dataclass(frozen=True)
class ListPullSecret:
    """Add (``listed``) or remove the pull secret in the service account's imagePullSecrets."""

    account: str
    name: str
    listed: bool


@dataclasses.dataclass(frozen=True)
class VerifyExchange:
    reason: str  # "never", "identity-changed", "failed", "due"


@dataclasses.dataclass(frozen=True)
class AccessDone:
    wake_at: datetime.datetime | None


AccessAction = WritePullSecret | DeletePullSecret | ListPullSecret | VerifyExchange | AccessDone


def config_json(registry: str, token: str) -> bytes:
    """The .dockerconfigjson a kubelet (or any registry client) reads: basic auth ``_token:<token>``."""
    auth = base64.b64encode(f"_token:{token}".encode()).decode()
    return json.dumps({"auths": {registry: {"auth": auth}}}, sort_keys=True, separators=(",", ":")).encode()


def digest(config: bytes) -> str:
    return "sha256:" + hashlib.sha256(config).hexdigest()


def secret_annotations(
    *, registry: str, identity_id: str, identity_updated_at: str, expires_at: datetime.datetime, config: bytes
) -> dict[str, str]:
    return {
        ANNOTATION_REGISTRY: registry,
        ANNOTATION_IDENTITY: identity_id,
        ANNOTATION_IDENTITY_UPDATED: identity_updated_at,
        ANNOTATION_EXPIRES: format_time(expires_at),
        ANNOTATION_DIGEST: digest(config),
    }


def token_expiry(secret: PullSecretFacts | None) -> datetime.datetime | None:
    if secret is None:
        return None
    try:
        return parse_time(secret.annotations.get(ANNOTATION_EXPIRES))
    except ValueError:
        return None


def _refresh_reason(
    target: AccessTarget, spec: PullSecretSpec, observed: AccessObserved, now: datetime.datetime
) -> tuple[str | None, datetime.datetime | None]:
    """Why the pull secret must be written now (None: it need not), and when it must be next."""
    secret = observed.secret
    if secret is None:
        return "missing", None
    notes = secret.annotations
    expires = token_expiry(secret)
    due = expires - spec.refresh_before if expires is not None else None
    if notes.get(ANNOTATION_DIGEST) != secret.config_digest:
        return "edited", due
    if notes.get(ANNOTATION_REGISTRY) != target.registry:
        return "registry-changed", due
    if (notes.get(ANNOTATION_IDENTITY), notes.get(ANNOTATION_IDENTITY_UPDATED)) != (
        observed.identity_id,
        observed.identity_updated_at,
    ):
        return "identity-changed", due  # replaced, renewed, or re-keyed
    if due is None or now >= due:
        return "expiring", due
    return None, due


def decide_access(target: AccessTarget, observed: AccessObserved, now: datetime.datetime) -> AccessAction:
    """The next step once the identity is in shape. Refreshing comes first (pods pull with it), then
    tidying up, then the service account's list, then the check that the exchange works."""
    wakes: list[datetime.datetime] = []
    spec = target.pull_secret
    if spec is not None and observed.refresh_failed is None:
        reason, due = _refresh_reason(target, spec, observed, now)
        if reason is not None:
            return WritePullSecret(name=spec.name, reason=reason)
        if due is not None:
            wakes.append(due)
    for name in observed.stale_secrets:
        return DeletePullSecret(name=name)
    account = observed.account_pull_secrets
    wanted = spec is not None and spec.attach_to_service_account
    if account is not None:
        if wanted and spec is not None and spec.name not in account:
            return ListPullSecret(account=target.service_account, name=spec.name, listed=True)
        attached = observed.attached_to
        ours = attached is not None and attached in account
        if ours and (not wanted or spec is None or attached != spec.name):
            assert attached is not None
            return ListPullSecret(account=target.service_account, name=attached, listed=False)
    if target.verify:
        record = observed.exchange
        if record is None:
            return VerifyExchange(reason="never")
        if (record.identity_id, record.identity_updated_at) != (
            observed.identity_id,
            observed.identity_updated_at,
        ):
            return VerifyExchange(reason="identity-changed")
        if not record.ok and not observed.checked:
            return VerifyExchange(reason="failed")  # each pass, with its backoff: see access_retry
        next_check = record.verified_at + target.verify_interval
        if now >= next_check:
            return VerifyExchange(reason="due")
        wakes.append(next_check)
    return AccessDone(wake_at=min(wakes) if wakes else None)


# -- results ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SecretWritten:
    name: str
    annotations: Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class RefreshFailed:
    message: str


@dataclasses.dataclass(frozen=True)
class SecretDeleted:
    name: str


@dataclasses.dataclass(frozen=True)
class Listed:
    account: str
    name: str
    listed: bool


@dataclasses.dataclass(frozen=True)
class Checked:
    record: ExchangeRecord


AccessResult = SecretWritten | RefreshFailed | SecretDeleted | Listed | Checked


def fold_access(observed: AccessObserved, result: AccessResult) -> AccessObserved:
    match result:
        case SecretWritten(annotations=notes):
            secret = PullSecretFacts(annotations=dict(notes), config_digest=notes[ANNOTATION_DIGEST])
            return dataclasses.replace(observed, secret=secret)
        case RefreshFailed(message=message):
            return dataclasses.replace(observed, refresh_failed=message)
        case SecretDeleted(name=name):
            return dataclasses.replace(
                observed, stale_secrets=tuple(n for n in observed.stale_secrets if n != name)
            )
        case Listed(account=_, name=name, listed=listed):
            names = observed.account_pull_secrets or ()
            now_listed = (*names, name) if listed else tuple(n for n in names if n != name)
            return dataclasses.replace(
                observed, account_pull_secrets=now_listed, attached_to=name if listed else None
            )
        case Checked(record=record):
            return dataclasses.replace(observed, exchange=record, checked=True)
    raise ValueError(f"{type(result).__name__} is not an access result")


def access_retry(target: AccessTarget, observed: AccessObserved) -> bool:
    """Whether the pass must come again with the transient backoff although the identity is fine: a
    refresh failed (the old token may have minutes left), or the exchange does not work (a fix outside
    — keys repaired, permissions propagated — should show within seconds, not a verification interval)."""
    refresh = target.pull_secret is not None and observed.refresh_failed is not None
    record = observed.exchange
    return refresh or (target.verify and record is not None and not record.ok)


# -- what it says ---------------------------------------------------------------------------------------


def access_conditions(
    target: AccessTarget, observed: AccessObserved, now: datetime.datetime
) -> dict[str, tuple[str, str, str]]:
    """PullSecretReady and ExchangeVerified, for the features the resource turned on."""
    conditions: dict[str, tuple[str, str, str]] = {}
    spec = target.pull_secret
    if spec is not None:
        expires = token_expiry(observed.secret)
        if observed.refresh_failed is not None:
            left = (
                "the old token still serves"
                if expires is not None and expires > now
                else "no valid token is left"
            )
            conditions["PullSecretReady"] = (
                "False",
                "PullSecretRefreshFailing",
                f"refreshing Secret {spec.name} failed ({left}): {observed.refresh_failed}",
            )
        elif expires is not None and expires > now:
            conditions["PullSecretReady"] = (
                "True",
                "PullSecretCurrent",
                f"Secret {spec.name} holds a token for {target.registry} until {format_time(expires)}",
            )
        else:
            conditions["PullSecretReady"] = (
                "False",
                "PullSecretMissing",
                f"Secret {spec.name} has no valid token",
            )
    if target.verify:
        record = observed.exchange
        if record is None:
            conditions["ExchangeVerified"] = (
                "Unknown",
                "NotChecked",
                "the exchange has not been checked yet",
            )
        elif record.ok:
            conditions["ExchangeVerified"] = (
                "True",
                "ExchangeVerified",
                f"a token of {target.namespace}/{target.service_account} exchanged for {record.identity_id} at "
                f"{format_time(record.verified_at)}",
            )
        else:
            conditions["ExchangeVerified"] = ("False", "ExchangeFailed", record.message)
    return conditions


def required_role(
    *,
    namespace: str,
    service_account: str,
    pull_secret: PullSecretSpec | None,
    operator_namespace: str,
    operator_service_account: str,
    resource: str,
) -> list[dict[str, Any]]:
    """The Role (and RoleBinding) a tenant applies in their namespace so the operator may do what
    ``spec.pullSecret`` and ``spec.verifyExchange`` need — for this one service account and Secret."""
    rules: list[dict[str, Any]] = [
        {
            "apiGroups": [""],
            "resources": ["serviceaccounts/token"],
            "resourceNames": [service_account],
            "verbs": ["create"],
        }
    ]
    if pull_secret is not None:
        rules += [
            {
                "apiGroups": [""],
                "resources": ["secrets"],
                "resourceNames": [pull_secret.name],
                "verbs": ["get", "patch", "delete"],
            },
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        ]
        if pull_secret.attach_to_service_account:
            rules.append(
                {
                    "apiGroups": [""],
                    "resources": ["serviceaccounts"],
                    "resourceNames": [service_account],
                    "verbs": ["patch"],
                }
            )
    name = f"chainguard-identity-operator-{resource}"[:253]
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": name, "namespace": namespace},
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [
                {"kind": "ServiceAccount", "name": operator_service_account, "namespace": operator_namespace}
            ],
        },
    ]
