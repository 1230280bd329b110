"""The live daemon steered over HTTP, the finer points: a job's runs counted across restarts, a
job rescheduled in place by `POST /jobs`, and enabling a connector resuming only what disabling
paused; real ccxt against the fake exchange, DuckDB."""

from __future__ import annotations

import time

import pytest
from fake_exchange import SymbolSpec
from jobs_support import Collector, send
from test_service import BTC, ETH, INITIAL, MIN, klines_after, start_live

CRON = {"mode": "cron", "cron": "*/5 * * * *"}
EACH_CLOSE = {"mode": "timeframe"}
BTC_1M = {"exchange": "binance", "symbol": "BTC/USDT", "timeframe": "1m"}
ETH_1M = {**BTC_1M, "symbol": "ETH/USDT"}


@pytest.fixture
def specs():
    return [SymbolSpec(s) for s in ("BTC/USDT", "ETH/USDT")]


def restart(tmp_path, port: int) -> Collector:
    collector = Collector(tmp_path / "config.yaml", port, "--mode=live")
    collector.wait_until(lambda: collector.named("live_started"), what="the restarted service")
    return collector


def statuses(port: int) -> dict[str, str]:
    return {j["id"]: j["status"] for j in send(port, "GET", "/jobs")[1]["jobs"]}


def test_a_jobs_runs_go_on_counting_across_a_restart(exchange_rig, tmp_path, specs):
    collector = start_live(exchange_rig(specs))
    port = collector.port
    try:
        collector.wait_until(lambda: collector.job(BTC)["runs_total"] >= 5, what="five runs")
        before = collector.job(BTC)["runs_total"]
    finally:
        assert collector.stop() == 0
    restarted = restart(tmp_path, port)
    try:
        runs = restarted.job(BTC)["runs_total"]
        assert runs >= before  # at once: not counted from 0 again
        restarted.wait_until(lambda: restarted.job(BTC)["runs_total"] > runs, what="counting on")
    finally:
        assert restarted.stop() == 0


def test_post_jobs_with_a_new_schedule_reschedules_the_job_in_place(exchange_rig, tmp_path, specs):
    collector = start_live(exchange_rig(specs))
    port = collector.port
    try:
        status, answer = send(port, "POST", "/jobs", {**BTC_1M, "schedule": CRON})
        assert status == 200 and answer["job"]["id"] == BTC and answer["job"]["schedule"] == CRON
        assert answer["job"]["rows"] >= INITIAL  # its record carried over
        assert [j["id"] for j in send(port, "GET", "/jobs")[1]["jobs"]] == [BTC]
        job = collector.wait_until(
            lambda: (j := collector.job(BTC))["next_run_ms"] % (5 * MIN) == 0 and j,
            what="the cron's next instant",
        )
        time.sleep(1.0)  # two refresh ticks of the old schedule: a cron job waits instead
        assert collector.job(BTC)["runs_total"] == job["runs_total"]

        # The same schedule again, or none: nothing changes (no restart, no run).
        for body in ({**BTC_1M, "schedule": CRON}, BTC_1M):
            status, answer = send(port, "POST", "/jobs", body)
            assert status == 200 and answer["job"]["schedule"] == CRON
        time.sleep(0.6)
        assert collector.job(BTC)["runs_total"] == job["runs_total"]
    finally:
        assert collector.stop() == 0

    restarted = restart(tmp_path, port)
    try:
        assert restarted.job(BTC)["schedule"] == CRON  # kept across a restart
        status, answer = send(port, "POST", "/jobs", {**BTC_1M, "schedule": EACH_CLOSE})
        assert status == 200 and answer["job"]["schedule"] == EACH_CLOSE
        runs = restarted.job(BTC)["runs_total"]
        restarted.wait_until(
            lambda: restarted.job(BTC)["runs_total"] >= runs + 2, what="refreshes again"
        )
    finally:
        assert restarted.stop() == 0


def test_enabling_a_connector_resumes_only_what_disabling_paused(exchange_rig, tmp_path, specs):
    rig = exchange_rig(specs)
    collector = start_live(rig)
    port = collector.port
    try:
        assert send(port, "POST", "/jobs", ETH_1M)[0] == 201
        collector.wait_until(lambda: collector.job(ETH)["rows"] >= INITIAL, what="ETH rows")
        assert send(port, "POST", f"/jobs/{ETH}/pause")[0] == 200  # a user's pause

        for _ in range(2):  # disabling twice: the second pauses nothing, forgets nothing
            assert send(port, "POST", "/connectors/binance/disable")[0] == 200
            assert statuses(port) == {BTC: "PAUSED", ETH: "PAUSED"}
        enabled_at = time.monotonic()
        assert send(port, "POST", "/connectors/binance/enable")[0] == 200
        assert statuses(port) == {BTC: "RUNNING", ETH: "PAUSED"}
        time.sleep(1.5)  # three refresh ticks
        assert klines_after(rig.fake, "BTC/USDT", enabled_at)
        assert klines_after(rig.fake, "ETH/USDT", enabled_at) == []

        assert send(port, "POST", "/connectors/binance/disable")[0] == 200
    finally:
        assert collector.stop() == 0

    # Restarted while disabled (not even opened): enabling still knows what it paused.
    restarted = restart(tmp_path, port)
    try:
        assert statuses(port) == {}
        assert send(port, "POST", "/connectors/binance/enable")[0] == 200
        restarted.wait_until(lambda: len(statuses(port)) == 2, what="its jobs")
        assert statuses(port) == {BTC: "RUNNING", ETH: "PAUSED"}
        assert send(port, "POST", f"/jobs/{ETH}/resume")[0] == 200  # the user resumes it
        assert statuses(port)[ETH] == "RUNNING"
    finally:
        assert restarted.stop() == 0
