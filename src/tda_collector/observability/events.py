"""Structured events: one JSON object per line, built on the standard `logging` module.

`EventLog` is what components receive. It carries context (service, environment, mode, and
where bound, exchange/symbol/timeframe) and emits records whose fields a formatter turns into
the interface's JSON line. Other handlers (Loki) attach to the same logger and see the same
fields, so stdout and Loki always agree.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

FIELDS_ATTR = "tda_fields"


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The event's fields in the interface's order: ts, level, event, message, then the rest."""
    fields = dict(getattr(record, FIELDS_ATTR, {}))
    ts = datetime.fromtimestamp(record.created, tz=UTC)
    line = {
        "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": record.levelname,
        "event": fields.pop("event", "log"),
        "message": record.getMessage(),
    }
    line.update(fields)
    return line


class JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = record_fields(record)
        if record.exc_info and record.exc_info[1] is not None:
            line.setdefault("error", repr(record.exc_info[1]))
        return json.dumps(line, default=str, ensure_ascii=False)


class EventLog:
    """Emits events with bound context; cheap to `bind` per exchange or job."""

    def __init__(self, logger: logging.Logger, context: dict[str, Any] | None = None) -> None:
        self._logger = logger
        self._context = dict(context or {})

    @property
    def logger(self) -> logging.Logger:
        return self._logger

    def bind(self, **context: Any) -> EventLog:
        return EventLog(self._logger, {**self._context, **context})

    def emit(self, level: int, event: str, message: str, **fields: Any) -> None:
        if not self._logger.isEnabledFor(level):
            return
        payload = {"event": event, **self._context}
        payload.update((k, v) for k, v in fields.items() if v is not None)
        self._logger.log(level, message, extra={FIELDS_ATTR: payload})

    def debug(self, event: str, message: str, **fields: Any) -> None:
        self.emit(logging.DEBUG, event, message, **fields)

    def info(self, event: str, message: str, **fields: Any) -> None:
        self.emit(logging.INFO, event, message, **fields)

    def warning(self, event: str, message: str, **fields: Any) -> None:
        self.emit(logging.WARNING, event, message, **fields)

    def error(self, event: str, message: str, **fields: Any) -> None:
        self.emit(logging.ERROR, event, message, **fields)


def build_logger(name: str, level: str, stream: TextIO | None = None) -> logging.Logger:
    """A logger that writes JSON lines to `stream` (stdout) and does not propagate to root.

    Each run gets its own named logger so tests and embedded runs never share handlers.
    """
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(level)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonLineFormatter())
    logger.addHandler(handler)
    return logger
