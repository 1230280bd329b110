"""Events as the interface's fields, recorded in memory for tests that check what was said.

`EventRecorder` is the one recorder: attach it to any logger (`recording_logger` makes a fresh
one), or take an `EventLog` and its recorded events together from `recording_events`."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

from tda_collector.observability.events import FIELDS_ATTR, EventLog, record_fields


class RecordedEvents(list):
    """Emitted events as the interface's fields (dicts); `named(event)` picks one kind."""

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self if e["event"] == event]


class EventRecorder(logging.Handler):
    """Keeps what its logger emitted: `records`, every record as it came, and `events`, each
    event's fields in the interface's order."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.events = RecordedEvents()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if hasattr(record, FIELDS_ATTR):
            self.events.append(record_fields(record))

    def named(self, event: str) -> list[dict[str, Any]]:
        return self.events.named(event)


def recording_logger(name: str = "tests.events") -> tuple[logging.Logger, EventRecorder]:
    """A fresh DEBUG logger of its own (nothing propagates) with a recorder attached."""
    logger = logging.getLogger(f"{name}.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    recorder = EventRecorder()
    logger.addHandler(recorder)
    return logger, recorder


def recording_events(context: Mapping[str, Any] | None = None) -> tuple[EventLog, RecordedEvents]:
    """An `EventLog` (with `context` bound) and the list its events land in."""
    logger, recorder = recording_logger()
    return EventLog(logger, dict(context or {})), recorder.events
