"""Prometheus metrics for ``/metrics``, in a registry of the service's own (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.consumed = Counter(
            "creditnotes_messages_consumed", "Records read from an input topic", ["topic"],
            registry=self.registry)
        self.outcomes = Counter(
            "creditnotes_messages_processed",
            "Records processed, by outcome (applied, rejected, duplicate, dead_lettered) and "
            "reason code", ["topic", "outcome", "reason"], registry=self.registry)
        self.retries = Counter(
            "creditnotes_infrastructure_retries",
            "Records retried in place because PostgreSQL or the broker failed", ["topic"],
            registry=self.registry)
        self.latency = Histogram(
            "creditnotes_processing_seconds", "From a record's arrival to its commit",
            ["topic"], registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.batch_records = Histogram(
            "creditnotes_batch_records", "Records per batch handed to the pipeline",
            registry=self.registry, buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
        self.transaction_seconds = Histogram(
            "creditnotes_transaction_seconds",
            "A batch's apply in PostgreSQL, from BEGIN to COMMIT included",
            registry=self.registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.db_round_trips = Counter(
            "creditnotes_db_round_trips",
            "Statements sent to PostgreSQL by the consumers' pool (each a round trip)",
            registry=self.registry)
        self.outbox_backlog = Gauge(
            "creditnotes_outbox_backlog", "Outbox rows not yet published", registry=self.registry)
        self.outbox_oldest = Gauge(
            "creditnotes_outbox_oldest_unpublished_seconds",
            "Age of the oldest unpublished outbox row", registry=self.registry)
        self.outbox_parked = Gauge(
            "creditnotes_outbox_parked",
            "Outbox rows the broker refused for good, parked until `creditnotes outbox retry`"
            " (later events of their invoices wait behind them)", registry=self.registry)
        self.lag = Gauge(
            "creditnotes_consumer_lag", "Records on a partition not yet consumed",
            ["topic", "partition"], registry=self.registry)
        self.refund_outcomes = Counter(
            "creditnotes_refund_outcomes",
            "Records on refund-results, by what they did to their refund (succeeded, failed,"
            " duplicate: the same outcome again, conflict: the opposite one, not_found)",
            ["outcome"], registry=self.registry)
        self.refunds_requested = Counter(
            "creditnotes_refunds_requested",
            "Refunds requested from the payment system (one refund.requested each)",
            registry=self.registry)
        self.refunds_linked = Counter(
            "creditnotes_refunds_linked",
            "Refunds already made in the payment system, linked on credit_note.issue",
            registry=self.registry)
        self.refunds_pending = Gauge(
            "creditnotes_refunds_pending", "Refunds requested and still waiting for their outcome",
            registry=self.registry)
        self.refund_oldest_pending = Gauge(
            "creditnotes_refund_oldest_pending_seconds",
            "Age of the oldest refund still waiting for its outcome", registry=self.registry)
        self.customer_balance_credited = Counter(
            "creditnotes_customer_balance_credited",
            "Amounts sent to a customer's credit balance (customer_balance.credited), by reason"
            " (credit_note, refund_failed, overpayment)", ["reason"], registry=self.registry)
        self.retention_pruned = Counter(
            "creditnotes_retention_pruned_rows", "Rows deleted by retention, by table",
            ["table"], registry=self.registry)
        self.retention_runs = Counter(
            "creditnotes_retention_runs",
            "Periodic prunes, by result (completed, skipped: another replica prunes, failed)",
            ["result"], registry=self.registry)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
