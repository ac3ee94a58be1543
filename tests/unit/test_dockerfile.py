"""The image recipe, checked without a container runtime: the Dockerfile is parsed and its properties
asserted — two stages, a slim base, only the built wheels installed, a numeric non-root user that the
Deployment also runs as, no bytecode writes on a read-only root, the operator's ``run`` command as entry
point, and the liveness and metrics ports the operator defaults to. ``.dockerignore`` keeps the build
context to what the build copies.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import pathlib
import pwd
import re
import shlex
import tomllib
from typing import Any

import pytest
import yaml
from kopf._core.engines import peering  # where kopf names the running operator instance

from chainguard_identity_operator import cli
from chainguard_identity_operator.config import Settings

ROOT = pathlib.Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for instruction, args in self.instructions if instruction == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in stage {self.name or self.base}"
        return found[-1]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage: comments dropped, continuations joined, global ARG defaults substituted."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"

    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, value = rest.partition("=")
            args[name] = value
            continue
        if keyword == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--platform")]
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=image, name=name))
            continue
        assert stages, f"{keyword} before the first FROM"
        stages[-1].instructions.append((keyword, rest))
    return stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec form (a JSON list), not {args!r}"
    return [str(item) for item in value]


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for word in shlex.split(args):
            key, sep, value = word.partition("=")
            assert sep, f"ENV {args!r}: use KEY=value"
            env[key] = value
    return env


def default(field: str) -> Any:
    return next(f.default for f in dataclasses.fields(Settings) if f.name == field)


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_it_is_a_multi_stage_build_on_a_slim_python(stages: list[Stage], pyproject: dict[str, Any]) -> None:
    assert len(stages) >= 2
    build, final = stages[0], stages[-1]
    assert build.name
    for stage in (build, final):
        repository, _, tag = stage.base.partition(":")
        assert repository.rsplit("/", 1)[-1] == "python"
        assert "slim" in tag.split("-"), f"{stage.base} is not a slim image"
        version = tuple(int(part) for part in tag.split("-")[0].split("."))
        minimum = tuple(int(p) for p in pyproject["project"]["requires-python"].removeprefix(">=").split("."))
        assert version >= minimum


def test_the_final_stage_installs_the_built_wheels_and_nothing_else(
    stages: list[Stage], final: Stage, pyproject: dict[str, Any]
) -> None:
    build = stages[0]
    assert any(run.startswith("pip wheel") and run.split()[-1] == "." for run in build.all("RUN"))
    # No source, test or build file is copied into the final image.
    assert not final.all("ADD")
    assert all("--from=" in copy for copy in final.all("COPY"))
    installs = [run for run in final.all("RUN") if "pip install" in run]
    assert len(installs) == 1
    install = installs[0]
    assert f"from={build.name}" in install, "the wheels come from the build stage"
    assert "--no-index" in install, "nothing may be fetched from an index in the final stage"
    assert install.split()[-1] == pyproject["project"]["name"]


def test_it_runs_as_a_numeric_non_root_user_that_the_deployment_also_uses(final: Stage) -> None:
    user = final.last("USER")
    uid, _, gid = user.partition(":")
    # Numeric, so that the kubelet can verify runAsNonRoot.
    assert uid.isdigit(), user
    assert gid.isdigit(), user
    assert int(uid) != 0
    assert int(gid) != 0
    deployment = yaml.safe_load((ROOT / "deploy" / "base" / "deployment.yaml").read_text())
    security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid))
    # The user has a passwd entry: see test_kopf_needs_a_name_for_a_user_without_one.
    assert any(f"--uid {uid}" in run and "useradd" in run for run in final.all("RUN"))


def known_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def test_kopf_needs_a_name_for_a_user_without_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the image adds a passwd entry and the Deployment sets POD_ID: kopf names the operator
    instance after ``getpass.getuser()``, which fails for a uid unknown to /etc/passwd."""
    for variable in ("POD_ID", "LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(variable, raising=False)
    unknown = next(uid for uid in range(65532, 70000) if not known_uid(uid))
    monkeypatch.setattr(os, "getuid", lambda: unknown)
    with pytest.raises((KeyError, OSError)):
        peering.detect_own_id(manual=False)
    monkeypatch.setenv("POD_ID", "chainguard-identity-operator-5d8f7-x2x9q")
    assert peering.detect_own_id(manual=False) == "chainguard-identity-operator-5d8f7-x2x9q"


def test_it_works_with_a_read_only_root_filesystem(final: Stage) -> None:
    env = env_of(final)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    # Anything that wants a home directory gets the pod's writable /tmp.
    assert env["HOME"] == "/tmp"
    deployment = yaml.safe_load((ROOT / "deploy" / "base" / "deployment.yaml").read_text())
    (spec,) = deployment["spec"]["template"]["spec"]["containers"]
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in {mount["mountPath"] for mount in spec["volumeMounts"]}
    assert not final.all("VOLUME"), "a VOLUME would hide what the pod must mount explicitly"


def test_the_entry_point_runs_the_operator(
    final: Stage, pyproject: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    command = exec_form(final.last("ENTRYPOINT")) + exec_form(final.last("CMD"))
    assert command[0] in pyproject["project"]["scripts"]
    assert pyproject["project"]["scripts"][command[0]] == "chainguard_identity_operator.cli:main"
    seen: list[Any] = []
    monkeypatch.setattr(cli, "_run", lambda namespace: seen.append(namespace) or 0)
    assert cli.main(command[1:]) == 0
    assert [namespace.command for namespace in seen] == ["run"]


def test_it_exposes_the_liveness_and_metrics_ports(final: Stage) -> None:
    exposed = {int(port.split("/")[0]) for args in final.all("EXPOSE") for port in args.split()}
    assert {default("liveness_port"), default("metrics_port")} <= exposed
    healthcheck = final.last("HEALTHCHECK")
    assert "/healthz" in healthcheck
    assert "CGID_LIVENESS_PORT" in healthcheck


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.removeprefix("!").rstrip("/")
        regex = fnmatch.translate(glob).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def test_the_build_context_holds_only_what_the_build_copies(stages: list[Stage]) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [
        word
        for stage in stages
        for copy in stage.all("COPY")
        if "--from=" not in copy
        for word in copy.split()[:-1]
    ]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source.rstrip("/"), patterns), f"{source} is copied but ignored"
    assert not dockerignored("operator/chainguard_identity_operator/cli.py", patterns)
    for private in (".venv/bin/python", ".git/config", "tests/conftest.py", "sandbox-state/kubeconfig"):
        assert dockerignored(private, patterns), private
    assert dockerignored("operator/chainguard_identity_operator/__pycache__/cli.cpython-311.pyc", patterns)
