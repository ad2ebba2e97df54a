"""structlog, configured once: JSON in production, console on a terminal.

Context (topic, offset, event id, invoice id) is bound with contextvars by the
consumer; nothing logs payloads or personal data.
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
