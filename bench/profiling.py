"""Where the operator's CPU and memory go: py-spy's samples and tracemalloc's snapshots, summarised.

py-spy (``--py-spy DIR``) records the operator process during each busy phase in its ``raw`` format
(collapsed stacks, one ``frame;frame;...;leaf count`` line per distinct stack; only threads that were
running, idle ones are left out). Each sample is charged to the *package* of its leaf frame ("self"),
and, separately, once to every package on its stack ("inclusive"): the first says what code burns the
CPU, the second which layer asked for it. tracemalloc snapshots (``--tracemalloc``) are grouped by
package too.
"""

from __future__ import annotations

import collections
import pathlib
import re
import sysconfig
import tracemalloc
from collections.abc import Iterable

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_STDLIB = sysconfig.get_paths()["stdlib"]


def package_of(path: str) -> str:
    """``httpcore``, ``kopf``, ``asyncio``, ``chainguard_identity_operator.reconcile``, ...: who wrote it.

    py-spy names a file relative to its ``sys.path`` entry (``kopf/_core/reactor/queueing.py``,
    ``ssl.py``); tracemalloc gives the full path. Either way the package is the first component below
    site-packages or the standard library; the operator's own code is named by module.
    """
    if path.startswith("<"):
        return path  # <frozen importlib._bootstrap> and the like
    for root in ("site-packages/", "/lib/python3"):
        if root in path:
            path = path.split(root, 1)[1]
            if root == "/lib/python3":
                path = path.split("/", 1)[-1]
            break
    else:
        if path.startswith("/"):
            marker = "/chainguard_identity_operator/"
            path = "chainguard_identity_operator/" + path.split(marker, 1)[1] if marker in path else path
    head, _, rest = path.partition("/")
    if head == "chainguard_identity_operator":
        return "chainguard_identity_operator." + rest.removesuffix(".py").replace("/", ".")
    return head.removesuffix(".py")


# The layer a sample is charged to: the innermost frame that is not the standard library decides
# (json decoding under kopf is kopf's cost; a dataclass __init__ under the reconcile is the operator's).
LAYERS = {
    "httpx": "Chainguard HTTP client (httpx, httpcore, anyio, h11)",
    "httpcore": "Chainguard HTTP client (httpx, httpcore, anyio, h11)",
    "anyio": "Chainguard HTTP client (httpx, httpcore, anyio, h11)",
    "h11": "Chainguard HTTP client (httpx, httpcore, anyio, h11)",
    "kubernetes": "kubernetes client (kubernetes, urllib3, pydantic)",
    "urllib3": "kubernetes client (kubernetes, urllib3, pydantic)",
    "pydantic": "kubernetes client (kubernetes, urllib3, pydantic)",
    "pydantic_core": "kubernetes client (kubernetes, urllib3, pydantic)",
    "dateutil": "kubernetes client (kubernetes, urllib3, pydantic)",
    "kopf": "kopf (watching, patching, handler machinery) and its aiohttp",
    "aiohttp": "kopf (watching, patching, handler machinery) and its aiohttp",
    "aiohappyeyeballs": "kopf (watching, patching, handler machinery) and its aiohttp",
    "multidict": "kopf (watching, patching, handler machinery) and its aiohttp",
    "yarl": "kopf (watching, patching, handler machinery) and its aiohttp",
    "jsonpatch": "kopf (watching, patching, handler machinery) and its aiohttp",
    "jsonpointer": "kopf (watching, patching, handler machinery) and its aiohttp",
    "jwt": "operator code",
    "cryptography": "operator code",
}
_LIBRARY = frozenset(LAYERS)


def layer_of(frames: list[tuple[str, str]]) -> str:
    for _function, path in reversed(frames):
        package = package_of(path)
        if package.startswith("chainguard_identity_operator"):
            # The metrics server and registry are the operator's too, but worth seeing apart.
            return "operator: metrics" if package.endswith(".metrics") else "operator code"
        if package in _LIBRARY:
            return LAYERS[package]
    return "asyncio and the rest of the standard library"


def _frames(stack: str) -> list[tuple[str, str]]:
    frames = []
    for frame in stack.split(";"):
        match = _FRAME.match(frame.strip())
        if match is None:
            frames.append((frame.strip(), "?"))
        else:
            frames.append((match["function"], match["file"]))
    return frames


def summarize_collapsed(lines: Iterable[str], top: int = 25) -> dict[str, object]:
    """Self and inclusive shares by package, and the hottest leaf functions, of py-spy's raw output."""
    self_by_package: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    ours_inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    layers: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        line = line.strip()
        if not line:
            continue
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = [frame for frame in _frames(stack) if not frame[0].startswith(("thread (", "process "))]
        if not frames:
            continue
        total += count
        # Executor threads (the kubernetes client's calls, via asyncio.to_thread) start in threading.
        threads["executor threads" if frames[0][0] == "Thread._bootstrap" else "main (event loop)"] += count
        layers[layer_of(frames)] += count
        function, path = frames[-1]
        package = package_of(path)
        self_by_package[package] += count
        leaves[f"{package}: {function}"] += count
        for name in {package_of(p) for _, p in frames}:
            inclusive[name] += count
        for name in {f"{package_of(p)}.{f}" for f, p in frames if "chainguard_identity_operator" in p}:
            ours_inclusive[name] += count

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100.0 * value / total, 1)) for name, value in counter.most_common(top)]

    return {
        "samples": total,
        "by_thread_pct": share(threads),
        "by_layer_pct": share(layers),
        "self_by_package_pct": share(self_by_package),
        "inclusive_by_package_pct": share(inclusive),
        "top_leaf_functions_pct": share(leaves),
        "operator_functions_inclusive_pct": share(ours_inclusive),
    }


def summarize_tracemalloc(path: pathlib.Path, top: int = 20) -> dict[str, object]:
    snapshot = tracemalloc.Snapshot.load(str(path))
    by_package: collections.Counter[str] = collections.Counter()
    for stat in snapshot.statistics("filename"):
        by_package[package_of(stat.traceback[0].filename)] += stat.size
    lines = snapshot.statistics("lineno")[:top]
    traced = sum(by_package.values())
    mib = 1024 * 1024
    return {
        "traced_mib": round(traced / mib, 1),
        "by_package_mib": [(name, round(size / mib, 1)) for name, size in by_package.most_common(top)],
        "top_lines_mib": [
            (
                f"{package_of(s.traceback[0].filename)}:{s.traceback[0].lineno}",
                round(s.size / mib, 2),
                s.count,
            )
            for s in lines
        ],
    }


def diff_tracemalloc(
    before: pathlib.Path, after: pathlib.Path, top: int = 20
) -> list[tuple[str, float, int]]:
    """What grew between two snapshots, by line: (package:line, MiB, blocks)."""
    old = tracemalloc.Snapshot.load(str(before))
    new = tracemalloc.Snapshot.load(str(after))
    mib = 1024 * 1024
    return [
        (
            f"{package_of(s.traceback[0].filename)}:{s.traceback[0].lineno}",
            round(s.size_diff / mib, 2),
            s.count_diff,
        )
        for s in new.compare_to(old, "lineno")[:top]
    ]


def main(argv: list[str]) -> int:
    """``python bench/profiling.py FILE...``: the summary of py-spy raw files, as JSON."""
    import json

    for name in argv:
        print(name)
        print(json.dumps(summarize_collapsed(pathlib.Path(name).read_text().splitlines()), indent=1))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
