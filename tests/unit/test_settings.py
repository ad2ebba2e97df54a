"""Configuration: CREDITNOTES_* variables, and no silent fall-back to plaintext Kafka."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.adapters.kafka_producer import connection_options
from service.main import broker_security
from service.settings import Settings


def test_sasl_without_credentials_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDITNOTES_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ValidationError, match="refusing to fall back to plaintext"):
        Settings(_env_file=None)


def test_sasl_scram_over_tls_reaches_every_kafka_client(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                        "KAFKA_SASL_USERNAME": "creditnotes",
                        "KAFKA_SASL_PASSWORD": "s3cret"}.items():
        monkeypatch.setenv(f"CREDITNOTES_{name}", value)
    settings = Settings(_env_file=None)

    options = connection_options(settings)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["ssl_context"] is not None
    security = broker_security(settings)
    assert security is not None and security.use_ssl
    assert type(security).__name__ == "SASLScram512"
    assert "s3cret" not in repr(settings)


def test_topic_names_and_policies_come_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDITNOTES_TOPIC_RETURNS", "warehouse.returns.v1")
    monkeypatch.setenv("CREDITNOTES_ALLOWED_SOURCES_RETURNS", '["/warehouse/returns"]')
    settings = Settings(_env_file=None)
    assert settings.topics.returns == "warehouse.returns.v1"
    assert "warehouse.returns.v1.dlq" in settings.topics.all()
    assert settings.allowed_sources()["warehouse.returns.v1"] == ["/warehouse/returns"]
    assert settings.consumer_group == "credit-notes"
    assert settings.http_port == 8080
