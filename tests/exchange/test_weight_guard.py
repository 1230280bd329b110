"""The used-weight guard: when it pauses the exchange, for how long, and how often it says so."""

from __future__ import annotations

import pytest
from event_support import recording_events

from tda_collector.config import ExchangeConfig
from tda_collector.errors import UsageError
from tda_collector.exchange.ccxt_source import KNOWN_CAPABILITIES
from tda_collector.exchange.ratelimit import RateLimiter
from tda_collector.exchange.runtime import used_weight_rule
from tda_collector.exchange.source import Capabilities, UsedWeightRule
from tda_collector.exchange.weight_guard import UsedWeightGuard, trip_point, window_end_ms
from tda_collector.observability.metrics import Metrics

RULE = UsedWeightRule("X-MBX-USED-WEIGHT-1M", limit=6000, window_s=60.0)


class Clocks:
    """The exchange's clock (ms) and our monotonic clock (s), moved together by tests."""

    def __init__(self, exchange_ms: int) -> None:
        self.exchange_ms = exchange_ms
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.exchange_ms += round(seconds * 1000)
        self.mono += seconds


def guard_at(exchange_ms: int, safety: float = 0.9):
    clocks = Clocks(exchange_ms)
    limiter = RateLimiter(10, clock=lambda: clocks.mono)
    events, recorded = recording_events()
    metrics = Metrics()
    guard = UsedWeightGuard(
        "binance",
        RULE,
        safety,
        limiter,
        events,
        metrics,
        lambda: clocks.exchange_ms,
        clock=lambda: clocks.mono,
    )
    return guard, limiter, clocks, recorded, metrics


def test_the_trip_point_is_halfway_into_the_headroom_safety_leaves():
    assert trip_point(6000, 0.9) == pytest.approx(5700)
    assert trip_point(1200, 0.5) == pytest.approx(900)


def test_windows_end_on_the_exchange_clocks_whole_minutes():
    assert window_end_ms(61_500, 60) == 120_000
    assert window_end_ms(120_000, 60) == 180_000  # a window's first instant belongs to it
    assert window_end_ms(1_999, 2) == 2_000


def test_readings_below_the_trip_point_pause_nothing():
    guard, limiter, _, recorded, _ = guard_at(61_000)
    guard.observe(5699, sent_ms=61_000)
    assert limiter.paused_until == 0.0 and recorded.named("rate_slowdown") == []


def test_a_reading_at_the_trip_point_pauses_every_request_until_the_window_turns():
    guard, limiter, clocks, recorded, metrics = guard_at(75_000)  # 15 s into a minute
    guard.observe(5700, sent_ms=74_990)
    assert limiter.paused_until == pytest.approx(clocks.mono + 45.0)
    [event] = recorded.named("rate_slowdown")
    assert event["level"] == "WARNING" and event["message"].startswith("binance reports 5700/6000")
    assert (event["used_weight"], event["limit"], event["wait_s"]) == (5700, 6000, 45.0)
    rendered = metrics.render().decode()
    assert 'tda_exchange_used_weight{exchange="binance"} 5700.0' in rendered
    assert 'tda_rate_slowdowns_total{exchange="binance"} 1.0' in rendered


def test_one_pause_and_one_event_per_window_however_many_readings():
    guard, limiter, clocks, recorded, _ = guard_at(75_000)
    guard.observe(5800, sent_ms=75_000)
    clocks.advance(0.5)
    guard.observe(5900, sent_ms=75_400)
    assert len(recorded.named("rate_slowdown")) == 1 and guard.slowdowns == 1
    clocks.advance(60)  # the next window fills up too
    guard.observe(5750, sent_ms=clocks.exchange_ms)
    assert guard.slowdowns == 2
    assert limiter.paused_until == pytest.approx(clocks.mono + (180_000 - 135_500) / 1000)


def test_a_reading_from_a_window_that_already_turned_over_pauses_nothing():
    """A request sent just before the minute and answered after it reports the old count."""
    guard, limiter, _, recorded, _ = guard_at(120_050)
    guard.observe(5990, sent_ms=119_980)
    assert limiter.paused_until == 0.0 and guard.slowdowns == 0
    assert recorded.named("rate_slowdown") == []


def _exchange(**used_weight) -> ExchangeConfig:
    return ExchangeConfig.model_validate(
        {"id": "kraken", "symbols": ["BTC/USD"], "rate_limit": {"used_weight": used_weight}}
    )


FIELD = "exchanges[0].rate_limit.used_weight"


def test_binance_needs_no_config_and_the_config_overrides_its_limit():
    binance = KNOWN_CAPABILITIES["binance"]
    assert used_weight_rule(_exchange(), binance, FIELD) == RULE
    assert used_weight_rule(_exchange(limit=12000), binance, FIELD) == UsedWeightRule(
        "X-MBX-USED-WEIGHT-1M", 12000, 60.0
    )
    assert used_weight_rule(_exchange(enabled=False), binance, FIELD) is None


def test_exchanges_without_a_known_header_are_off_unless_configured():
    unknown = Capabilities()
    assert used_weight_rule(_exchange(), unknown, FIELD) is None
    rule = used_weight_rule(
        _exchange(header="X-Used", limit=500, window_seconds=10), unknown, FIELD
    )
    assert rule == UsedWeightRule("X-Used", 500, 10.0)
    with pytest.raises(UsageError, match=r"^exchanges\[0\]\.rate_limit\.used_weight\.limit: "):
        used_weight_rule(_exchange(header="X-Used"), unknown, FIELD)
    with pytest.raises(UsageError, match=r"used_weight\.header: required"):
        used_weight_rule(_exchange(limit=500), unknown, FIELD)
