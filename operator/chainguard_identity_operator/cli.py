"""Command line: ``run`` (the operator), ``crd``, ``version``.

The sandbox lives apart from the product, in the ``cgid_testkit`` distribution (``cgid-sandbox``), so no
emulator ships in the operator's wheel or image.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
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
    quiet_logs(settings.log_level)
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


# Below DEBUG, what these loggers say per request or per object is the operator's to say once per change
# of a resource's state (reconcile logs that line); their warnings and errors stay, except urllib3's.
_QUIET_BELOW_DEBUG = {
    # Every request at INFO: two megabytes a run at a thousand resources.
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
    # kopf's per-object account of its own work at INFO ("Handler 'spec_changed/spec' succeeded.",
    # "Creation is in progress.", "Daemon 'worker' succeeded." ...): two thousand lines per burst of edits.
    "kopf.objects": logging.WARNING,
    # A warning for every retry the kubernetes client makes on its own, three per call while an API
    # server restarts; the operator reports the failure they end in, once, with the same cause.
    "urllib3": logging.ERROR,
}


def quiet_logs(level: str) -> None:
    """At CGID_LOG_LEVEL INFO or above, quiet the libraries' per-request and per-object lines; at DEBUG
    everything is kept."""
    configured = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    if configured > logging.DEBUG:
        for name, quiet in _QUIET_BELOW_DEBUG.items():
            # Never louder than asked for: at ERROR, httpx's warnings stay out too.
            logging.getLogger(name).setLevel(max(quiet, configured))


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

    crd = commands.add_parser("crd", help="print the CustomResourceDefinition")
    crd.set_defaults(func=_crd)

    version = commands.add_parser("version", help="print the version")
    version.set_defaults(func=lambda _: print(__version__) or 0)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result
