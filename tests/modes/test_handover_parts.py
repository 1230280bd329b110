"""The pure parts of handing a history run to a daemon: which jobs, where, what progress."""

from __future__ import annotations

from tda_collector.config import AdminConfig
from tda_collector.exchange.runtime import RunRequest
from tda_collector.modes.handover import daemon_url, selected, summary_of


def job(symbol: str, timeframe: str = "1m", mode: str = "live", **fields) -> dict:
    base = {"exchange": "binance", "symbol": symbol, "timeframe": timeframe, "mode": mode}
    return {**base, "status": "RUNNING", "rows": 0, "covered": None, **fields}


def test_the_command_line_selects_the_daemons_live_jobs():
    jobs = [
        job("BTC/USDT"),
        job("BTC/USDT", "1h"),
        job("ETH/USDT"),
        job("BTC/USDT", mode="history"),
    ]
    request = RunRequest("history", 0, 1, symbols=("BTC/USDT",))
    assert selected(jobs, request) == jobs[:2]
    assert selected(jobs, RunRequest("history", 0, 1, timeframes=("1h",))) == [jobs[1]]
    assert selected(jobs, RunRequest("history", 0, 1)) == jobs[:3]
    assert selected(jobs, RunRequest("history", 0, 1, exchanges=("okx",))) == []


def test_the_daemon_is_reached_at_the_admin_address_wildcards_through_loopback():
    assert daemon_url(AdminConfig(host="0.0.0.0", port=8080)) == "http://127.0.0.1:8080"
    assert daemon_url(AdminConfig(host="::", port=9)) == "http://[::1]:9"
    assert daemon_url(AdminConfig(host="10.0.0.5", port=80)) == "http://10.0.0.5:80"
    assert daemon_url(AdminConfig(port=0)) is None


def test_a_named_daemon_url_wins_over_the_admin_address():
    named = AdminConfig(host="0.0.0.0", daemon_url="http://collector:8080/")
    assert daemon_url(named) == "http://collector:8080"
    assert daemon_url(AdminConfig(port=0, daemon_url="https://c.example/tda")) == (
        "https://c.example/tda"
    )


def test_followed_backfills_read_as_a_history_runs_progress():
    jobs = [
        job("BTC/USDT", mode="history", status="COMPLETED", rows=1440, covered=1.0),
        job("ETH/USDT", mode="history", status="RUNNING", rows=360, covered=0.25),
    ]
    summary = summary_of(jobs, 120.0)
    assert (summary.total, summary.done, summary.candles) == (2, 1, 1800)
    assert summary.covered == 0.625 and summary.counts["FAILED"] == 0
    assert summary.line().startswith("1/2 jobs done, 62.5% covered, 1,800 candles, 120 candles/s")
