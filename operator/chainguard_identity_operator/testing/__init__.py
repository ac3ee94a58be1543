"""Emulators of the outside world (Chainguard, Kubernetes) shared by the tests and the sandbox."""
