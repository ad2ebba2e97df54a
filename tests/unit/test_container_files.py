"""docker-compose.yml and deploy/Dockerfile, checked offline (no Docker engine here).

hadolint lints the Dockerfile; the compose file is read as YAML and held to
what the service needs: health checks, start order, real settings, and
exactly the contract's topics.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

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
    assert "COPY schemas/migrations" in text
    assert "CREDITNOTES_MIGRATIONS_DIR=/app/schemas/migrations" in text


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
    names = {name for name in services["service"]["environment"]
             if name.startswith("CREDITNOTES_")}
    fields = {f"CREDITNOTES_{field.upper()}" for field in Settings.model_fields}
    assert names and names <= fields


def test_compose_creates_exactly_the_contract_topics() -> None:
    script = compose()["services"]["topics"]["command"][0]
    inputs = re.search(r'inputs="([^"]+)"', script)
    outputs = re.search(r'outputs="([^"]+)"', script)
    assert inputs and outputs
    created = set(inputs.group(1).split()) | set(outputs.group(1).split())
    created |= {f"{topic}.dlq" for topic in inputs.group(1).split()}
    assert created == set(Settings(_env_file=None).topics.all())
