"""The README's first command: the sandbox runs every check it prints and says they passed."""

from __future__ import annotations

import pytest

from cgid_testkit.sandbox import run_sandbox

pytestmark = pytest.mark.timeout(180)


async def test_the_sandbox_passes_its_own_checks(capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_sandbox(serve=False, workdir=None) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("sandbox: all checks passed")
    for shown in (
        "another service account is refused, as it should be",
        "PullSecretReady  True PullSecretCurrent",
        "ExchangeVerified True ExchangeVerified",
        "python:latest with it: OK, manifest sha256:",
        "adopted=True",
        "the operator's identity is untouched; the tenant's token is refused for it",
    ):
        assert shown in out
    assert "wrong!" not in out
