"""The operator's own command line, under tracemalloc: where its memory goes (``--tracemalloc``).

Started by the bench instead of ``chainguard-identity-operator run`` (same code, same CGID_* settings,
its own process). tracemalloc starts before anything is imported, so the imports' allocations are
counted too; each SIGUSR1 writes a snapshot to ``$BENCH_TRACEMALLOC_DIR/snapshot-<n>.tracemalloc`` and
then touches ``snapshot-<n>.done``. Tracing slows the process and costs memory of its own: the RSS and
CPU of such a run are not the operator's figures, only the split of its Python allocations is.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import tracemalloc
from types import FrameType


def main() -> int:
    tracemalloc.start(int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "1")))
    folder = pathlib.Path(os.environ["BENCH_TRACEMALLOC_DIR"])
    taken = 0

    def dump(_signum: int, _frame: FrameType | None) -> None:
        nonlocal taken
        taken += 1
        path = folder / f"snapshot-{taken}.tracemalloc"
        tracemalloc.take_snapshot().dump(str(path))
        path.with_suffix(".done").touch()

    signal.signal(signal.SIGUSR1, dump)
    from chainguard_identity_operator.cli import main as cli

    return cli(["run"])


if __name__ == "__main__":
    sys.exit(main())
