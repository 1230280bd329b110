"""Metrics: each method moves the series the dashboards read, in Prometheus text format."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tda_collector.observability.metrics import OUTCOMES, Metrics


def samples(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    """Every sample of the rendered text, parsed back by prometheus_client's own parser."""
    text = metrics.render().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, frozenset(labels.items()))]


def test_requests_count_by_outcome_with_latency_and_budget_weight() -> None:
    m = Metrics()
    m.request("binance", "ok", 0.2, cost=2)
    m.request("binance", "ok", 0.3, cost=2)
    m.request("binance", "rate_limited", 0.05, cost=2)
    m.set_budget("binance", 20)

    assert value(m, "tda_exchange_requests_total", exchange="binance", outcome="ok") == 2
    assert value(m, "tda_exchange_requests_total", exchange="binance", outcome="rate_limited") == 1
    assert value(m, "tda_exchange_request_weight_total", exchange="binance") == 6
    assert value(m, "tda_rate_limit_budget_per_second", exchange="binance") == 20
    assert value(m, "tda_fetch_duration_seconds_count", exchange="binance") == 3
    assert value(m, "tda_fetch_duration_seconds_bucket", exchange="binance", le="0.25") == 2
    assert value(m, "tda_fetch_duration_seconds_sum", exchange="binance") == pytest.approx(0.55)


def test_an_unknown_outcome_is_a_wiring_bug() -> None:
    with pytest.raises(ValueError, match="ok, transient, rate_limited, permanent"):
        Metrics().request("binance", "timeout", 1.0)
    assert OUTCOMES == ("ok", "transient", "rate_limited", "permanent")


def test_rate_limit_waits_and_throttled_answers() -> None:
    m = Metrics()
    m.rate_limit_wait("okx", 0.25)
    m.rate_limit_wait("okx", 1.5)
    m.throttled("okx", 429)
    m.throttled("okx", 418)
    m.throttled("okx", 429)

    assert value(m, "tda_rate_limit_waits_total", exchange="okx") == 2
    assert value(m, "tda_rate_limit_wait_seconds_total", exchange="okx") == 1.75
    assert value(m, "tda_exchange_throttled_responses_total", exchange="okx", status="429") == 2
    assert value(m, "tda_exchange_throttled_responses_total", exchange="okx", status="418") == 1


def test_store_rows_errors_and_rejections() -> None:
    m = Metrics()
    m.rows_written("duckdb", 1000)
    m.rows_written("duckdb", 500)
    m.store_write_error("bigquery")
    m.candles_rejected("binance", "high_below_low", 3)

    assert value(m, "tda_rows_written_total", store="duckdb") == 1500
    assert value(m, "tda_store_write_errors_total", store="bigquery") == 1
    assert value(m, "tda_candles_rejected_total", exchange="binance", reason="high_below_low") == 3


def test_lag_is_measured_at_scrape_time_from_the_series_furthest_behind() -> None:
    now = [1_000_000.0]
    m = Metrics(clock=lambda: now[0])
    m.newest_closed_candle("binance", "BTC/USDT", "1m", 999_940.0)
    m.newest_closed_candle("binance", "ETH/USDT", "1m", 999_880.0)  # furthest behind
    m.newest_closed_candle("binance", "ETH/USDT", "1m", 999_820.0)  # older news: ignored
    m.newest_closed_candle("binance", "BTC/USDT", "1h", 997_200.0)

    assert value(m, "tda_candle_lag_seconds", exchange="binance", timeframe="1m") == 120
    now[0] += 30  # nothing new stored: the lag keeps growing
    assert value(m, "tda_candle_lag_seconds", exchange="binance", timeframe="1m") == 150
    assert value(m, "tda_candle_lag_seconds", exchange="binance", timeframe="1h") == 2830


def test_jobs_by_state_replace_the_previous_counts() -> None:
    m = Metrics()
    m.set_jobs({"RUNNING": 3, "PENDING": 5})
    m.set_jobs({"RUNNING": 1, "COMPLETED": 7})

    assert value(m, "tda_jobs", state="RUNNING") == 1
    assert value(m, "tda_jobs", state="PENDING") == 0
    assert value(m, "tda_jobs", state="COMPLETED") == 7


def test_gaps_history_progress_and_loki_drops() -> None:
    m = Metrics()
    m.gaps_found("binance", 2)
    m.gaps_repaired("binance")
    m.history_candles("binance", "1h", 1000)
    m.history_candles("binance", "1h", 24)
    m.loki_dropped(5)

    assert value(m, "tda_gaps_found_total", exchange="binance") == 2
    assert value(m, "tda_gaps_repaired_total", exchange="binance") == 1
    assert value(m, "tda_history_candles_stored_total", exchange="binance", timeframe="1h") == 1024
    assert value(m, "tda_loki_dropped_entries_total") == 5


def test_archive_files_by_outcome_and_bytes() -> None:
    m = Metrics()
    m.archive_file("binance", "ok", 2_000_000)
    m.archive_file("binance", "missing", 0)
    m.archive_file("binance", "corrupt", 4_000_100)

    assert value(m, "tda_archive_files_total", exchange="binance", outcome="ok") == 1
    assert value(m, "tda_archive_files_total", exchange="binance", outcome="corrupt") == 1
    assert value(m, "tda_archive_bytes_total", exchange="binance") == 6_000_100


def test_each_instance_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.rows_written("duckdb", 10)
    assert ("tda_rows_written_total", frozenset({("store", "duckdb")})) not in samples(second)
