"""Operator settings from ``CGID_*`` variables: every variable is read, and every bad value fails the
start with a message that begins with the variable's name."""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
from typing import Any

import pytest

from chainguard_identity_operator.config import (
    DEFAULT_ALLOWED_ROLES,
    PREFIX,
    ConfigurationError,
    Settings,
)

IDENTITY = "c95870ebffa72a258df087ea727ee92daf177e29/f067a9080d45a098"
DEV = {"CGID_TOKEN_FILE": "/run/dev-token"}

# Every variable with a non-default value and the field value it must produce.
EVERY_VARIABLE: dict[str, tuple[str, object]] = {
    "CGID_CLUSTER_NAME": ("eu-west-2", "eu-west-2"),
    "CGID_API_URL": ("https://console-api.example.test", "https://console-api.example.test"),
    "CGID_ISSUER_URL": ("http://127.0.0.1:8081", "http://127.0.0.1:8081"),
    "CGID_REGISTRY": ("registry.example.test", "registry.example.test"),
    "CGID_IDENTITY": (IDENTITY, IDENTITY),
    "CGID_IDENTITY_TOKEN_PATH": ("/var/run/oidc/token", pathlib.Path("/var/run/oidc/token")),
    "CGID_KUBECONFIG": ("/home/me/.kube/config", pathlib.Path("/home/me/.kube/config")),
    "CGID_SERVICE_ACCOUNT_TOKEN_PATH": ("/tmp/sa-token", pathlib.Path("/tmp/sa-token")),
    "CGID_ISSUER": ("https://oidc.example.test/cluster", "https://oidc.example.test/cluster"),
    "CGID_ISSUER_PUBLIC": ("true", True),
    "CGID_PUBLIC_ISSUER_HOSTS": (
        "oidc.example.test, issuer.corp.test",
        ("oidc.example.test", "issuer.corp.test"),
    ),
    "CGID_ALLOWED_ROLES": ("registry.pull,registry.push", ("registry.pull", "registry.push")),
    "CGID_NAMESPACES": ("shop,,payments ", ("shop", "payments")),
    "CGID_JWKS_POLL_INTERVAL": ("1m", datetime.timedelta(minutes=1)),
    "CGID_RESYNC_INTERVAL": ("1h30m", datetime.timedelta(minutes=90)),
    "CGID_REQUEST_TIMEOUT": ("2.5s", datetime.timedelta(seconds=2.5)),
    "CGID_MAX_BACKOFF": ("10m", datetime.timedelta(minutes=10)),
    "CGID_BASE_BACKOFF": ("500ms", datetime.timedelta(milliseconds=500)),
    "CGID_REPLACEMENT_GRACE": ("2m", datetime.timedelta(minutes=2)),
    "CGID_LIVENESS_PORT": ("8181", 8181),
    "CGID_METRICS_PORT": ("0", 0),  # 0 disables the metrics endpoint
    "CGID_LOG_LEVEL": ("DEBUG", "DEBUG"),
    "CGID_CLUSTER_ID": ("3f0c5a8e-1b2d-4c6e-9f7a-0b1c2d3e4f5a", "3f0c5a8e-1b2d-4c6e-9f7a-0b1c2d3e4f5a"),
    "CGID_OPERATOR_NAMESPACE": ("identity-system", "identity-system"),
    "CGID_IDENTITY_CONFIG_MAP": ("operator-chainguard-identity", "operator-chainguard-identity"),
    "CGID_ADOPTION_NAMESPACES": ("identity-system, platform", ("identity-system", "platform")),
    "CGID_ADOPTION_PRIVILEGED": ("yes", True),
    "CGID_MAX_STATIC_LIFETIME": ("720h", datetime.timedelta(days=30)),
    "CGID_JWKS_MAX_STALENESS": ("30m", datetime.timedelta(minutes=30)),
    "CGID_MAX_IN_FLIGHT": ("50", 50),
    "CGID_VERIFY_EXCHANGE": ("true", True),
    "CGID_OPERATOR_SERVICE_ACCOUNT": ("identity-operator", "identity-operator"),
    "CGID_VERIFY_INTERVAL": ("30m", datetime.timedelta(minutes=30)),
    "CGID_ALLOWED_PARENTS": (
        "c95870ebffa72a258df087ea727ee92daf177e29, c95870ebffa72a258df087ea727ee92daf177e29/0123456789abcdef",
        (
            "c95870ebffa72a258df087ea727ee92daf177e29",
            "c95870ebffa72a258df087ea727ee92daf177e29/0123456789abcdef",
        ),
    ),
}


def test_the_table_covers_every_setting() -> None:
    # A new setting must be added to the table above (and so be tested).
    fields = {f"{PREFIX}{field.name.upper()}" for field in dataclasses.fields(Settings)}
    assert fields - {"CGID_TOKEN_FILE"} == set(EVERY_VARIABLE)


def test_every_variable_is_read() -> None:
    env = {var: raw for var, (raw, _) in EVERY_VARIABLE.items()}
    settings = Settings.from_env(env)
    for var, (_, expected) in EVERY_VARIABLE.items():
        assert getattr(settings, var.removeprefix(PREFIX).lower()) == expected, var
    assert settings.uses_identity
    assert settings.token_file is None


def test_token_file_for_development() -> None:
    settings = Settings.from_env(DEV)
    assert settings.token_file == pathlib.Path("/run/dev-token")
    assert settings.identity is None
    assert not settings.uses_identity


def test_defaults() -> None:
    settings = Settings.from_env({"CGID_IDENTITY": IDENTITY})
    assert settings.cluster_name == "kubernetes"
    assert settings.api_url == "https://console-api.enforce.dev"
    assert settings.issuer_url == "https://issuer.enforce.dev"
    assert settings.registry == "cgr.dev"
    assert settings.allowed_roles == DEFAULT_ALLOWED_ROLES == ("registry.pull", "apk.pull", "viewer")
    assert settings.issuer is None
    assert settings.issuer_public is None
    assert settings.public_issuer_hosts == ()
    assert settings.namespaces == ()
    assert settings.replacement_grace == datetime.timedelta(minutes=10)
    assert (settings.liveness_port, settings.metrics_port) == (8080, 9090)


def test_empty_values_mean_unset_and_other_prefixes_are_ignored() -> None:
    settings = Settings.from_env(
        {**DEV, "CGID_ISSUER": "", "CGID_CLUSTER_NAME": "", "PATH": "/usr/bin", "CGIDX_TYPO": "1"}
    )
    assert settings.issuer is None
    assert settings.cluster_name == "kubernetes"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), ("1", True), ("Yes", True), ("FALSE", False), ("0", False), ("no", False)],
)
def test_issuer_public_booleans(raw: str, expected: bool) -> None:
    assert Settings.from_env({**DEV, "CGID_ISSUER_PUBLIC": raw}).issuer_public is expected


def test_unknown_variables_are_rejected_by_name() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({**DEV, "CGID_RESYNC_INTERVALL": "5m", "CGID_CLUSTERNAME": "x"})
    message = str(caught.value)
    assert message.startswith("CGID_CLUSTERNAME, CGID_RESYNC_INTERVALL:")
    assert "CGID_RESYNC_INTERVAL" in message.split(":", 1)[1]  # the known names help spot the typo


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("CGID_RESYNC_INTERVAL", "10"),
        ("CGID_JWKS_POLL_INTERVAL", "-1m"),
        ("CGID_REQUEST_TIMEOUT", "soon"),
        ("CGID_BASE_BACKOFF", "0s"),
        ("CGID_MAX_BACKOFF", "1d"),
        ("CGID_ISSUER_PUBLIC", "maybe"),
        ("CGID_API_URL", "console-api.enforce.dev"),
        ("CGID_API_URL", "ftp://console-api.enforce.dev"),
        ("CGID_ISSUER_URL", "issuer.enforce.dev"),
        ("CGID_ISSUER", "http://kubernetes.default.svc"),
        ("CGID_ISSUER", "https://kubernetes.default.svc?x=1"),
        ("CGID_IDENTITY", "not-a-uidp"),
        ("CGID_IDENTITY", "C95870EBFFA72A258DF087EA727EE92DAF177E29/F067A9080D45A098"),
        ("CGID_LIVENESS_PORT", "http"),
        ("CGID_LIVENESS_PORT", "70000"),
        ("CGID_METRICS_PORT", "-1"),
        ("CGID_METRICS_PORT", "nine"),
        ("CGID_REPLACEMENT_GRACE", "0s"),
        ("CGID_CLUSTER_NAME", "Prod_Cluster"),
        ("CGID_CLUSTER_NAME", "prod.eu"),  # a dot would make identity names ambiguous
        ("CGID_CLUSTER_NAME", "c" * 33),
        ("CGID_ALLOWED_ROLES", " , "),
        ("CGID_CLUSTER_ID", "not an id"),
        ("CGID_OPERATOR_NAMESPACE", "Chainguard-System"),
        ("CGID_IDENTITY_CONFIG_MAP", "Operator_Identity"),
        ("CGID_ADOPTION_NAMESPACES", "chainguard-system,Shop"),
        ("CGID_ADOPTION_PRIVILEGED", "maybe"),
        ("CGID_MAX_STATIC_LIFETIME", "0s"),
        ("CGID_JWKS_MAX_STALENESS", "-1m"),
        ("CGID_MAX_IN_FLIGHT", "0"),
        ("CGID_ALLOWED_PARENTS", "my-org"),
        ("CGID_MAX_IN_FLIGHT", "many"),
    ],
)
def test_bad_values_name_the_variable(var: str, raw: str) -> None:
    env = {var: raw} if var == "CGID_IDENTITY" else {**DEV, var: raw}
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env(env)
    assert str(caught.value).startswith(f"{var}: ")


def test_identity_must_be_a_child_uidp() -> None:
    # A bare 40-hex root is an organization or a user, never an assumable identity.
    with pytest.raises(ConfigurationError, match=r"^CGID_IDENTITY: "):
        Settings.from_env({"CGID_IDENTITY": "c95870ebffa72a258df087ea727ee92daf177e29"})


@pytest.mark.parametrize(
    ("fields", "var"),
    [
        ({"cluster_name": "prod\n", "token_file": pathlib.Path("/t")}, "CGID_CLUSTER_NAME"),
        ({"identity": IDENTITY + "\n"}, "CGID_IDENTITY"),
    ],
)
def test_trailing_newlines_are_rejected_in_settings_built_directly(fields: dict[str, Any], var: str) -> None:
    # from_env strips values; code that builds Settings itself must not slip a newline into names.
    with pytest.raises(ConfigurationError, match=rf"^{var}: "):
        Settings(**fields)


def test_identity_and_token_file_together_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match=r"^CGID_IDENTITY: .*not both"):
        Settings.from_env({"CGID_IDENTITY": IDENTITY, "CGID_TOKEN_FILE": "/run/dev-token"})


def test_neither_identity_nor_token_file_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match=r"^CGID_IDENTITY: .*CGID_TOKEN_FILE"):
        Settings.from_env({"CGID_CLUSTER_NAME": "prod"})


def test_settings_built_directly_are_validated_too() -> None:
    # Tests and the sandbox build Settings without the environment; the same rules apply.
    with pytest.raises(ConfigurationError, match=r"^CGID_RESYNC_INTERVAL: must be positive"):
        Settings(token_file=pathlib.Path("/t"), resync_interval=datetime.timedelta(0))


def test_adoption_is_honoured_in_the_operator_s_namespace_unless_listed_otherwise() -> None:
    default = Settings.from_env({**DEV, "CGID_OPERATOR_NAMESPACE": "identity-system"})
    assert default.adoption_allowed_in("identity-system")
    assert not default.adoption_allowed_in("shop")
    listed = Settings.from_env({**DEV, "CGID_ADOPTION_NAMESPACES": "platform"})
    assert listed.adoption_allowed_in("platform")
    assert not listed.adoption_allowed_in("chainguard-system")  # the list replaces the default
    assert Settings.from_env({**DEV, "CGID_ADOPTION_NAMESPACES": "*"}).adoption_allowed_in("shop")
