"""kopf handlers: the only module that knows kopf. Each handler translates one event into one call.

- startup: read settings (unless the caller put a runtime in ``memo``), tune kopf's storage names.
- login: hand kopf the same credentials the ``kubernetes`` client uses.
- daemon: one reconcile worker per ``ChainguardIdentity`` (create, resume, resync, renewal).
- update of ``spec``: wake the worker; it reconciles the new spec at once.
- delete: the finalizer — delete the identity unless orphaned; transient failures retry with backoff.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import kopf

from chainguard_identity_operator.config import Settings
from chainguard_identity_operator.crd import GROUP, PLURAL, VERSION
from chainguard_identity_operator.reconcile import ROTATE_ANNOTATION, DeletionBlocked
from chainguard_identity_operator.runtime import Runtime

FINALIZER = f"{GROUP}/finalizer"
# kopf ignores every annotation under its storage prefix when it diffs objects, so its bookkeeping lives
# under its own sub-domain: ``iam.chainguard.dev/rotate`` must stay visible to the update handler.
KOPF_PREFIX = f"kopf.{GROUP}"
RESOURCE = (GROUP, VERSION, PLURAL)


def _runtime(memo: kopf.Memo) -> Runtime:
    runtime = memo.get("runtime")
    if not isinstance(runtime, Runtime):
        raise kopf.PermanentError("the operator's runtime was not initialised")
    return runtime


def configure_kopf(settings: kopf.OperatorSettings, *, namespaced: bool = False) -> None:
    """Our own names for kopf's bookkeeping, and only warnings from kopf as Kubernetes events.

    ``namespaced`` (CGID_NAMESPACES is set): the namespaces are exact names, so kopf need not list
    namespaces to expand patterns — which the RBAC does not grant, and which kopf would otherwise retry
    for about a minute at every start before falling back to the names as given.
    """
    settings.scanning.disabled = namespaced
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    if not settings.peering.standalone and settings.peering.priority == 0:
        # kopf pauses every peer that sees another of the same priority: with replicas all at the
        # default 0 none would serve. A random priority per replica keeps exactly one active.
        settings.peering.priority = random.SystemRandom().randint(1, 2**31 - 1)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    if "runtime" not in memo:
        memo["runtime"] = Runtime.from_settings(Settings.from_env(os.environ))
    configure_kopf(settings, namespaced=bool(_runtime(memo).settings.namespaces))
    await _runtime(memo).start()


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    runtime = memo.get("runtime")
    if isinstance(runtime, Runtime):
        await runtime.aclose()


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    config = _runtime(memo).kube_configuration
    keys: dict[str, str] = dict(config.api_key or {})
    prefixes: dict[str, str] = dict(config.api_key_prefix or {})
    # The kubernetes client keeps "Bearer" either in the key itself or in a separate prefix table.
    header = keys.get("authorization") or keys.get("BearerToken") or ""
    prefix = prefixes.get("authorization") or prefixes.get("BearerToken") or ""
    if prefix and header and " " not in header:
        header = f"{prefix} {header}"
    scheme, _sep, token = header.partition(" ")
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
    )


# A stopped worker returns at once and leaves a pass under way for the finalizer to await
# (Runtime._pass): kopf cancelling the daemon would cut a Chainguard write off, and a daemon that lingers
# past kopf's instant-exit window gets the delete handler run twice.
@kopf.daemon(*RESOURCE, cancellation_timeout=10.0)
async def worker(stopped: kopf.DaemonStopped, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await _runtime(memo).run_worker(body, stopped)


@kopf.on.update(*RESOURCE, field="spec")
def spec_changed(uid: str, memo: kopf.Memo, **_: Any) -> None:
    _runtime(memo).wake(uid)


# A tuple, not a dotted string: the annotation key itself contains dots.
@kopf.on.update(*RESOURCE, field=("metadata", "annotations", ROTATE_ANNOTATION))
def rotation_requested(uid: str, memo: kopf.Memo, **_: Any) -> None:
    _runtime(memo).wake(uid)


@kopf.on.delete(*RESOURCE)
async def delete(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    runtime = _runtime(memo)
    try:
        await runtime.finalize(body)
    except DeletionBlocked as exc:
        raise kopf.TemporaryError(str(exc), delay=runtime.deletion_delay(retry, exc)) from None
