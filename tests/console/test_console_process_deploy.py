"""The console's Kubernetes manifests (deploy/k8s/console) and compose service, checked
offline with tests/unit/test_deploy_manifests.py's renderer and schemas: the process
they run is ``creditnotes console``, probed on the port its settings listen on, with
settings that start, and the service admits the commands it publishes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.settings import Settings
from tests.unit.test_deploy_manifests import (
    SCHEMAS,
    Variant,
    containers_of,
    name_of,
    render,
    settings_from,
    variant,
)

ROOT = Path(__file__).resolve().parents[2]
CONSOLE = ROOT / "deploy" / "k8s" / "console"


def console_manifests() -> Variant:
    base = variant("base")
    resources = render(CONSOLE)
    secrets = dict(base.secrets) | {name_of(secret): dict(secret.get("stringData", {}))
                                     for secret in resources if secret["kind"] == "Secret"}
    # the console reads the base's ConfigMap; render it alongside to resolve references
    return Variant("console", resources + base.all("ConfigMap"), secrets)


def console_settings(manifests: Variant, monkeypatch: pytest.MonkeyPatch) -> Settings:
    [container] = containers_of(manifests.deployment)
    return settings_from(manifests.environment(container), monkeypatch)


def test_the_console_deployment_runs_the_console_and_probes_its_port(
        monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = console_manifests()
    deployment = manifests.deployment
    jsonschema.validate(deployment, SCHEMAS["Deployment"], cls=jsonschema.Draft202012Validator)
    [container] = containers_of(deployment)
    assert container["args"] == ["console"]
    settings = console_settings(manifests, monkeypatch)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"console": settings.console_port}
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "console"}
    # a shared session secret: sessions cross replicas and survive restarts
    assert settings.console_session_secret is not None
    assert settings.console_secure_cookies is True  # behind TLS


def test_the_console_service_and_network_policy_open_only_its_port() -> None:
    manifests = console_manifests()
    [service] = manifests.all("Service")
    labels = manifests.deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert [(port["port"], port["targetPort"]) for port in service["spec"]["ports"]] == [
        (8081, "console")]
    [policy] = manifests.all("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    opened = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert opened == {8081}
    egress = {port["port"] for rule in policy["spec"]["egress"] for port in rule["ports"]}
    assert egress <= {5432, 9092, 9093, 53}


def test_the_service_admits_the_commands_the_console_publishes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = console_manifests()
    settings = console_settings(manifests, monkeypatch)
    allowed = settings.allowed_sources_credit_note_commands or []
    assert f"{settings.console_source_prefix}/*" in allowed


def test_the_console_secret_is_a_placeholder() -> None:
    [secret] = console_manifests().all("Secret")
    assert "CHANGE-ME" in secret["stringData"]["CREDITNOTES_CONSOLE_SESSION_SECRET"]
    assert secret["stringData"]["CREDITNOTES_CONSOLE_TOKENS"] == "[]"


def test_compose_runs_the_console_on_loopback_with_the_services_allow_list(
        monkeypatch: pytest.MonkeyPatch) -> None:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    console = compose["services"]["console"]
    assert console["command"] == ["console"]
    assert console["ports"] == ["127.0.0.1:${CREDITNOTES_CONSOLE_HOST_PORT:-8081}:8081"]
    environment = {key: value.replace("${CREDITNOTES_CONSOLE_TOKENS:-[]}", "[]")
                   for key, value in console["environment"].items()}
    settings = settings_from(environment, monkeypatch)
    assert settings.console_port == 8081
    service = settings_from(compose["services"]["service"]["environment"], monkeypatch)
    assert f"{settings.console_source_prefix}/*" in (
        service.allowed_sources_credit_note_commands or [])
    assert "8081" in console["healthcheck"]["test"][-1]
