"""Reporting invalid candles: one event and one counter per reason, the same in both modes."""

from __future__ import annotations

from collections.abc import Mapping

from ..models import JobKey
from ..observability.events import EventLog
from ..observability.metrics import Metrics


def report_rejections(
    events: EventLog, metrics: Metrics, key: JobKey, rejected: Mapping[str, int]
) -> None:
    for reason, count in sorted(rejected.items()):
        metrics.candles_rejected(key.exchange, reason, count)
        events.warning(
            "candle_rejected",
            f"{count} candles rejected: {reason}",
            symbol=key.symbol,
            timeframe=key.timeframe,
            reason=reason,
            rows=count,
        )
