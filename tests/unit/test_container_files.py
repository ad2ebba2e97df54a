"""docker-compose.yml and deploy/Dockerfile, checked offline (no Docker engine here).

hadolint lints the Dockerfile; the compose file is read as YAML and held to
what the service needs: health checks, start order, real settings, and
exactly the contract's topics; and to what keeps it private: ports on loopback
only, the service connecting as a user that owns nothing, allow-lists on.
(tests/integration/test_compose_roles.py runs deploy/compose/init-roles.sql.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from service.entrypoints.translators import routes
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
HADOLINT = Path(sys.executable).with_name("hadolint")


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_the_dockerfile_passes_hadolint() -> None:
    linted = subprocess.run([str(HADOLINT), str(ROOT / "deploy" / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_the_dockerfile_runs_the_service_as_a_non_root_user_with_its_migrations() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^USER \$\{APP_UID\}", text, re.MULTILINE)
    assert 'ENTRYPOINT ["creditnotes"]' in text
    assert 'CMD ["run"]' in text
    # the migrations are package data of the installed service, found without a setting
    assert "COPY service ./service" in text
    assert "migrations" not in " ".join(re.findall(r"^(?:COPY|ENV|ARG) .*$", text, re.MULTILINE))
    assert "CREDITNOTES_MIGRATIONS_DIR" not in text


def build_step(text: str) -> str:
    """The builder's RUN instruction that installs the package, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    [step] = [line for line in joined.splitlines()
              if line.startswith("RUN ") and "pip install" in line]
    return step


def test_the_image_holds_no_dev_tooling() -> None:
    step = build_step((ROOT / "deploy" / "Dockerfile").read_text())
    # the dev package is gone from the sources before the package is built from them
    removed = step.index("rm -rf service/devtools")
    assert removed < step.index("pip install")
    # ... and the build fails if it is installed anyway: the check exits non-zero where it is,
    # as in this development venv, and zero where it is not
    [check] = re.findall(r'python -c "([^"]+)"', step)
    assert "service.devtools" in check
    here = subprocess.run([sys.executable, "-c", check], capture_output=True, timeout=60)
    assert here.returncode == 1, here.stderr
    absent = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['service.devtools'] = None; " + check],
        capture_output=True, timeout=60)
    assert absent.returncode == 0, absent.stderr


def test_compose_starts_the_service_only_after_healthy_servers_topics_and_migrations() -> None:
    services = compose()["services"]
    assert {"kafka", "postgres", "topics", "migrate", "service"} <= set(services)
    for name in ("kafka", "postgres", "service"):
        assert "test" in services[name]["healthcheck"], name
    assert services["service"]["depends_on"] == {
        "kafka": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
        "topics": {"condition": "service_completed_successfully"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    assert services["migrate"]["command"] == ["migrate"]
    assert services["service"]["command"] == ["run"]


def test_compose_sets_only_real_settings() -> None:
    services = compose()["services"]
    fields = {f"CREDITNOTES_{field.upper()}" for field in Settings.model_fields}
    for name in ("service", "migrate"):
        names = {key for key in services[name]["environment"] if key.startswith("CREDITNOTES_")}
        assert names and names <= fields, name


def substituted(value: str) -> str:
    """``${NAME:-default}`` as compose fills it in with nothing set."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def compose_settings(service: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in list(os.environ):
        if key.startswith("CREDITNOTES_"):
            monkeypatch.delenv(key)
    for key, value in compose()["services"][service]["environment"].items():
        monkeypatch.setenv(key, substituted(str(value)))
    return Settings(_env_file=None)


def test_every_published_port_is_bound_to_loopback() -> None:
    published = [(name, port) for name, service in compose()["services"].items()
                 for port in service.get("ports", [])]
    assert {name for name, _ in published} == {"kafka", "postgres", "service", "console"}
    for name, port in published:
        assert isinstance(port, str) and port.startswith("127.0.0.1:"), (name, port)
    # the broker's only listener without authentication that leaves the compose network
    # is the one published on loopback
    kafka = compose()["services"]["kafka"]["environment"]
    assert "SASL" not in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    assert kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")[1].startswith("PLAINTEXT_HOST://localhost:")


def test_the_service_connects_as_a_user_that_owns_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    postgres = services["postgres"]["environment"]
    service_url = urlsplit(compose_settings("service", monkeypatch).database_url)
    migrate_url = urlsplit(compose_settings("migrate", monkeypatch).database_url)
    assert service_url.username == "creditnotes_service"
    assert migrate_url.username == "creditnotes_migrate"
    assert postgres["POSTGRES_USER"] not in {service_url.username, migrate_url.username}
    sql = (ROOT / "deploy" / "compose" / "init-roles.sql").read_text()
    assert "CREATE ROLE creditnotes_service LOGIN IN ROLE creditnotes_app'" in sql
    assert "CREATE ROLE creditnotes_migrate LOGIN IN ROLE creditnotes_migrator'" in sql
    assert "OWNER TO creditnotes_migrate" in sql and "OWNER TO creditnotes_service" not in sql
    mounts = services["postgres"]["volumes"]
    assert "./deploy/compose/init-roles.sh:/docker-entrypoint-initdb.d/10-init-roles.sh:ro" in mounts
    assert os.access(ROOT / "deploy" / "compose" / "init-roles.sh", os.X_OK)
    assert "--file /docker-entrypoint-initdb.d/init-roles.sql.in" in (
        ROOT / "deploy" / "compose" / "init-roles.sh").read_text()
    assert any(mount.endswith(":/docker-entrypoint-initdb.d/init-roles.sql.in:ro")
               for mount in mounts)


def test_compose_ships_an_allow_list_for_every_input_topic(
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = compose_settings("service", monkeypatch)
    assert settings.missing_allow_lists() == [] and not settings.allow_any_source
    examples = {json.loads(path.read_text())["type"]: json.loads(path.read_text())["source"]
                for path in (ROOT / "schemas" / "examples").glob("*.json")}
    # every shipped example is accepted on the topic that carries it
    for route_topic, route in routes(settings).items():
        for event_type in route.translators:
            assert route.allowed_sources is not None
            assert examples[event_type] in route.allowed_sources, (route_topic, event_type)


def test_compose_creates_exactly_the_contract_topics() -> None:
    script = compose()["services"]["topics"]["command"][0]
    inputs = re.search(r'inputs="([^"]+)"', script)
    outputs = re.search(r'outputs="([^"]+)"', script)
    assert inputs and outputs
    created = set(inputs.group(1).split()) | set(outputs.group(1).split())
    created |= {f"{topic}.dlq" for topic in inputs.group(1).split()}
    assert created == set(Settings(_env_file=None).topics.all())
