"""The documents name only what the code has, and the contract names all of it.

A runbook that tells on-call to grep for a log line the service never writes,
or to alert on a metric it never exports, is a bug; so is a wire contract that
leaves out a message type, a reason code, a header, a command or a setting the
service has. These tests read the code (its log calls, its metric registry,
its settings class, its error tree, its routing table, its event codec, its
dead-letter headers, its command line) and the documents (README.md and
docs/*.md), and fail:

- on any name the documents use that the code does not have, except in a
  section of docs/contract.md or docs/rules.md that lists what is planned and
  not built yet (``PLANNED``), when there is one;
- on any log event, metric or dead-letter reason the runbook's tables leave
  out, and on any type, reason code, header, command or setting the contract
  leaves out (outside its planned section: a built thing is not "planned");
- on a link in README.md or docs/ that leads outside the repository, to a
  file that does not exist, or to a heading that does not exist, and on any
  mention of the specification's own files, which are not part of the product.
"""

from __future__ import annotations

import ast
import json
import re
from functools import cache
from pathlib import Path
from typing import Any, get_args
from urllib.parse import unquote, urlsplit

import pytest

from service.adapters import event_codec
from service.domain import errors
from service.domain.events import Event
from service.entrypoints import translators
from service.entrypoints.console.deps import ConsoleMetrics
from service.entrypoints.metrics import Metrics
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNBOOK = ROOT / "docs" / "operations.md"
CONTRACT = ROOT / "docs" / "contract.md"
RULES = ROOT / "docs" / "rules.md"
#: The heading, in contract.md and rules.md, of what the specification asks for and the code lacks.
PLANNED = "Not yet implemented (planned)"
#: A CloudEvent ``type``: ``<noun>.<past or imperative verb>``, snake_case on both sides.
TYPE_PATTERN = re.compile(r"[a-z]+(?:_[a-z]+)*\.[a-z]+(?:_[a-z]+)*")
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


def _families() -> list[Any]:
    """Both processes' registries: the service's and the console's (its own /metrics)."""
    return [*Metrics().registry.collect(), *ConsoleMetrics().registry.collect()]


@cache
def metric_names() -> frozenset[str]:
    """Every series name ``/metrics`` can show (counters with ``_total``, histogram parts)."""
    names = set()
    for family in _families():
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
    named = set(re.findall(r"\bcreditnotes_[a-z_]+[a-z]\b", built_part(document.read_text())))
    unknown = {name for name in named
               if name not in metric_names() and not _is_other_identifier(name)}
    assert not unknown, f"{doc_id(document)} names metrics /metrics does not have: {sorted(unknown)}"


def _is_other_identifier(name: str) -> bool:
    """Names that share the prefix but are not metrics: roles, the NOTIFY channel, users."""
    return name in {"creditnotes_outbox", "creditnotes_migrate", "creditnotes_service"} or (
        name.startswith(("creditnotes_app", "creditnotes_migrator", "creditnotes_keda")))


@pytest.mark.parametrize("document", DOCUMENTS, ids=doc_id)
def test_every_log_event_a_document_quotes_is_logged(document: Path) -> None:
    text = built_part(document.read_text())
    quoted = set(re.findall(r'"event":\s*"([^"]+)"', text))
    quoted |= set(re.findall(r"\blog(?:s|ged)?:? `([^`]+)`", text))
    quoted = {" ".join(event.split()) for event in quoted}  # prose wraps lines
    unknown = quoted - log_events()
    assert not unknown, f"{doc_id(document)} quotes log events the code never writes: {sorted(unknown)}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=doc_id)
def test_every_setting_a_document_names_exists(document: Path) -> None:
    named = set(re.findall(r"\bCREDITNOTES_[A-Z0-9_]*(?:<[A-Z_]+>|\*)?[A-Z0-9_]*",
                           built_part(document.read_text())))
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
                for family in _families()}
    assert documented - metric_names() == set(), "documented but not exported"
    assert exported - documented == set(), "exported but not in docs/operations.md's Metrics table"


def test_the_runbook_explains_every_dead_letter_reason_and_no_other() -> None:
    documented = set(first_column(section(RUNBOOK.read_text(), "Reasons and what to do")))
    assert documented - reason_codes() == set(), "documented reason codes the code does not have"
    assert undeliverable_codes() - documented == set(), "dead-letter reasons the runbook leaves out"


# --- the planned section ------------------------------------------------------------------


def section_span(text: str, heading: str) -> tuple[int, int] | None:
    """Where the section with this heading (its heading line included) starts and ends."""
    match = re.search(rf"^(#+) {re.escape(heading)}\s*$", text, re.MULTILINE)
    if match is None:
        return None
    level = len(match.group(1))
    end = re.search(rf"^#{{1,{level}}} ", text[match.end():], re.MULTILINE)
    return match.start(), match.end() + end.start() if end else len(text)


def built_part(text: str) -> str:
    """The document without its planned section: what it says the code does today."""
    span = section_span(text, PLANNED)
    return text if span is None else text[: span[0]] + text[span[1]:]


def without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def backticked(text: str) -> set[str]:
    """Every `name` in the prose and tables (not in fenced code blocks)."""
    return set(re.findall(r"`([^`\n]+)`", without_code_blocks(text)))


def contract() -> str:
    """docs/contract.md, up to its planned section."""
    return built_part(CONTRACT.read_text())


# --- what the code defines ----------------------------------------------------------------


def concrete_codes(base: type[errors.CreditNoteError]) -> frozenset[str]:
    """The codes of every subclass of ``base`` (the base's own code is never on the wire)."""
    codes: set[str] = set()
    stack = list(base.__subclasses__())
    while stack:
        cls = stack.pop()
        codes.add(cls.code)
        stack.extend(cls.__subclasses__())
    return frozenset(codes)


@cache
def types_read() -> dict[str, frozenset[str]]:
    """Input topic (default name) -> the CloudEvent types the service reads there."""
    return {topic: frozenset(route.translators)
            for topic, route in translators.routes(Settings(_env_file=None)).items()}


@cache
def types_written() -> frozenset[str]:
    """The CloudEvent types the event codec writes: the type-shaped strings in its source.

    Read from the code, not listed here, so a new output type is seen the day it
    is added; every kind of domain event has at least one type.
    """
    source = Path(event_codec.__file__).read_text()
    found = {node.value for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and TYPE_PATTERN.fullmatch(node.value)}
    assert len(found) >= len(get_args(Event)), f"fewer output types than domain events: {found}"
    return frozenset(found)


def all_types() -> frozenset[str]:
    return frozenset().union(*types_read().values(), types_written())


@cache
def dead_letter_headers() -> frozenset[str]:
    """Every ``dlq.*`` header name the service spells out."""
    names = set()
    for path in (ROOT / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and re.fullmatch(r"dlq(?:\.[a-z_]+)+", node.value)):
                names.add(node.value)
    return frozenset(names)


# --- (a) the contract names everything the code has ---------------------------------------


def test_every_type_the_service_reads_is_in_the_contract_on_its_topic() -> None:
    rows = {row[0]: row for row in table_rows(section(contract(), "Topics"))}
    for topic, types in types_read().items():
        assert topic in rows, f"docs/contract.md's Topics table has no row for topic {topic}"
        listed = set(re.findall(r"`([^`]+)`", rows[topic][2]))
        assert types - listed == set(), f"types read on {topic} missing from its Topics row"
    described = backticked(section(contract(), "Messages read"))
    assert all_read() - described == set(), "types read but not described under Messages read"


def all_read() -> frozenset[str]:
    return frozenset().union(*types_read().values())


def test_every_type_the_service_writes_is_in_the_contract() -> None:
    listed = backticked(section(contract(), "Topics"))
    described = backticked(section(contract(), "Messages written"))
    assert types_written() - listed == set(), "types written but not in the Topics table"
    assert types_written() - described == set(), "types written but not under Messages written"


def test_the_contract_lists_exactly_the_rejection_codes_the_code_has() -> None:
    documented = set(first_column(section(contract(), "Rejection reasons")))
    assert concrete_codes(errors.Rejection) - documented == set(), \
        "rejection codes the code has and docs/contract.md's Rejection reasons leave out"
    assert documented - concrete_codes(errors.Rejection) == set(), \
        "rejection codes docs/contract.md lists (outside its planned section) the code lacks"


def test_the_contract_lists_exactly_the_dead_letter_reasons_the_code_has() -> None:
    documented = set(first_column(section(contract(), "Dead-letter reasons")))
    assert concrete_codes(errors.Undeliverable) - documented == set(), \
        "dead-letter reasons the code has and docs/contract.md's Dead-letter reasons leave out"
    assert documented - concrete_codes(errors.Undeliverable) == set(), \
        "dead-letter reasons docs/contract.md lists (outside its planned section) the code lacks"


def test_the_contract_lists_exactly_the_dead_letter_headers_the_service_writes() -> None:
    documented = set(first_column(section(contract(), "Dead-letter headers")))
    assert dead_letter_headers() - documented == set(), "headers docs/contract.md leaves out"
    assert documented - dead_letter_headers() == set(), "documented headers the code never spells"


def test_every_setting_is_in_the_contracts_settings_table() -> None:
    documented = set(first_column(section(contract(), "Settings")))
    families = [name.split("<")[0] for name in documented if "<" in name]
    missing = {name for name in setting_names()
               if name not in documented and not name.startswith(tuple(families))}
    assert not missing, f"settings docs/contract.md's Settings table leaves out: {sorted(missing)}"


def command_line_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from service.entrypoints.cli import main  # here: only these tests need the command line

    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def subcommands(help_text: str) -> list[str]:
    """The ``{a,b,c}`` choices of the first positional in an argparse usage."""
    match = re.search(r"\{([a-z,-]+)\}", help_text)
    return match.group(1).split(",") if match else []


def test_every_command_and_option_is_in_the_contracts_command_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    documented = section(contract(), "Command line")
    commands = subcommands(command_line_help([], capsys))
    assert {"run", "migrate"} <= set(commands), commands
    for command in commands:
        text = command_line_help([command], capsys)
        for path in [[command, sub] for sub in subcommands(text)] or [[command]]:
            spelled = " ".join(["creditnotes", *path])
            assert f"`{spelled}" in documented, f"docs/contract.md leaves out `{spelled}`"
            options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", command_line_help(path, capsys)))
            missing = {option for option in options - {"--help"} if option not in documented}
            assert not missing, f"`{spelled}` options docs/contract.md leaves out: {missing}"


# --- (b) what the contract names (outside its planned section) the code has ---------------


def test_every_type_the_contract_names_outside_its_planned_section_exists() -> None:
    named = {name for name in backticked(contract()) if TYPE_PATTERN.fullmatch(name)
             and not name.startswith(("dlq.", "data.")) and not name.endswith(".dlq")}
    assert named, "the type pattern found nothing: the test would prove nothing"
    unknown = named - all_types()
    assert not unknown, (f"docs/contract.md names types the code does not read or write: "
                         f"{sorted(unknown)}; planned ones belong under '{PLANNED}'")


def test_every_reason_code_the_contract_cites_outside_its_planned_section_exists() -> None:
    text = " ".join(contract().split())  # prose wraps lines
    cited = set(re.findall(r"(?:rejected|dead-lettered|dead-letters?|rejection)"
                           r"(?: as| with)? `([a-z_]+)`", text))
    assert cited, "the pattern found no cited code: the test would prove nothing"
    unknown = cited - reason_codes()
    assert not unknown, (f"docs/contract.md cites reason codes the code does not have: "
                         f"{sorted(unknown)}; planned ones belong under '{PLANNED}'")


def test_the_money_loops_codes_are_built_and_documented_or_planned_never_both() -> None:
    """Each code the money loop adds is either in the code and documented as built, or planned.

    The planned section is deleted once everything in it is built; a code still
    named there after it was built would tell readers it is not.
    """
    for document in (CONTRACT, RULES):
        text = document.read_text()
        span = section_span(text, PLANNED)
        planned = text[span[0]:span[1]] if span else ""
        for code in ("refund_not_found", "refund_state_conflict", "refund_already_linked",
                     "invalid_effective_at", "payment_conflict"):
            if code in reason_codes():
                assert f"`{code}`" not in planned, f"{doc_id(document)}: {code} is built, not planned"
                assert f"`{code}`" in built_part(text), f"{doc_id(document)}: {code} built, undocumented"
            else:
                assert f"`{code}`" in planned, f"{doc_id(document)}: {code} neither built nor planned"


# --- (c) links stay inside the repository -------------------------------------------------


def links(text: str) -> list[str]:
    """Targets of inline links and images, reference definitions and HTML href/src."""
    text = without_code_blocks(text)
    found = re.findall(r"\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    found += re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text, re.MULTILINE)
    found += re.findall(r"(?:href|src)\s*=\s*[\"']([^\"']+)[\"']", text)
    return found


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file."""
    seen: dict[str, int] = {}
    result = set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*#*\s*$", without_code_blocks(path.read_text()),
                              re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


@pytest.mark.parametrize("document", DOCUMENTS, ids=doc_id)
def test_every_link_stays_inside_the_repository_and_resolves(document: Path) -> None:
    problems = []
    for target in links(document.read_text()):
        parts = urlsplit(target)
        if parts.scheme or parts.netloc or target.startswith("/"):
            problems.append(f"{target}: leads outside the repository")
            continue
        path = (document.parent / unquote(parts.path)).resolve() if parts.path else document
        if not path.is_relative_to(ROOT):
            problems.append(f"{target}: leads outside the repository")
        elif not path.exists():
            problems.append(f"{target}: no such file in the repository")
        elif parts.fragment and path.suffix == ".md" and parts.fragment not in anchors(path):
            problems.append(f"{target}: no such heading")
    assert not problems, f"{doc_id(document)}: {problems}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=doc_id)
def test_no_document_refers_to_the_specifications_own_files(document: Path) -> None:
    """The contract and the rules are docs/contract.md and docs/rules.md, in the repository."""
    text = document.read_text()
    mentions = re.findall(r"\.\./shared|\bshared/|\bCONTRACT\.md|\bRULES\.md|\bSTYLE\.md", text)
    assert not mentions, f"{doc_id(document)} refers to files outside the repository: {mentions}"


def table_rows(table_text: str) -> list[list[str]]:
    """The body rows of the markdown tables in ``table_text``: cells, the first unquoted."""
    rows = []
    lines = table_text.splitlines()
    for line, following in zip(lines, [*lines[1:], ""], strict=True):
        is_separator = set(following) <= set("|-: ") and following.startswith("|")
        if not line.startswith("|") or set(line) <= set("|-: ") or is_separator:
            continue
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        rows.append([cells[0].strip("`"), *cells[1:]])
    return rows


# --- rules.md points at code that exists --------------------------------------------------


@cache
def code_names() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Module stem -> its top-level names; class name -> its members (fields, methods)."""
    modules: dict[str, set[str]] = {}
    classes: dict[str, set[str]] = {}
    for path in (ROOT / "service").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        names = modules.setdefault(path.stem, set())
        for node in tree.body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(target.id for target in targets if isinstance(target, ast.Name))
            if isinstance(node, ast.ClassDef):
                members = classes.setdefault(node.name, set())
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                        members.add(item.name)
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        members.add(item.target.id)
                    elif isinstance(item, ast.Assign):
                        members.update(t.id for t in item.targets if isinstance(t, ast.Name))
    return modules, classes


def test_every_function_and_class_rules_md_points_to_exists() -> None:
    """'enforced by `issuing._settle`' must name code that is there, so a move updates the doc."""
    modules, classes = code_names()
    defined = set().union(*modules.values(), *classes.values())
    unknown = set()
    for name in backticked(built_part(RULES.read_text())):
        for match in re.finditer(r"\b([A-Za-z_]\w*)\.([A-Za-z_]\w*)\b", name):
            owner, member = match.groups()
            if match.group(0) in all_types() or member == "py":
                continue  # a message type, a file name
            members = classes.get(owner, modules.get(owner))  # a class, else a module
            if members is not None and member not in members:
                unknown.add(match.group(0))
        if re.fullmatch(r"_[a-z]\w*", name) and name not in defined:
            unknown.add(name)
    assert not unknown, f"docs/rules.md points to code that does not exist: {sorted(unknown)}"


# --- fields: the contract's field tables and the JSON Schemas generated from the code -----


@cache
def schema_fields() -> frozenset[str]:
    """Every property name in schemas/json (generated from the wire models and the codec)."""
    names: set[str] = set()
    stack: list[object] = [json.loads(path.read_text())
                           for path in (ROOT / "schemas" / "json").glob("*.json")]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            properties = node.get("properties")
            if isinstance(properties, dict):
                names.update(properties)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    assert names, "no schema properties found"
    return frozenset(names)


def field_table_names(text: str) -> set[str]:
    """The backticked names in the first column of tables whose first header is ``field``."""
    names: set[str] = set()
    in_field_table = False
    for line in text.splitlines():
        if not line.startswith("|"):
            in_field_table = False
            continue
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        if cells and cells[0] == "field":
            in_field_table = True
        elif in_field_table and not set(line) <= set("|-: "):
            names.update(re.findall(r"`([^`]+)`", cells[0]))
    return names


def test_every_field_in_the_contracts_message_tables_is_in_a_schema_and_back() -> None:
    messages = section(contract(), "Messages read") + section(contract(), "Messages written")
    documented = field_table_names(messages)
    assert documented, "no field tables found: the test would prove nothing"
    assert documented - schema_fields() == set(), \
        "fields docs/contract.md's message tables name (outside its planned section) no message has"
    mentioned = {word for name in backticked(contract()) for word in re.findall(r"\w+", name)}
    assert schema_fields() - mentioned == set(), "message fields docs/contract.md never names"


def test_the_runbook_lists_exactly_the_invariants_verify_checks() -> None:
    from service.adapters.invariants import INVARIANTS

    documented = set(first_column(section(RUNBOOK.read_text(), "`creditnotes verify`")))
    checked = {invariant.code for invariant in INVARIANTS}
    assert checked - documented == set(), "invariants docs/operations.md's verify table leaves out"
    assert documented - checked == set(), "verify codes docs/operations.md names that verify lacks"


@cache
def defined_tests() -> frozenset[str]:
    """The names of every test function under tests/ and bench/."""
    names = set()
    for path in [*(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith(
                    "test_"):
                names.add(node.name)
    return frozenset(names)


@pytest.mark.parametrize("document", DOCUMENTS, ids=doc_id)
def test_every_test_a_document_cites_as_proof_exists(document: Path) -> None:
    """A guarantee's proof that names a renamed or deleted test proves nothing."""
    cited = {name for quoted in backticked(document.read_text())
             for name in re.findall(r"(?<![\w/.])(test_[a-z0-9_]+)(?![\w.<])", quoted)}
    unknown = cited - defined_tests()
    assert not unknown, f"{doc_id(document)} cites tests that do not exist: {sorted(unknown)}"
