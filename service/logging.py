"""structlog, configured once: JSON in production, console on a terminal.

Each record's log line carries its topic, partition, offset, event id and type,
outcome and reason, invoice id and credit note id; contextvars are merged in
for anything bound around a call. Nothing logs payloads or personal data.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(log_format: str | None, level: str = "INFO") -> None:
    use_console = log_format == "console" or (log_format is None and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(message)s")
