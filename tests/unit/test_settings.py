"""Configuration: CREDITNOTES_* variables, and no silent fall-back to plaintext Kafka."""

from __future__ import annotations

import string

import pytest
from hypothesis import assume, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from service.adapters.kafka_producer import connection_options
from service.domain.errors import UnauthorizedSource
from service.entrypoints.subscribers import broker_security
from service.entrypoints.translators import routes, translate
from service.entrypoints.wire import CloudEvent
from service.settings import Settings, Topics, redact_url


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


def test_each_topic_has_one_setting_defaulting_to_the_contract_name(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).topics == Topics()
    for name in Topics.model_fields:
        monkeypatch.setenv(f"CREDITNOTES_TOPIC_{name.upper()}", f"renamed.{name}")
        topics = Settings(_env_file=None).topics
        monkeypatch.delenv(f"CREDITNOTES_TOPIC_{name.upper()}")
        assert {field: value for field, value in topics if value != getattr(Topics(), field)} \
            == {name: f"renamed.{name}"}


# --- secrets and sources (issues 10.3 and 15.2) ------------------------------------------------

_PASSWORD = st.builds(  # a marker-like password: nothing else in a repr could contain it
    "Pw7{}".format, st.text(alphabet=string.ascii_letters + string.digits + "-_.~!$&'()*+,;=%",
                            min_size=8, max_size=40))


@given(password=_PASSWORD, user=st.sampled_from(["app", "creditnotes_service"]),
       query=st.sampled_from(["", "?sslmode=verify-full", "?application_name=cn"]))
def test_a_redacted_database_url_never_holds_its_password(password: str, user: str,
                                                          query: str) -> None:
    url = f"postgresql://{user}:{password}@db.internal:5432/creditnotes{query}"
    redacted = redact_url(url)
    assert password not in redacted
    assert redacted == f"postgresql://{user}:***@db.internal:5432/creditnotes{query}"
    settings = Settings(_env_file=None, database_url=url, kafka_sasl_password=password)
    assert password not in repr(settings) and password not in str(settings)


def test_a_password_in_the_query_is_redacted_too() -> None:
    assert redact_url("postgresql://db/cn?user=a&password=s3cr3t&sslmode=require") == (
        "postgresql://db/cn?user=a&password=***&sslmode=require")


def test_production_tls_options_are_added_to_the_database_url() -> None:
    settings = Settings(_env_file=None, database_url="postgresql://u@db/cn?sslmode=disable",
                        database_sslmode="verify-full",
                        database_sslrootcert="/etc/ssl/certs/ca-certificates.crt")
    assert settings.database_url == ("postgresql://u@db/cn?sslmode=verify-full"
                                     "&sslrootcert=/etc/ssl/certs/ca-certificates.crt")


def test_run_needs_an_allow_list_per_input_topic_or_allow_any() -> None:
    settings = Settings(_env_file=None, allowed_sources_returns=["/warehouse/returns"])
    assert "CREDITNOTES_ALLOWED_SOURCES_RETURNS" not in settings.missing_allow_lists()
    assert len(settings.missing_allow_lists()) == len(settings.topics.inputs()) - 1
    assert "CREDITNOTES_ALLOWED_SOURCES_REFUND_RESULTS" in settings.missing_allow_lists()
    open_settings = settings.model_copy(update={"allow_any_source": True})
    assert open_settings.missing_allow_lists() == []
    assert settings.topics.returns not in open_settings.open_topics()
    assert len(open_settings.open_topics()) == len(settings.topics.inputs()) - 1


_STRICT = Settings(_env_file=None, allowed_sources_sla_breaches=["/monitoring/sla"])
_TABLE = routes(_STRICT)


@hypothesis_settings(deadline=None)
@given(source=st.text(min_size=1, max_size=30).filter(lambda text: text != "/monitoring/sla"))
def test_a_source_not_on_the_list_is_refused_before_any_translation(source: str) -> None:
    try:  # sources the envelope itself refuses (control characters) never get this far
        event = CloudEvent.model_validate({
            "specversion": "1.0", "id": "pay-9", "source": source, "type": "sla.breached",
            "data": {"invoice_id": "in_1", "sla_id": "s", "credit_bps": 10_000}})
    except ValidationError:
        assume(False)
    with pytest.raises(UnauthorizedSource):
        translate(event, _STRICT.topics.sla_breaches, _TABLE)


def test_a_failed_refund_goes_to_the_customer_balance_unless_told_otherwise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).refund_failure_settlement == "customer_balance"
    monkeypatch.setenv("CREDITNOTES_REFUND_FAILURE_SETTLEMENT", "none")
    assert Settings(_env_file=None).refund_failure_settlement == "none"
    monkeypatch.setenv("CREDITNOTES_REFUND_FAILURE_SETTLEMENT", "refund")
    with pytest.raises(ValidationError, match="refund_failure_settlement"):
        Settings(_env_file=None)


def test_refund_results_is_an_input_with_its_dead_letter_topic_and_the_balance_an_output(
) -> None:
    topics = Settings(_env_file=None).topics
    assert "refund-results" in topics.inputs() and "refund-results.dlq" in topics.all()
    assert "customer-balance-events" in topics.outputs()
    assert "customer-balance-events.dlq" not in topics.all()
