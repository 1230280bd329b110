"""Prometheus metrics: one `Metrics` object per run, owning its own registry (no globals).

Components get small methods to call (`metrics.request("binance", "ok", 0.21)`) instead of
touching prometheus_client, so metric names and labels live in this one file, and the Grafana
dashboards (deploy/grafana/dashboards) are checked against them by tests/test_deploy.py.
Label values are exchange ids, store names, timeframes, outcomes, reasons and job states:
all low-cardinality. Symbols never become labels.

Labelled counters start at 0 for the label values known when an exchange is opened
(`set_budget`), a store first writes, or a series first stores a closed candle: a healthy
system then shows 0 errors, throttles and rejects, not "No data" (a labelled series exists
only once `.labels(...)` has been called).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from threading import Lock

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..normalize import MALFORMED, MISALIGNED, NEGATIVE_VOLUME, NOT_FINITE, OHLC_INCONSISTENT

CONTENT_TYPE = CONTENT_TYPE_LATEST
OUTCOMES = ("ok", "transient", "rate_limited", "permanent")
THROTTLE_STATUSES = ("429", "418")
REJECT_REASONS = (MALFORMED, MISALIGNED, NOT_FINITE, OHLC_INCONSISTENT, NEGATIVE_VOLUME)
# A candle request takes ~50 ms to a few seconds; the top buckets show stalls up to the timeout.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _LagCollector(Collector):
    """Lag is computed at scrape time from each series' newest stored close time, so it keeps
    growing while nothing new is stored (a gauge set once per cycle would look fine when stuck).
    Per (exchange, timeframe) it reports the series furthest behind; symbols stay internal."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._closes: dict[tuple[str, str, str], float] = {}
        self._lock = Lock()

    def update(self, exchange: str, symbol: str, timeframe: str, close_s: float) -> None:
        with self._lock:
            key = (exchange, timeframe, symbol)
            self._closes[key] = max(close_s, self._closes.get(key, close_s))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "tda_candle_lag_seconds",
            "Seconds between now and the close of the newest stored closed candle "
            "(the series furthest behind).",
            labels=["exchange", "timeframe"],
        )
        now = self._clock()
        oldest: dict[tuple[str, str], float] = {}
        with self._lock:
            for (exchange, timeframe, _symbol), close_s in self._closes.items():
                key = (exchange, timeframe)
                oldest[key] = min(close_s, oldest.get(key, close_s))
        for (exchange, timeframe), close_s in sorted(oldest.items()):
            family.add_metric([exchange, timeframe], max(0.0, now - close_s))
        yield family


class _PausedCollector(Collector):
    """Until when each exchange is paused after a rate-limit answer (epoch seconds); 0 once
    that time has passed, read at scrape time so that a pause ends on its own."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._until: dict[str, float] = {}
        self._lock = Lock()

    def update(self, exchange: str, until_s: float) -> None:
        with self._lock:
            self._until[exchange] = max(until_s, self._until.get(exchange, until_s))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "tda_exchange_paused_until_seconds",
            "Epoch seconds until which the exchange asked to be left alone (429/418 with "
            "Retry-After); 0 when it is not paused.",
            labels=["exchange"],
        )
        now = self._clock()
        with self._lock:
            until = sorted(self._until.items())
        for exchange, until_s in until:
            family.add_metric([exchange], until_s if until_s > now else 0.0)
        yield family


class Metrics:
    """Every metric the collector exports. Thread-safe (the Loki thread reports drops)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(
            "tda_exchange_requests",
            "Candle requests by outcome.",
            ["exchange", "outcome"],
            registry=r,
        )
        self._request_weight = Counter(
            "tda_exchange_request_weight",
            "Budget units consumed by requests (a request may cost more than 1).",
            ["exchange"],
            registry=r,
        )
        self._budget = Gauge(
            "tda_rate_limit_budget_per_second",
            "The exchange's published request budget in budget units per second.",
            ["exchange"],
            registry=r,
        )
        self._fetch_seconds = Histogram(
            "tda_fetch_duration_seconds",
            "Latency of candle requests, any outcome.",
            ["exchange"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._waits = Counter(
            "tda_rate_limit_waits",
            "Times a request waited for the rate limiter.",
            ["exchange"],
            registry=r,
        )
        self._wait_seconds = Counter(
            "tda_rate_limit_wait_seconds",
            "Seconds spent waiting for the rate limiter.",
            ["exchange"],
            registry=r,
        )
        self._used_weight = Gauge(
            "tda_exchange_used_weight",
            "The IP's used request weight in the current window, as the exchange reports it.",
            ["exchange"],
            registry=r,
        )
        self._slowdowns = Counter(
            "tda_rate_slowdowns",
            "Pauses until the exchange's weight window turned over, taken before a 429.",
            ["exchange"],
            registry=r,
        )
        self._throttled = Counter(
            "tda_exchange_throttled_responses",
            "HTTP 429/418 answers from the exchange.",
            ["exchange", "status"],
            registry=r,
        )
        self._rows_written = Counter(
            "tda_rows_written", "Candle rows written durably.", ["store"], registry=r
        )
        self._write_errors = Counter(
            "tda_store_write_errors", "Failed store write attempts.", ["store"], registry=r
        )
        self._rejected = Counter(
            "tda_candles_rejected",
            "Candles dropped by validation.",
            ["exchange", "reason"],
            registry=r,
        )
        self._gaps_found = Counter(
            "tda_gaps_found", "Missing candle ranges detected.", ["exchange"], registry=r
        )
        self._gaps_repaired = Counter(
            "tda_gaps_repaired", "Missing candle ranges filled again.", ["exchange"], registry=r
        )
        self._history_candles = Counter(
            "tda_history_candles_stored",
            "Candles stored by history backfill.",
            ["exchange", "timeframe"],
            registry=r,
        )
        self._archive_files = Counter(
            "tda_archive_files",
            "Archive files asked for, by outcome (ok, missing, corrupt, failed).",
            ["exchange", "outcome"],
            registry=r,
        )
        self._archive_bytes = Counter(
            "tda_archive_bytes", "Bytes downloaded from archive hosts.", ["exchange"], registry=r
        )
        self._jobs = Gauge("tda_jobs", "Jobs by state.", ["state"], registry=r)
        self._job_runs = Histogram(
            "tda_job_run_duration_seconds",
            "Duration of one run of a job (a live sync, a backfill), any outcome.",
            ["exchange", "mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._loki_dropped = Counter(
            "tda_loki_dropped_entries", "Log entries that never reached Loki.", registry=r
        )
        self._lag = _LagCollector(clock)
        r.register(self._lag)
        self._paused = _PausedCollector(clock)
        r.register(self._paused)
        self._job_states: set[str] = set()
        self._jobs_lock = Lock()

    # -- exchange side
    def request(self, exchange: str, outcome: str, seconds: float, cost: float = 1.0) -> None:
        """One request attempt finished (after the limiter let it go): outcome is one of
        OUTCOMES; `cost` is what it took from the budget."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
        self._requests.labels(exchange, outcome).inc()
        self._request_weight.labels(exchange).inc(cost)
        self._fetch_seconds.labels(exchange).observe(seconds)

    def set_budget(self, exchange: str, per_second: float) -> None:
        """The exchange's published budget, so dashboards can show use as a fraction of it.
        Called once per exchange as it is opened: its counters start at 0 here."""
        self._budget.labels(exchange).set(per_second)
        for outcome in OUTCOMES:
            self._requests.labels(exchange, outcome)
        for status in THROTTLE_STATUSES:
            self._throttled.labels(exchange, status)
        for reason in REJECT_REASONS:
            self._rejected.labels(exchange, reason)
        for counter in (
            self._request_weight,
            self._waits,
            self._wait_seconds,
            self._slowdowns,
            self._gaps_found,
            self._gaps_repaired,
        ):
            counter.labels(exchange)
        self._fetch_seconds.labels(exchange)

    def rate_limit_wait(self, exchange: str, seconds: float) -> None:
        self._waits.labels(exchange).inc()
        self._wait_seconds.labels(exchange).inc(seconds)

    def used_weight(self, exchange: str, used: int) -> None:
        self._used_weight.labels(exchange).set(used)

    def slowdown(self, exchange: str) -> None:
        self._slowdowns.labels(exchange).inc()

    def throttled(self, exchange: str, status: int) -> None:
        """The exchange refused a request: 429 (slow down, also for refusals an exchange sends
        with HTTP 200), 418 or 403 (an IP ban, Binance's and Bybit's)."""
        self._throttled.labels(exchange, str(status)).inc()

    def exchange_paused(self, exchange: str, until_s: float) -> None:
        """No request goes to the exchange before `until_s` (epoch seconds; 0: not paused)."""
        self._paused.update(exchange, until_s)

    def candles_rejected(self, exchange: str, reason: str, count: int) -> None:
        self._rejected.labels(exchange, reason).inc(count)

    # -- store side
    def rows_written(self, store: str, rows: int) -> None:
        self._rows_written.labels(store).inc(rows)
        self._write_errors.labels(store)  # 0 until an attempt fails

    def store_write_error(self, store: str) -> None:
        self._write_errors.labels(store).inc()

    def newest_closed_candle(
        self, exchange: str, symbol: str, timeframe: str, close_s: float
    ) -> None:
        """The newest stored closed candle of a series closes at `close_s` (epoch seconds:
        open time + timeframe). Earlier values never move it back."""
        self._lag.update(exchange, symbol, timeframe, close_s)
        self._history_candles.labels(exchange, timeframe)  # 0 in live mode

    # -- jobs and gaps
    def gaps_found(self, exchange: str, count: int = 1) -> None:
        self._gaps_found.labels(exchange).inc(count)

    def gaps_repaired(self, exchange: str, count: int = 1) -> None:
        self._gaps_repaired.labels(exchange).inc(count)

    def history_candles(self, exchange: str, timeframe: str, count: int) -> None:
        self._history_candles.labels(exchange, timeframe).inc(count)

    def job_run(self, exchange: str, mode: str, seconds: float) -> None:
        self._job_runs.labels(exchange, mode).observe(seconds)

    def archive_file(self, exchange: str, outcome: str, size: int) -> None:
        self._archive_files.labels(exchange, outcome).inc()
        self._archive_bytes.labels(exchange).inc(size)

    def set_jobs(self, by_state: Mapping[str, int]) -> None:
        """Replace the job counts; a state absent from `by_state` now counts 0."""
        with self._jobs_lock:
            self._job_states.update(by_state)
            for state in self._job_states:
                self._jobs.labels(state).set(by_state.get(state, 0))

    def loki_dropped(self, count: int) -> None:
        self._loki_dropped.inc(count)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
