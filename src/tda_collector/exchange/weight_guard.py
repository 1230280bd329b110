"""Slowing down before the exchange's own weight count runs out.

Our limiter spaces our requests, but the exchange counts every client on the IP: a trading
bot on the same host spends the same budget. Where the exchange reports the IP's used weight
on each answer (Binance: X-MBX-USED-WEIGHT-1M), a reading past the trip point pauses every
request of the exchange until its window turns over, instead of running into 429s and bans.

The trip point sits halfway into the headroom that `safety` leaves: our own traffic uses at
most `safety` of the budget, so only someone else's weight (or a budget configured too high)
can reach it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..observability.events import EventLog
from ..observability.metrics import Metrics
from .ratelimit import Limiter
from .source import UsedWeightRule


def trip_point(limit: int, safety: float) -> float:
    """The used weight at which requests pause: halfway between our share and the limit."""
    return limit * (1.0 + safety) / 2.0


def window_end_ms(at_ms: int, window_s: float) -> int:
    """End of the exchange window holding `at_ms` (windows are aligned to the epoch)."""
    window_ms = max(1, round(window_s * 1000))
    return (at_ms // window_ms + 1) * window_ms


class UsedWeightGuard:
    def __init__(
        self,
        exchange: str,
        rule: UsedWeightRule,
        safety: float,
        limiter: Limiter,
        events: EventLog,
        metrics: Metrics,
        exchange_now_ms: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._exchange = exchange
        self._rule = rule
        self._trip_at = trip_point(rule.limit, safety)
        self._limiter = limiter
        self._events = events
        self._metrics = metrics
        self._exchange_now_ms = exchange_now_ms
        self._clock = clock
        self._held_until_ms = 0  # end of the window we last paused for
        self.slowdowns = 0

    def observe(self, used: int, sent_ms: int) -> None:
        """One answer's reading; `sent_ms` (exchange clock) places it in its window, so a
        reading that arrives after its window turned over pauses nothing."""
        self._metrics.used_weight(self._exchange, used)
        if used < self._trip_at:
            return
        end_ms = window_end_ms(sent_ms, self._rule.window_s)
        wait_s = (end_ms - self._exchange_now_ms()) / 1000
        if end_ms <= self._held_until_ms or wait_s <= 0:
            return
        self._held_until_ms = end_ms
        self.slowdowns += 1
        self._limiter.pause_until(self._clock() + wait_s)
        self._metrics.slowdown(self._exchange)
        self._events.warning(
            "rate_slowdown",
            f"{self._exchange} reports {used}/{self._rule.limit} weight used this window; "
            f"every request waits {wait_s:.1f}s for the next",
            used_weight=used,
            limit=self._rule.limit,
            wait_s=round(wait_s, 3),
        )
