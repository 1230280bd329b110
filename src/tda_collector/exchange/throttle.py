"""What a rate-limit answer (HTTP 429/418, or an exchange's own throttling) does to an exchange.

The whole exchange waits: its one limiter is paused for the exchange's own `Retry-After` (the
backoff when it sent none), so no task of it asks again before then. A wait longer than the
policy's `retry_after_max_s` (a Retry-After of hours, a long ban) is waited out too, but never
silently: an `exchange_paused` error event, the `tda_exchange_paused_until_seconds` gauge, and
`Pauses`, which `/readyz` and the status page read until the exchange may be asked again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from threading import Lock
from typing import Any

from ..errors import RateLimited
from ..observability.events import EventLog
from ..observability.metrics import Metrics
from ..retry import RetryPolicy
from ..timeframes import iso_utc
from .ratelimit import Limiter


@dataclass(frozen=True)
class Pause:
    """An exchange that asked to be left alone for longer than the retry policy's ceiling."""

    exchange: str
    status: int | None
    resume_at_s: float  # epoch seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "exchange": self.exchange,
            "status": self.status,
            "resume_at": iso_utc(self.resume_at_s),
        }

    def reason(self) -> str:
        return f"{self.exchange} paused until {iso_utc(self.resume_at_s)} (HTTP {self.status})"


class Pauses:
    """The run's long pauses, one per exchange; a pause drops out once its time has come."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._by_exchange: dict[str, Pause] = {}
        self._lock = Lock()  # read by the admin server, written by the exchanges' tasks

    def add(self, pause: Pause) -> None:
        with self._lock:
            held = self._by_exchange.get(pause.exchange)
            if held is None or pause.resume_at_s > held.resume_at_s:
                self._by_exchange[pause.exchange] = pause

    def active(self) -> list[Pause]:
        now = self._clock()
        with self._lock:
            return sorted(
                (p for p in self._by_exchange.values() if p.resume_at_s > now),
                key=lambda p: p.exchange,
            )

    def reason(self) -> str | None:
        """One line naming every paused exchange, or None when none is."""
        active = self.active()
        return "; ".join(p.reason() for p in active) if active else None


class Throttle:
    """Rate-limit answers of one exchange: `pause` holds its limiter, `report` tells about it."""

    def __init__(
        self,
        exchange: str,
        limiter: Limiter,
        policy: RetryPolicy,
        events: EventLog,
        metrics: Metrics,
        pauses: Pauses | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._exchange, self._limiter, self._policy = exchange, limiter, policy
        self._events, self._metrics = events, metrics
        self._pauses = pauses if pauses is not None else Pauses(wall)
        self._clock, self._wall = clock, wall
        metrics.exchange_paused(exchange, 0.0)  # the series exists (at 0) before any pause

    def pause(self, wait_s: float) -> None:
        """Nobody asks the exchange for `wait_s` seconds (a retry loop's rate-limited wait)."""
        self._limiter.pause_until(self._clock() + wait_s)
        self._metrics.exchange_paused(self._exchange, self._wall() + wait_s)

    def report(self, exc: RateLimited, wait_s: float, attempt: int, **fields: Any) -> None:
        """Log the refusal (attempt = refusals in a row) and the wait it costs; a wait past the
        policy's ceiling also as `exchange_paused`, kept in `Pauses` until it is over."""
        log = self._events.error if exc.status == 418 else self._events.warning
        log(
            "rate_limited",
            f"{self._exchange} answered {exc.status}; every request waits {wait_s:.1f}s",
            **fields,
            status=exc.status,
            wait_s=round(wait_s, 3),
            attempt=attempt,
        )
        if not self._policy.exceeds_retry_after_max(wait_s):
            return
        resume_at_s = self._wall() + wait_s
        pause = Pause(self._exchange, exc.status, resume_at_s)
        self._pauses.add(pause)
        self._events.error(
            "exchange_paused",
            f"{pause.reason()}: longer than retry.retry_after_max_seconds "
            f"({self._policy.retry_after_max_s:g}s); waiting it out",
            status=exc.status,
            resume_at=iso_utc(resume_at_s),
            wait_s=round(wait_s, 3),
            error=str(exc)[:500],
        )
