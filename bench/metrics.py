"""The service's ``/metrics`` seen by the benchmark: scrape, difference, quantiles from buckets.

A phase scrapes every replica before and after; the difference of the counters
and histogram buckets (summed over all labels) is what the phase did:

- ``creditnotes_batch_records`` (histogram): records per batch, so the batch-size
  distribution and the number of batches;
- ``creditnotes_transaction_seconds`` (histogram): the batch transaction's time,
  whose p50/p99 are estimated from the buckets the way PromQL's
  ``histogram_quantile`` does (linear within a bucket);
- ``creditnotes_db_round_trips_total`` (counter): PostgreSQL round trips, divided
  by the number of batches;
- ``creditnotes_messages_processed_total`` (counter): records processed, by outcome.

A metric the service does not export yet gives ``None`` (shown as "n/a").
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from typing import Any

#: sample name -> {sorted label pairs -> value}
Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]

BATCH = "creditnotes_batch_records"
TRANSACTION = "creditnotes_transaction_seconds"
ROUND_TRIPS = "creditnotes_db_round_trips_total"
PROCESSED = "creditnotes_messages_processed_total"


def scrape(port: int, timeout: float = 5.0) -> Samples | None:
    """Every sample of ``http://127.0.0.1:<port>/metrics``; ``None`` when it cannot be read."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                    timeout=timeout) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError, TimeoutError):
        return None
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = float(
                sample.value)
    return found


def difference(after: Samples | None, before: Samples | None) -> Samples | None:
    """``after - before`` per sample (gauges too; only counters and histograms are used)."""
    if after is None:
        return None
    before = before or {}
    result: Samples = {}
    for name, series in after.items():
        earlier = before.get(name, {})
        result[name] = {labels: value - earlier.get(labels, 0.0)
                        for labels, value in series.items()}
    return result


def add(samples: list[Samples | None]) -> Samples | None:
    """The sum of several replicas' samples (``None`` if none could be read)."""
    present = [sample for sample in samples if sample is not None]
    if not present:
        return None
    result: Samples = {}
    for sample in present:
        for name, series in sample.items():
            into = result.setdefault(name, {})
            for labels, value in series.items():
                into[labels] = into.get(labels, 0.0) + value
    return result


def total(samples: Samples | None, name: str, **where: str) -> float | None:
    """The sum of a sample over its labels (those matching ``where``); None if absent."""
    if samples is None or name not in samples:
        return None
    return sum(value for labels, value in samples[name].items()
               if all(dict(labels).get(key) == wanted for key, wanted in where.items()))


def buckets(samples: Samples | None, name: str) -> list[tuple[float, float]] | None:
    """A histogram's cumulative buckets summed over labels: [(le, count)], by le."""
    if samples is None or f"{name}_bucket" not in samples:
        return None
    summed: dict[float, float] = {}
    for labels, value in samples[f"{name}_bucket"].items():
        le = float(dict(labels)["le"])
        summed[le] = summed.get(le, 0.0) + value
    return sorted(summed.items())


def quantile(cumulative: list[tuple[float, float]] | None, q: float) -> float | None:
    """``histogram_quantile``: linear interpolation inside the bucket holding the q-quantile.

    In the ``+Inf`` bucket the answer is the highest finite bound (a lower bound).
    """
    if not cumulative:
        return None
    count = cumulative[-1][1]
    if count <= 0:
        return None
    rank = q * count
    lower_bound, lower_count = 0.0, 0.0
    for le, cumulated in cumulative:
        if cumulated >= rank:
            if math.isinf(le):
                return lower_bound
            inside = cumulated - lower_count
            fraction = (rank - lower_count) / inside if inside > 0 else 1.0
            return lower_bound + (le - lower_bound) * fraction
        lower_bound, lower_count = le, cumulated
    return lower_bound


def distribution(cumulative: list[tuple[float, float]] | None) -> dict[str, int] | None:
    """Counts per bucket, as ``"(a, b]"`` ranges (only non-empty ones)."""
    if not cumulative:
        return None
    shown: dict[str, int] = {}
    lower, previous = 0.0, 0.0
    for le, cumulated in cumulative:
        count = round(cumulated - previous)
        if count:
            upper = "inf" if math.isinf(le) else f"{le:g}"
            shown[f"({lower:g}, {upper}]"] = count
        lower, previous = le, cumulated
    return shown


def summary(samples: Samples | None) -> dict[str, Any]:
    """What a phase's metric differences say about batches, transactions and round trips."""
    batch = buckets(samples, BATCH)
    transaction = buckets(samples, TRANSACTION)
    batches = total(samples, f"{BATCH}_count")
    if batches is None:
        batches = total(samples, f"{TRANSACTION}_count")
    records = total(samples, f"{BATCH}_sum")
    round_trips = total(samples, ROUND_TRIPS)
    tx_sum = total(samples, f"{TRANSACTION}_sum")
    tx_count = total(samples, f"{TRANSACTION}_count")

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 2)

    def rounded(value: float | None, digits: int = 1) -> float | None:
        return None if value is None else round(value, digits)

    processed: dict[str, int] | None = None
    if samples is not None and PROCESSED in samples:
        processed = {}
        for labels, value in samples[PROCESSED].items():
            outcome = dict(labels).get("outcome", "?")
            processed[outcome] = processed.get(outcome, 0) + round(value)
    return {
        "scraped": samples is not None,
        "batches": None if batches is None else round(batches),
        "records_per_batch_mean": rounded(records / batches if records is not None and batches
                                          else None),
        "records_per_batch_p50": rounded(quantile(batch, 0.50)),
        "records_per_batch_p99": rounded(quantile(batch, 0.99)),
        "batch_size_distribution": distribution(batch),
        "transaction_ms_p50": ms(quantile(transaction, 0.50)),
        "transaction_ms_p99": ms(quantile(transaction, 0.99)),
        "transaction_ms_mean": ms(tx_sum / tx_count if tx_sum is not None and tx_count
                                  else None),
        # a counter that stayed at 0 over batches is not being counted (n/a), not 0 trips
        "round_trips_per_batch": rounded(round_trips / batches
                                         if round_trips and batches else None, 2),
        "processed_by_outcome": processed,
    }
