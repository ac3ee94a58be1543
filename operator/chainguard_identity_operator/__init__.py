"""Kubernetes operator that manages Chainguard assumable identities.

The package is laid out in layers: ``handlers`` (kopf only) calls ``reconcile`` (observe → decide →
act), which uses the pure ``decide`` core and two narrow clients: ``cluster`` for Kubernetes and
``chainguard`` for the Chainguard API and STS. The emulators used by the tests and the sandbox live
apart, in the ``cgid_testkit`` distribution (``testkit/``), and never ship with the operator.
"""

__version__ = "0.1.0"
