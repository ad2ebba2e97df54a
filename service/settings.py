"""Configuration: one pydantic-settings class, read from ``CREDITNOTES_*`` and ``.env``.

Built once, in the composition root (:mod:`service.main`); nothing reads the
environment anywhere else.
"""

from __future__ import annotations

import ipaddress
import re
from importlib import resources
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The migrations ship as package data, so an installed wheel finds them too.
MIGRATIONS_DIR = Path(str(resources.files("service.adapters") / "sql"))


class Topics(BaseModel):
    """Topic names (docs/contract.md); each may be overridden, e.g. ``CREDITNOTES_TOPIC_RETURNS``."""

    invoices: str = "invoices"
    returns: str = "returns"
    sla_breaches: str = "sla-breaches"
    downgrades: str = "downgrades"
    cancellations: str = "cancellations"
    credit_note_commands: str = "credit-note-commands"
    credit_note_events: str = "credit-note-events"
    invoice_events: str = "invoice-events"
    refund_requests: str = "refund-requests"
    refund_results: str = "refund-results"
    customer_balance_events: str = "customer-balance-events"

    def inputs(self) -> list[str]:
        return [self.invoices, self.returns, self.sla_breaches, self.downgrades,
                self.cancellations, self.credit_note_commands, self.refund_results]

    def outputs(self) -> list[str]:
        return [self.credit_note_events, self.invoice_events, self.refund_requests,
                self.customer_balance_events]

    def all(self) -> list[str]:
        inputs = self.inputs()
        return inputs + self.outputs() + [f"{topic}.dlq" for topic in inputs]


ConsoleRole = Literal["viewer", "operator"]


class ConsoleToken(BaseModel):
    """One API token of the console: its user, role and the sha256 of the token (hex).

    Only the hash is configured (``creditnotes console token`` makes a pair), so the
    settings, their ``repr`` and the logs never hold a token that works.
    """

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._@+-]+$")
    role: ConsoleRole
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


#: The contract's topic names: the defaults of the ``topic_*`` settings.
DEFAULT_TOPICS = Topics()

SettlementName = Literal["refund", "customer_balance", "out_of_band"]
SETTLEMENTS: tuple[SettlementName, ...] = ("refund", "customer_balance", "out_of_band")
#: Where a failed refund's amount goes (``CREDITNOTES_REFUND_FAILURE_SETTLEMENT``).
RefundFailureSettlementName = Literal["customer_balance", "none"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CREDITNOTES_", env_file=".env",
                                      env_nested_delimiter="__", extra="ignore")

    #: May hold a password: kept out of ``repr`` and shown only through :func:`redact_url`.
    database_url: str = Field(default="postgresql://postgres@127.0.0.1:5432/creditnotes",
                              repr=False)
    #: Pooled PostgreSQL connections; at least :func:`pool_needed` (each shard's batch in
    #: flight, the invoices and refund-results consumers, the relay and retention).
    database_pool_size: int = Field(default=10, ge=1)
    #: TLS to PostgreSQL, added to the URL's query (and replacing one there): production
    #: uses ``verify-full`` (certificate and host name checked) with the CA bundle named
    #: by ``database_sslrootcert``. Unset: whatever the URL says (asyncpg's default ``prefer``).
    database_sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca",
                              "verify-full"] | None = None
    database_sslrootcert: Path | None = None
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = (
        "PLAINTEXT"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    consumer_group: str = "credit-notes"
    #: Batch subscribers consuming the crediting topics per replica (each its own consumer
    #: in the group, its own batch in flight, its own offsets); range assignment gives each
    #: the same partition numbers on every crediting topic (docs/scaling.md).
    consumer_shards: int = Field(default=4, ge=1, le=64)
    #: Consumer-group liveness. Kafka's defaults suit production; the embedded
    #: broker (tansu) holds every join for about half the session timeout, so
    #: ``creditnotes dev``, ``demo`` and the tests shorten it.
    kafka_session_timeout_ms: int = Field(default=10_000, ge=1_000)
    kafka_heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    #: Bytes one fetch may bring per consumer, and per partition (docs: the memory
    #: arithmetic). A batch holds at most what one fetch brought.
    kafka_fetch_max_bytes: int = Field(default=8 * 1_048_576, ge=1_048_576)
    kafka_max_partition_fetch_bytes: int = Field(default=1_048_576, ge=65_536)
    #: The longest the broker may hold a consumer's fetch while it has no records
    #: (milliseconds; aiokafka's default is 500). Kafka answers as soon as a record
    #: arrives, so this only sets how often an idle consumer asks again; tansu holds
    #: every fetch about this long (half of it from 500 ms), records or not, so it adds
    #: up to this much to each record's wait. Under load every fetch still brings all
    #: that is waiting, up to the fetch sizes above, so the batches stay as large.
    kafka_fetch_max_wait_ms: int = Field(default=500, ge=1, le=500)
    http_port: int = 8080
    #: ``/metrics`` on a port of its own (kept off the probes' port); unset: on ``http_port``.
    metrics_port: int | None = None
    #: The health server's limits: open connections, seconds to send a request, and the
    #: longest request line (and header line) in bytes.
    http_max_connections: int = Field(default=16, ge=1)
    http_read_timeout_seconds: float = Field(default=5.0, gt=0)
    http_max_request_line_bytes: int = Field(default=1_024, ge=64)
    #: ``/readyz`` is computed at most this often; requests in between get the last answer.
    readiness_cache_seconds: float = Field(default=1.0, ge=0)
    log_format: Literal["json", "console"] | None = None
    log_level: str = "INFO"

    #: One ``topic_<name>`` per field of :class:`Topics`, defaulting to its name there.
    topic_invoices: str = DEFAULT_TOPICS.invoices
    topic_returns: str = DEFAULT_TOPICS.returns
    topic_sla_breaches: str = DEFAULT_TOPICS.sla_breaches
    topic_downgrades: str = DEFAULT_TOPICS.downgrades
    topic_cancellations: str = DEFAULT_TOPICS.cancellations
    topic_credit_note_commands: str = DEFAULT_TOPICS.credit_note_commands
    topic_credit_note_events: str = DEFAULT_TOPICS.credit_note_events
    topic_invoice_events: str = DEFAULT_TOPICS.invoice_events
    topic_refund_requests: str = DEFAULT_TOPICS.refund_requests
    topic_refund_results: str = DEFAULT_TOPICS.refund_results
    topic_customer_balance_events: str = DEFAULT_TOPICS.customer_balance_events

    #: Which CloudEvents ``source`` values may publish on each input topic (JSON
    #: lists, e.g. ``CREDITNOTES_ALLOWED_SOURCES_RETURNS='["/warehouse/returns"]'``).
    #: Unset means any source; anything else is dead-lettered as ``unauthorized_source``.
    allowed_sources_invoices: list[str] | None = None
    allowed_sources_returns: list[str] | None = None
    allowed_sources_sla_breaches: list[str] | None = None
    allowed_sources_downgrades: list[str] | None = None
    allowed_sources_cancellations: list[str] | None = None
    allowed_sources_credit_note_commands: list[str] | None = None
    allowed_sources_refund_results: list[str] | None = None
    #: ``creditnotes run`` refuses to start while an input topic has no allow-list, unless
    #: this is true (``dev``, ``demo`` and the tests): then those topics accept any source,
    #: and a warning at start names them.
    allow_any_source: bool = False

    #: Policy caps per trigger type, in basis points of the invoice total
    #: (a trigger asking for more is capped; the credit note records the policy).
    policy_return_max_credit_bps: int = Field(default=10_000, ge=0, le=10_000)
    policy_sla_max_credit_bps: int = Field(default=5_000, ge=0, le=10_000)
    policy_downgrade_max_credit_bps: int = Field(default=10_000, ge=0, le=10_000)
    policy_cancellation_max_credit_bps: int = Field(default=10_000, ge=0, le=10_000)
    #: Which settlements a trigger topic may ask for (JSON lists, e.g.
    #: ``CREDITNOTES_ALLOWED_SETTLEMENTS_SLA_BREACHES='["customer_balance"]'``); by default
    #: all three, as the contract allows. A trigger asking for another is rejected
    #: (``settlement_not_allowed``); one asking for none gets its topic's default when
    #: allowed, else the first settlement listed.
    allowed_settlements_returns: list[SettlementName] = Field(
        default_factory=lambda: list(SETTLEMENTS), min_length=1)
    allowed_settlements_sla_breaches: list[SettlementName] = Field(
        default_factory=lambda: list(SETTLEMENTS), min_length=1)
    allowed_settlements_downgrades: list[SettlementName] = Field(
        default_factory=lambda: list(SETTLEMENTS), min_length=1)
    allowed_settlements_cancellations: list[SettlementName] = Field(
        default_factory=lambda: list(SETTLEMENTS), min_length=1)

    #: Where the amount of a refund that failed goes, read when the outcome is applied:
    #: ``customer_balance`` (journal refunds_payable -> customer_credit_balance, and a
    #: ``customer_balance.credited`` event) or ``none`` (it stays in refunds_payable for a
    #: person to settle; the ``credit_note.refund_failed`` event says so).
    refund_failure_settlement: RefundFailureSettlementName = "customer_balance"

    #: How long a message whose invoice (credit note, refund) is unknown keeps being
    #: retried before it is dead-lettered as ``invoice_not_found`` (``credit_note_not_found``,
    #: ``refund_not_found``).
    not_found_retry_seconds: float = Field(default=30.0, ge=0)
    #: Backoff between retries, doubling up to the cap (seconds).
    retry_initial_backoff_seconds: float = Field(default=0.2, gt=0)
    retry_max_backoff_seconds: float = Field(default=5.0, gt=0)
    #: Records applied together in one transaction (one offset commit per batch), and
    #: how long a consumer waits for records when none are ready (milliseconds).
    batch_max_records: int = Field(default=200, ge=1, le=10_000)
    batch_timeout_ms: int = Field(default=20, ge=1)
    #: The largest message accepted, in bytes; larger ones are dead-lettered.
    max_message_bytes: int = Field(default=1_048_576, gt=0)
    #: How often the outbox relay looks for rows without being woken (seconds): every
    #: replica's commits wake it at once (its own in-process, another's with a NOTIFY);
    #: the poll publishes what a lost NOTIFY leaves.
    outbox_poll_seconds: float = Field(default=1.0, gt=0)
    outbox_batch_size: int = Field(default=500, gt=0)
    #: A relay batch gives up after this long (the producer's own request timeout is
    #: 30 s); a new leader waits out a former leader's batch, if that relay is still
    #: alive, for as long plus 5 s to mark it, so no two relays publish at once.
    outbox_publish_timeout_seconds: float = Field(default=30.0, gt=0)
    #: The largest outbox record the relay sends (key, value, headers and batch
    #: overhead, as the broker counts them); a larger one is parked. Kafka's default
    #: ``message.max.bytes`` is 1,048,588.
    outbox_max_event_bytes: int = Field(default=1_048_576, gt=0)
    #: Retention (``creditnotes prune``, and every ``retention_interval_seconds`` inside
    #: ``run``): processed-message keys older than the dedupe window (payments' kept for
    #: ever), outbox rows published, and replay audit rows, older than so many days.
    #: The database refuses anything younger than a day, hence ``ge=1``.
    retention_enabled: bool = True
    retention_interval_seconds: float = Field(default=3_600.0, gt=0)
    retention_processed_messages_days: int = Field(default=30, ge=1)
    retention_outbox_days: int = Field(default=7, ge=1)
    retention_dlq_replays_days: int = Field(default=90, ge=1)
    retention_batch_size: int = Field(default=5_000, ge=1, le=100_000)
    retention_batch_pause_seconds: float = Field(default=0.05, ge=0)
    #: OpenTelemetry traces over OTLP/HTTP (needs the ``tracing`` extra); the endpoint
    #: defaults to the exporter's own (``OTEL_EXPORTER_OTLP_*`` variables).
    tracing_enabled: bool = False
    tracing_endpoint: str | None = None
    shutdown_timeout_seconds: float = Field(default=20.0, gt=0)
    migrations_dir: Path = MIGRATIONS_DIR
    service_version: str = "0.1.0"

    #: The ops console (``creditnotes console``, docs/security.md): its own process and port.
    console_port: int = Field(default=8081, ge=0, le=65_535)
    console_host: str = "0.0.0.0"  # noqa: S104  (a container's port; the ingress fronts it)
    #: API tokens, hashed (JSON: ``[{"name": ..., "role": "viewer"|"operator", "sha256": ...}]``).
    console_tokens: list[ConsoleToken] = Field(default_factory=list)
    #: Peers (IPs or CIDRs) whose ``console_proxy_user_header`` names the user; from any
    #: other address that header is ignored. Proxy users are viewers unless listed in
    #: ``console_proxy_operators``.
    console_trusted_proxies: list[str] = Field(default_factory=list)
    console_proxy_user_header: str = Field(default="X-Forwarded-User", min_length=1)
    console_proxy_operators: list[str] = Field(default_factory=list)
    #: Signs session cookies and CSRF tokens (32 characters at least; the same for every
    #: replica). Unset: a random one per process (sessions end at a restart and do not
    #: cross replicas).
    console_session_secret: SecretStr | None = Field(default=None, min_length=32)
    console_session_minutes: int = Field(default=480, ge=1)
    #: The session cookie's ``Secure`` flag (HTTPS only); ``dev``, ``demo`` and tests: False.
    console_secure_cookies: bool = True
    #: Writes per user per minute (and login attempts per address); more get 429.
    console_write_rate_per_minute: int = Field(default=30, ge=1)
    #: How long a write waits for its command's outcome before answering 202.
    console_wait_seconds: float = Field(default=5.0, ge=0, le=60)
    #: A console command's CloudEvents ``source``: ``<prefix>/<user, percent-encoded>``.
    console_source_prefix: str = Field(default="/console", pattern=r"^/[^\s]*$")

    @model_validator(mode="after")
    def _sasl_needs_credentials(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL") and not (
            self.kafka_sasl_mechanism and self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError("SASL needs CREDITNOTES_KAFKA_SASL_MECHANISM, _USERNAME and "
                             "_PASSWORD; refusing to fall back to plaintext")
        return self

    @model_validator(mode="after")
    def _pool_fits_the_shards(self) -> Settings:
        needed = pool_needed(self.consumer_shards)
        if self.database_pool_size < needed:
            raise ValueError(
                f"CREDITNOTES_DATABASE_POOL_SIZE ({self.database_pool_size}) is too small for "
                f"CREDITNOTES_CONSUMER_SHARDS ({self.consumer_shards}): each shard's batch in "
                f"flight holds a connection, and so do the invoices and refund-results "
                f"consumers, the outbox relay and retention; set the pool size to at least "
                f"{needed}, or run fewer shards")
        return self

    @field_validator("console_trusted_proxies")
    @classmethod
    def _networks(cls, proxies: list[str]) -> list[str]:
        for proxy in proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"not an IP address or CIDR network: {proxy!r}") from None
        return proxies

    @field_validator("console_tokens")
    @classmethod
    def _distinct_tokens(cls, tokens: list[ConsoleToken]) -> list[ConsoleToken]:
        if len({token.name for token in tokens}) != len(tokens):
            raise ValueError("two console tokens have the same name")
        if len({token.sha256 for token in tokens}) != len(tokens):
            raise ValueError("two console tokens have the same sha256")
        return tokens

    @field_validator("database_url")
    @classmethod
    def _a_postgresql_url(cls, url: str) -> str:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  (raises on a port that is no number)
        except ValueError:
            raise ValueError("not a URL (postgresql://user:password@host:port/database)") from None
        if parts.scheme not in {"postgresql", "postgres"}:
            raise ValueError("the scheme must be postgresql:// (or postgres://)")
        return url

    @model_validator(mode="after")
    def _database_tls(self) -> Settings:
        options = {"sslmode": self.database_sslmode,
                   "sslrootcert": str(self.database_sslrootcert or "") or None}
        for name, value in options.items():
            if value is not None:
                self.database_url = with_query(self.database_url, name, value)
        return self

    def allowed_sources(self) -> dict[str, list[str] | None]:
        """Per input topic name: the sources allowed to publish there (None: any)."""
        topics = self.topics
        return {
            topics.invoices: self.allowed_sources_invoices,
            topics.returns: self.allowed_sources_returns,
            topics.sla_breaches: self.allowed_sources_sla_breaches,
            topics.downgrades: self.allowed_sources_downgrades,
            topics.cancellations: self.allowed_sources_cancellations,
            topics.credit_note_commands: self.allowed_sources_credit_note_commands,
            topics.refund_results: self.allowed_sources_refund_results,
        }

    def open_topics(self) -> list[str]:
        """Input topics without an allow-list: they accept any ``source``."""
        return [topic for topic, sources in self.allowed_sources().items() if sources is None]

    def missing_allow_lists(self) -> list[str]:
        """The settings ``run`` needs before it starts (none once ``allow_any_source``)."""
        if self.allow_any_source:
            return []
        names = {"invoices": self.allowed_sources_invoices,
                 "returns": self.allowed_sources_returns,
                 "sla_breaches": self.allowed_sources_sla_breaches,
                 "downgrades": self.allowed_sources_downgrades,
                 "cancellations": self.allowed_sources_cancellations,
                 "credit_note_commands": self.allowed_sources_credit_note_commands,
                 "refund_results": self.allowed_sources_refund_results}
        return [f"CREDITNOTES_ALLOWED_SOURCES_{name.upper()}"
                for name, sources in names.items() if sources is None]

    @property
    def topics(self) -> Topics:
        return Topics(**{name: getattr(self, f"topic_{name}") for name in Topics.model_fields})


#: Pooled connections besides the shards': the invoices and refund-results consumers' batches,
#: the outbox relay's reads and marks, and retention's prune.
POOL_BESIDES_SHARDS = 4


def pool_needed(consumer_shards: int) -> int:
    """The smallest ``database_pool_size`` for ``consumer_shards``: one connection for every
    transaction that may run at once in a replica (the health endpoints and the relay's lock
    and alive connections are outside the pool)."""
    return consumer_shards + POOL_BESIDES_SHARDS


def with_query(url: str, name: str, value: str) -> str:
    """``url`` with the query parameter ``name`` set to ``value`` (replacing any)."""
    parts = urlsplit(url)
    query = [(key, item) for key, item in parse_qsl(parts.query) if key != name]
    return urlunsplit(parts._replace(query=urlencode([*query, (name, value)], safe="/")))


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, fit for messages and logs."""
    url = re.sub(r"(?<=://)([^/@?#]*?):[^/@?#]*@", r"\1:***@", url)
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", url)
