"""Progress of a run: totals, rates over a recent window, ETA, and the throttled event.

Totals come from the registry's per-exchange tallies, kept current as jobs change, and rates
from one sample a second of a few totals; so a `/progress` query costs O(exchanges) however many
jobs run. Progress counts candle slots (the candles in the window, on the series' calendar:
14 for fourteen months of 1M): a 1m job weighs 60 times a
1h job over the same range, which is roughly the requests each needs, and so what the ETA is
about. The ETA is an estimate: a range before a listing is covered in one page, faster than the
rate predicts.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .model import OPEN, PAUSED, STATUSES
from .registry import ExchangeTally, JobRegistry

RATE_WINDOW_S = 30.0  # rates are over about the last half minute
_MIN_SPAN_S = 0.5  # no rate from less than this


class RateWindow:
    """Samples of a growing total; its rate is the growth since the oldest sample in the window."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()

    def sample(self, t: float, value: float) -> None:
        self._samples.append((t, value))
        while len(self._samples) > 2 and self._samples[1][0] <= t - self.window_s:
            self._samples.popleft()

    def rate(self, t: float, value: float) -> float | None:
        """Per second, from the oldest kept sample to (t, value); None without enough history."""
        if not self._samples:
            return None
        t0, v0 = self._samples[0]
        return (value - v0) / (t - t0) if t - t0 >= _MIN_SPAN_S else None


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


@dataclass(frozen=True)
class Summary:
    """A run's progress at one instant: what `/progress`, the event and the bar show."""

    mode: str
    counts: dict[str, int]  # jobs by status, every status present
    candles: int
    covered: float | None  # fraction of the requested candle slots stored (history only)
    candles_per_s: float | None
    jobs_per_s: float | None
    eta_s: float | None
    exchanges: list[dict[str, object]]
    updated_ms: int

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        return sum(n for status, n in self.counts.items() if status not in OPEN)

    def line(self) -> str:
        covered = f", {self.covered:.1%} covered" if self.covered is not None else ""
        return (
            f"{self.done}/{self.total} jobs done{covered}, {self.candles:,} candles, "
            f"{self.candles_per_s or 0:,.0f} candles/s, ETA {format_eta(self.eta_s)}"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "running": self.done < self.total,
            "jobs": {"total": self.total, "done": self.done, "by_status": self.counts},
            "candles": self.candles,
            "covered": self.covered,
            "rate": {
                "candles_per_s": self.candles_per_s,
                "jobs_per_s": self.jobs_per_s,
                "window_s": RATE_WINDOW_S,
            },
            "eta_s": self.eta_s,
            "exchanges": self.exchanges,
            "updated_ms": self.updated_ms,
        }

    def event_fields(self) -> dict[str, object]:
        return {
            "jobs": self.total,
            "done": self.done,
            "paused": self.counts[PAUSED],
            "rows": self.candles,
            "covered": self.covered,
            "candles_per_s": self.candles_per_s,
            "jobs_per_s": self.jobs_per_s,
            "eta_s": self.eta_s,
        }


class Progress:
    """Rates and ETA of the registry's run; `tick` once a second, `summary` on every query."""

    def __init__(self, registry: JobRegistry, clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self._clock = clock
        self._candles = RateWindow()
        self._jobs_done = RateWindow()
        self._slots = RateWindow()
        self._requests: dict[str, RateWindow] = {}

    def tick(self) -> None:
        now = self._clock()
        totals = self._totals()
        self._candles.sample(now, totals.rows)
        self._jobs_done.sample(now, totals.done)
        self._slots.sample(now, totals.covered)
        for exchange, tally in self._registry.tallies.items():
            if tally.requests is not None:
                window = self._requests.setdefault(exchange, RateWindow())
                window.sample(now, tally.requests())

    def _totals(self) -> ExchangeTally:
        total = ExchangeTally()
        for tally in self._registry.tallies.values():
            total.counts.update(tally.counts)
            total.rows += tally.rows
            total.slots += tally.slots
            total.covered += tally.covered
            total.remaining += tally.remaining
        return total

    def _eta_s(self, now: float, totals: ExchangeTally) -> float | None:
        if totals.remaining <= 1e-9:
            return 0.0
        rate = self._slots.rate(now, totals.covered)
        return totals.remaining / rate if rate else None

    def summary(self) -> Summary:
        now = self._clock()
        totals = self._totals()
        history = self._registry.mode == "history"
        jobs = sum(totals.counts.values())
        covered = totals.covered / totals.slots if totals.slots else (1.0 if jobs else None)
        return Summary(
            mode=self._registry.mode,
            counts={status: totals.counts[status] for status in STATUSES},
            candles=totals.rows,
            covered=_round(covered, 6) if history else None,
            candles_per_s=_round(self._candles.rate(now, totals.rows), 1),
            jobs_per_s=_round(self._jobs_done.rate(now, totals.done), 3),
            eta_s=_round(self._eta_s(now, totals), 1) if history and jobs else None,
            exchanges=[
                self._exchange(now, exchange, tally)
                for exchange, tally in self._registry.tallies.items()
            ],
            updated_ms=self._registry.clock_ms(),
        )

    def _exchange(self, now: float, exchange: str, tally: ExchangeTally) -> dict[str, object]:
        window = self._requests.get(exchange)
        rate = window.rate(now, tally.requests()) if window and tally.requests else None
        budget = tally.budget_per_s
        return {
            "id": exchange,
            "jobs": sum(tally.counts.values()),
            "done": tally.done,
            "candles": tally.rows,
            "covered": _round(tally.covered / tally.slots, 6) if tally.slots else None,
            "requests_per_s": _round(rate, 2),
            "budget_per_s": budget,
            "limit_per_s": _round(tally.limit_per_s, 3),
            "budget_used": _round(rate / budget, 4) if rate is not None and budget else None,
        }
