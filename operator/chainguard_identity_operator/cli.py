"""Command line: ``run`` (the operator), ``sandbox`` (everything emulated, in one process), ``crd``, ``version``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pathlib
import sys

from chainguard_identity_operator import __version__


def _run(args: argparse.Namespace) -> int:
    import kopf

    from chainguard_identity_operator import handlers
    from chainguard_identity_operator.config import ConfigurationError, Settings
    from chainguard_identity_operator.runtime import Runtime

    try:
        settings = Settings.from_env(os.environ)
    except ConfigurationError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    runtime = Runtime.from_settings(settings)
    liveness = f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None
    asyncio.run(
        kopf.operator(
            registry=kopf.get_default_registry(),
            standalone=not args.peering,
            peering_name=args.peering or None,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            liveness_endpoint=liveness,
            memo=kopf.Memo(runtime=runtime),
        )
    )
    assert handlers.FINALIZER
    return 0


def _sandbox(args: argparse.Namespace) -> int:
    from chainguard_identity_operator.sandbox import run_sandbox

    logging.basicConfig(level=logging.WARNING if not args.verbose else logging.INFO)
    # The operator runs in a thread of the sandbox, where kopf cannot (and need not) handle signals.
    logging.getLogger("kopf._core.reactor.running").setLevel(logging.ERROR)
    return asyncio.run(run_sandbox(serve=args.serve, workdir=args.workdir))


def _crd(_: argparse.Namespace) -> int:
    from chainguard_identity_operator.crd import render_yaml

    sys.stdout.write(render_yaml())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chainguard-identity-operator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the operator (settings from CGID_* environment variables)")
    run.add_argument("--peering", default="", help="kopf peering name for HA (several replicas, one active)")
    run.set_defaults(func=_run)

    sandbox = commands.add_parser(
        "sandbox", help="run operator + emulated cluster + emulated Chainguard and show it"
    )
    sandbox.add_argument(
        "--serve", action="store_true", help="keep running and print URLs for kubectl and curl"
    )
    sandbox.add_argument("--workdir", type=pathlib.Path, default=None, help="where to write the kubeconfig")
    sandbox.add_argument("-v", "--verbose", action="store_true")
    sandbox.set_defaults(func=_sandbox)

    crd = commands.add_parser("crd", help="print the CustomResourceDefinition")
    crd.set_defaults(func=_crd)

    version = commands.add_parser("version", help="print the version")
    version.set_defaults(func=lambda _: print(__version__) or 0)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result
