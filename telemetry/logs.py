"""JSON logs: one object per line on stdout, through structlog and django-structlog.

Both kinds of log call end up in the same handler: structlog loggers
(django-structlog's request lines) and plain `logging` calls, whose
`extra={...}` fields become keys of the object. Every line gets the
context bound in contextvars (session_id, transport, request_id), the
trace id of the current span, and never a token; payloads only at debug.

structlog's lines are rendered at the end of structlog's own chain and
handed to `logging` as finished text. Rendered in the handler's
ProcessorFormatter instead, each record was copied and went through a
second chain; that, and the caller lookup `logging` makes by default, cost
about a third of a line's CPU, and django-structlog logs two lines for
every HTTP request.
"""

import logging
from typing import Any

import structlog
from opentelemetry import trace
from structlog.typing import EventDict, Processor, WrappedLogger

# Keys that may carry a secret or a client's data: dropped from every line
# at info and above, whoever logged them. Payload traces are debug lines.
_SECRET = ("token", "authorization", "cookie")
_DATA = ("payload",)


def add_trace_id(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """Add the current span's trace and span ids, so logs and traces join."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event.setdefault("trace_id", format(context.trace_id, "032x"))
        event.setdefault("span_id", format(context.span_id, "016x"))
    return event


def redact(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """Drop tokens from every line, and payloads from lines above debug."""
    for key in _SECRET:
        event.pop(key, None)
    if event.get("level") != "debug":
        for key in _DATA:
            event.pop(key, None)
    return event


def _shared() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        add_trace_id,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


# The record attribute that marks a line structlog has rendered already.
RENDERED = "structlog_rendered"
_JSON = structlog.processors.JSONRenderer(default=str)


def hand_over(logger: WrappedLogger, method: str, event: EventDict) -> Any:
    """Render the line, and pass it to the stdlib logger marked as finished."""
    return (_JSON(logger, method, event),), {"extra": {RENDERED: True}}


class JSONLines(structlog.stdlib.ProcessorFormatter):
    """Write structlog's finished lines as they are, and render the others."""

    def format(self, record: logging.LogRecord) -> str:
        if record.__dict__.get(RENDERED):
            # Its traceback, if any, is in the line already (format_exc_info).
            line: str = record.msg
            return line
        return super().format(record)


def configure_structlog() -> None:
    """Render structlog's events in its own chain, then hand them to the stdlib handler."""
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared(),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact,
            hand_over,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def logging_config(level: str) -> dict[str, Any]:
    """Return the LOGGING setting: JSON lines on stdout at `level`."""
    configure_structlog()
    # No line carries the caller's file, thread or process, which `logging`
    # would otherwise look up for every record (its documented opt-outs).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {
                "()": JSONLines,
                "foreign_pre_chain": [*_shared(), structlog.stdlib.ExtraAdder()],
                "processors": [
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    redact,
                    _JSON,
                ],
            }
        },
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stdout",
            }
        },
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            # Every SQL statement at debug would bury the payload traces.
            "django.db.backends": {"level": "INFO"},
        },
    }
