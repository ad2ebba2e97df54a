"""The documents name only what the code has: log events, metrics, settings, reason codes.

A runbook that tells on-call to grep for a log line the service never writes,
or to alert on a metric it never exports, is a bug. These tests read the code
(its log calls, its metric registry, its settings class, its error tree) and
the documents (README.md and docs/*.md), and fail on any name the documents use
that the code does not have, and on any log event, metric or dead-letter
reason the runbook's tables leave out.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

from service.domain import errors
from service.entrypoints.metrics import Metrics
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNBOOK = ROOT / "docs" / "operations.md"
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}

#: ``CREDITNOTES_*`` names the documents use that are not service settings, and why.
NOT_SETTINGS = {
    "CREDITNOTES_HOST_PORT": "docker-compose.yml's host port for the service",
    "CREDITNOTES_MIGRATE_PASSWORD": "docker-compose.yml's password of its migrating login",
    "CREDITNOTES_SERVICE_PASSWORD": "docker-compose.yml's password of the service's login",
    "CREDITNOTES_FUZZ_EXAMPLES": "how many examples the boundary fuzz test generates",
    "CREDITNOTES_FLOOD_RECORDS": "the memory flood test's size",
    "CREDITNOTES_FLOOD_PARTITIONS": "the memory flood test's partitions",
    "CREDITNOTES_FLOOD_ENV": "the memory flood test's extra settings",
}


@cache
def log_events() -> frozenset[str]:
    """Every event name the service passes to a structlog logger (``log.info("...")``)."""
    events = set()
    for path in (ROOT / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LOG_METHODS
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in {"log", "logger"}
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                events.add(node.args[0].value)
    return frozenset(events)


@cache
def metric_names() -> frozenset[str]:
    """Every series name ``/metrics`` can show (counters with ``_total``, histogram parts)."""
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names.update(f"{family.name}_{part}" for part in ("bucket", "sum", "count"))
    return frozenset(names)


@cache
def setting_names() -> frozenset[str]:
    return frozenset(f"CREDITNOTES_{name.upper()}" for name in Settings.model_fields)


@cache
def reason_codes() -> frozenset[str]:
    """The codes of every error the service raises on purpose (the wire's ``reason``)."""
    codes: set[str] = set()
    stack: list[type[errors.CreditNoteError]] = [errors.CreditNoteError]
    while stack:
        cls = stack.pop()
        codes.add(cls.code)
        stack.extend(cls.__subclasses__())
    return frozenset(codes)


def undeliverable_codes() -> set[str]:
    codes: set[str] = set()
    stack: list[type[errors.CreditNoteError]] = list(errors.Undeliverable.__subclasses__())
    while stack:
        cls = stack.pop()
        codes.add(cls.code)
        stack.extend(cls.__subclasses__())
    return codes


def section(text: str, heading: str) -> str:
    """The body of the markdown section with this heading, up to the next of its level or above."""
    match = re.search(rf"^(#+) {re.escape(heading)}\s*$", text, re.MULTILINE)
    assert match, f"no section {heading!r}"
    level = len(match.group(1))
    rest = text[match.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def first_column(table_text: str) -> list[str]:
    """The backticked names in the first column of the markdown tables in ``table_text``."""
    names = []
    lines = table_text.splitlines()
    for line, following in zip(lines, [*lines[1:], ""], strict=True):
        is_separator = set(following) <= set("|-: ") and following.startswith("|")
        if not line.startswith("|") or set(line) <= set("|-: ") or is_separator:
            continue  # not a table row, a separator, or the header above one
        cell = line.split("|")[1]
        names += re.findall(r"`([^`]+)`", cell)
    return names


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("document", DOCUMENTS, ids=doc_id)
def test_every_metric_a_document_names_is_exported(document: Path) -> None:
    named = set(re.findall(r"\bcreditnotes_[a-z_]+[a-z]\b", document.read_text()))
    unknown = {name for name in named
               if name not in metric_names() and not _is_other_identifier(name)}
    assert not unknown, f"{doc_id(document)} names metrics /metrics does not have: {sorted(unknown)}"


def _is_other_identifier(name: str) -> bool:
    """Names that share the prefix but are not metrics: roles, the NOTIFY channel, users."""
    return name in {"creditnotes_outbox", "creditnotes_migrate", "creditnotes_service"} or (
        name.startswith(("creditnotes_app", "creditnotes_migrator", "creditnotes_keda")))


@pytest.mark.parametrize("document", DOCUMENTS, ids=doc_id)
def test_every_log_event_a_document_quotes_is_logged(document: Path) -> None:
    text = document.read_text()
    quoted = set(re.findall(r'"event":\s*"([^"]+)"', text))
    quoted |= set(re.findall(r"\blog(?:s|ged)?:? `([^`]+)`", text))
    quoted = {" ".join(event.split()) for event in quoted}  # prose wraps lines
    unknown = quoted - log_events()
    assert not unknown, f"{doc_id(document)} quotes log events the code never writes: {sorted(unknown)}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=doc_id)
def test_every_setting_a_document_names_exists(document: Path) -> None:
    named = set(re.findall(r"\bCREDITNOTES_[A-Z0-9_]*(?:<[A-Z_]+>|\*)?[A-Z0-9_]*", document.read_text()))
    unknown = set()
    for name in named:
        if name in NOT_SETTINGS or name == "CREDITNOTES_":
            continue
        if "<" in name or "*" in name or name.endswith("_"):  # a family: CREDITNOTES_TOPIC_<NAME>
            prefix = re.split(r"[<*]", name)[0]
            if not any(setting.startswith(prefix) for setting in setting_names()):
                unknown.add(name)
        elif name not in setting_names():
            unknown.add(name)
    assert not unknown, f"{doc_id(document)} names settings the service does not read: {sorted(unknown)}"


def test_the_runbook_lists_exactly_the_log_events_the_code_writes() -> None:
    documented = set(first_column(section(RUNBOOK.read_text(), "Logs")))
    assert documented - log_events() == set(), "documented but never logged"
    assert log_events() - documented == set(), "logged but not in docs/operations.md's Logs table"


def test_the_runbook_lists_exactly_the_metrics_the_service_exports() -> None:
    documented = set(first_column(section(RUNBOOK.read_text(), "Metrics")))
    exported = {family.name + ("_total" if family.type == "counter" else "")
                for family in Metrics().registry.collect()}
    assert documented - metric_names() == set(), "documented but not exported"
    assert exported - documented == set(), "exported but not in docs/operations.md's Metrics table"


def test_the_runbook_explains_every_dead_letter_reason_and_no_other() -> None:
    documented = set(first_column(section(RUNBOOK.read_text(), "Reasons and what to do")))
    assert documented - reason_codes() == set(), "documented reason codes the code does not have"
    assert undeliverable_codes() - documented == set(), "dead-letter reasons the runbook leaves out"
