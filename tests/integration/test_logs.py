"""What a person reads at CGID_LOG_LEVEL=INFO: one line per change of a resource's state, not kopf's
account of every handler it ran; and in ``kubectl get events``, what the operator did, not kopf's echo.

At a thousand resources kopf's per-object INFO lines ("Handler 'spec_changed/spec' succeeded.",
"Creation is in progress.", "Daemon 'worker' succeeded." ...) were two thousand lines per burst of edits
and drowned the operator's own. The real operator runs here with the logging ``run`` sets up.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from cgid_testkit.harness import World, world
from chainguard_identity_operator import cli
from chainguard_identity_operator.cluster import COMPONENT

pytestmark = pytest.mark.timeout(60)


def cr(name: str, namespace: str = "shop", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


@pytest.fixture
def run_logging(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> Iterator[str]:
    """The logging ``chainguard-identity-operator run`` sets up at CGID_LOG_LEVEL=``request.param``; the
    logger levels are put back afterwards (they are process-wide)."""
    level: str = request.param
    manager = logging.Logger.manager
    before = {name: logging.getLogger(name).level for name in list(manager.loggerDict)}
    caplog.set_level(level)
    cli.quiet_logs(level)
    try:
        yield level
    finally:
        for name in list(manager.loggerDict):
            logging.getLogger(name).setLevel(before.get(name, logging.NOTSET))


async def wait_roles(w: World, count: int) -> None:
    async def bound() -> bool:
        obj = await w.get("shop", "puller")
        return obj is not None and len((obj.get("status") or {}).get("roleBindings") or []) == count

    await w.wait_for(bound, what=f"{count} role binding(s) in status")


async def wait_gone(w: World) -> None:
    async def gone() -> bool:
        return await w.get("shop", "puller") is None

    await w.wait_for(gone, what="shop/puller to be finalized and removed")


def about_the_resource(record: logging.LogRecord) -> bool:
    # kopf's object loggers name the object in the record, not in the message.
    return record.name.startswith("kopf.objects") or "shop/puller" in record.getMessage()


@pytest.mark.parametrize("run_logging", ["INFO", "DEBUG"], indirect=True)
async def test_a_resource_s_life_is_a_line_per_change_at_info_and_kopf_posts_nothing(
    caplog: pytest.LogCaptureFixture, run_logging: str
) -> None:
    async with world() as w:
        await w.apply(cr("puller", parent=w.org))
        await w.wait_ready("shop", "puller")
        await w.apply(cr("puller", parent=w.org, roles=["registry.pull", "viewer"]))
        await wait_roles(w, 2)
        await w.wait_ready("shop", "puller")
        await w.delete("shop", "puller")
        await wait_gone(w)
        events = await w.events("shop")

    lines = [r for r in caplog.records if about_the_resource(r)]
    info = [f"{r.name}: {r.getMessage()}" for r in lines if r.levelno == logging.INFO]
    assert not [r.getMessage() for r in lines if r.levelno >= logging.WARNING]
    if run_logging == "INFO":
        # Ready (1 role), Ready (2 roles), deleted: the operator's own lines, one per change.
        assert len(info) <= 3, "\n".join(info)
        assert all(line.startswith("chainguard_identity_operator.") for line in info), "\n".join(info)
    else:
        # At DEBUG nothing is quieted: kopf's account is there for whoever debugs.
        assert any(line.startswith("kopf.objects: ") for line in info), "\n".join(info)

    # The operator's events say what happened; kopf posts none of its own for handlers that succeeded,
    # not even at DEBUG, where its INFO lines are logged: kopf 1.45 turns log lines into events only with
    # settings.posting.loggers (off by default), and the operator lets it post warnings at most.
    assert {e.get("source", {}).get("component") for e in events} == {COMPONENT}
    reasons = {e["reason"] for e in events}
    assert {"Created", "RoleBound", "Deleted"} <= reasons, reasons
    assert "Logging" not in reasons


@pytest.mark.parametrize(("level", "quiet"), [("INFO", True), ("WARNING", True), ("DEBUG", False)])
def test_kopf_s_per_object_lines_are_for_debug(level: str, quiet: bool) -> None:
    names = ("kopf.objects", "httpx", "httpcore", "urllib3")
    before = {name: logging.getLogger(name).level for name in names}
    try:
        for name in names:
            logging.getLogger(name).setLevel(logging.NOTSET)
        cli.quiet_logs(level)
        for name in names:
            assert (logging.getLogger(name).level >= logging.WARNING) is quiet, name
        # kopf's warnings and errors about an object (a handler failing, a daemon not exiting) stay.
        assert logging.getLogger("kopf.objects").isEnabledFor(logging.WARNING)
    finally:
        for name, value in before.items():
            logging.getLogger(name).setLevel(value)
