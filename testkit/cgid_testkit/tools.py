"""The third-party clients the tests drive: where ``crane`` (go-containerregistry) is, and ``kubectl``.

They are built by ``hack/tools/build.sh`` (``make tools``, and ``make test`` first) from the Go module
proxy into a per-version cache folder, never committed. :func:`find_crane` looks where that script puts
them: the folder ``CGID_TOOLS_BIN`` names (``make test`` sets it to the script's output), then the
newest ``crane-<version>`` folder of the cache (``CGID_TOOLS_CACHE``, default
``~/.cache/chainguard-identity-operator/tools``).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "hack" / "tools" / "build.sh"
DEFAULT_CACHE = pathlib.Path.home() / ".cache" / "chainguard-identity-operator" / "tools"
_VERSIONED = re.compile(r"^crane-v(\d+)\.(\d+)\.(\d+)$")


class ToolUnavailable(Exception):
    """A tool was asked for explicitly (an environment variable) and is not there."""


def find_crane(env: Mapping[str, str] = os.environ) -> pathlib.Path | None:
    """The crane binary: in ``CGID_TOOLS_BIN``, else the cache's newest version; None when none."""
    folder = env.get("CGID_TOOLS_BIN")
    if folder:
        crane = pathlib.Path(folder) / "crane"
        if not _executable(crane):
            raise ToolUnavailable(f"CGID_TOOLS_BIN={folder} holds no crane")
        return crane
    cache = pathlib.Path(env.get("CGID_TOOLS_CACHE") or DEFAULT_CACHE)
    if not cache.is_dir():
        return None
    versions = []
    for entry in cache.iterdir():
        match = _VERSIONED.fullmatch(entry.name)
        if match is not None and _executable(entry / "crane"):
            versions.append((tuple(int(part) for part in match.groups()), entry / "crane"))
    return max(versions)[1] if versions else None


def _executable(path: pathlib.Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


async def kubectl(
    kubeconfig: pathlib.Path, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120.0
) -> str:
    """Run the real ``kubectl`` as a subprocess of the event loop (which goes on serving the emulators
    meanwhile) and return what it printed; a failure raises, with kubectl's own words, unless not ``check``."""
    binary = shutil.which("kubectl")
    assert binary, "kubectl is needed on PATH"
    process = await asyncio.create_subprocess_exec(
        binary,
        f"--kubeconfig={kubeconfig}",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(
        process.communicate(stdin.encode() if stdin is not None else None), timeout=timeout
    )
    if check and process.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {err.decode().strip()}")
    return out.decode()


def kubectl_sync(
    kubeconfig: pathlib.Path, *args: str, stdin: str | None = None, timeout: float = 120.0
) -> str:
    """``kubectl``, blocking: for set-up before an event loop (and the operator in it) runs."""
    binary = shutil.which("kubectl")
    assert binary, "kubectl is needed on PATH"
    result = subprocess.run(
        [binary, f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


# What the tests and the bench install from the rendered deploy/: the operator runs in their process.
INSTALLED_KINDS = frozenset(
    {"Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
)


def install_deploy(
    kubeconfig: pathlib.Path, *, field_manager: str, timeout: float = 120.0, established_within: float = 120.0
) -> list[dict[str, Any]]:
    """deploy/'s Namespace, CRD and RBAC, rendered by ``kubectl kustomize`` and applied as an admin
    applies them (server-side: idempotent, so several installs on one cluster agree), the CRD waited for
    until Established; what was applied."""
    rendered = [
        doc
        for doc in yaml.safe_load_all(
            kubectl_sync(kubeconfig, "kustomize", str(ROOT / "deploy"), timeout=timeout)
        )
        if doc and doc["kind"] in INSTALLED_KINDS
    ]
    assert {doc["kind"] for doc in rendered} == INSTALLED_KINDS
    kubectl_sync(
        kubeconfig,
        "apply",
        "--server-side",
        "--force-conflicts",
        f"--field-manager={field_manager}",
        "-f",
        "-",
        stdin=yaml.safe_dump_all(rendered),
        timeout=timeout,
    )
    for doc in rendered:
        if doc["kind"] == "CustomResourceDefinition":
            kubectl_sync(
                kubeconfig,
                "wait",
                "--for=condition=Established",
                f"crd/{doc['metadata']['name']}",
                f"--timeout={int(established_within)}s",
                timeout=timeout,
            )
    return rendered
