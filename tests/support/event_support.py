"""Events as the interface's fields, recorded in memory for tests that check what was said."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from tda_collector.observability.events import FIELDS_ATTR, EventLog, record_fields


class RecordedEvents(list):
    """Emitted events as the interface's fields (dicts); `named(event)` picks one kind."""

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self if e["event"] == event]


class _Recorder(logging.Handler):
    def __init__(self, sink: RecordedEvents) -> None:
        super().__init__()
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, FIELDS_ATTR):
            self._sink.append(record_fields(record))


def recording_events() -> tuple[EventLog, RecordedEvents]:
    logger = logging.getLogger(f"tests.bigquery.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    recorded = RecordedEvents()
    logger.addHandler(_Recorder(recorded))
    return EventLog(logger), recorded
