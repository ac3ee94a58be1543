"""The test kit: emulators of the outside world, the in-process harness and the sandbox.

It is a distribution of its own (``testkit/pyproject.toml``), installed beside the operator for the
tests, the sandbox and the bench, and never part of the operator's wheel or image. It may import the
operator; the operator never imports it (an import-linter contract in ``make lint`` checks both).
"""
