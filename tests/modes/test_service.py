"""The live daemon steered over HTTP: jobs added, deleted and backfilled, connectors upserted,
disabled and enabled, all while it runs; real ccxt against the fake exchange, DuckDB."""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import pytest
from collector_support import DAY_MS, FROZEN_NOW_S, ccxt_options
from fake_exchange import SymbolSpec, expected_candles
from fake_okx import FakeOkx
from fake_okx import ccxt_options as okx_options
from jobs_support import Collector, free_port, send, stored
from store_support import read_duckdb_rows

from tda_collector.models import JobKey

NOW_MS = int(FROZEN_NOW_S * 1000)
MIN = 60_000
INITIAL = 30
BTC, ETH = "binance:BTC-USDT:1m:live", "binance:ETH-USDT:1m:live"


@pytest.fixture
def specs():
    return [SymbolSpec(s) for s in ("BTC/USDT", "ETH/USDT", "SOL/USDT", "XRP/USDT")]


def start_live(rig, **settings) -> Collector:
    port = free_port()
    config = rig.config(
        ["BTC/USDT"],
        live_initial_candles=INITIAL,
        update_interval_seconds=0.5,
        live_settle_seconds=0,
        admin={"host": "127.0.0.1", "port": port},
        **settings,
    )
    collector = Collector(config, port, "--mode=live")
    collector.wait_until(lambda: collector.job(BTC)["rows"] >= INITIAL, what="BTC live")
    return collector


def latest_closed(spec: SymbolSpec, count: int) -> list[tuple]:
    end = NOW_MS - NOW_MS % MIN  # the candle in progress opens here
    return expected_candles(spec, "1m", end - count * MIN, end, NOW_MS)


def klines_after(fake, symbol: str, t: float) -> list:
    return [r for r in fake.klines_requests(symbol) if r.time > t]


def job_ids(port: int) -> list[str]:
    return sorted(j["id"] for j in send(port, "GET", "/jobs")[1]["jobs"])


def test_post_jobs_collects_the_series_once_and_delete_stops_it(exchange_rig, tmp_path, specs):
    rig = exchange_rig(specs)
    collector = start_live(rig)
    port = collector.port
    try:
        body = {"exchange": "binance", "symbol": "ETH/USDT", "timeframe": "1m"}
        status, answer = send(port, "POST", "/jobs", body)
        assert status == 201 and answer["job"]["id"] == ETH
        assert answer["job"]["schedule"] == {"mode": "timeframe"}
        collector.wait_until(lambda: collector.job(ETH)["rows"] >= INITIAL, what="ETH rows")

        again_status, again = send(port, "POST", "/jobs", body)
        assert (again_status, again["job"]["id"]) == (200, ETH)
        assert job_ids(port) == [BTC, ETH]

        cron = {"exchange": "binance", "symbol": "SOL/USDT", "timeframe": "1m"}
        cron["schedule"] = {"mode": "cron", "cron": "*/5 * * * *"}
        status, sol = send(port, "POST", "/jobs", cron)
        assert status == 201 and sol["job"]["schedule"] == cron["schedule"]
        sol_id = "binance:SOL-USDT:1m:live"
        collector.wait_until(lambda: collector.job(sol_id)["runs_total"] == 1, what="SOL's run")
        time.sleep(1.0)  # two refresh ticks: a cron job waits for its instant instead
        sol_job = collector.job(sol_id)
        assert sol_job["runs_total"] == 1 and sol_job["rows"] == INITIAL + 1  # and the open one
        assert sol_job["next_run_ms"] % (5 * MIN) == 0 and sol_job["next_run"].endswith("Z")

        status, deleted = send(port, "DELETE", f"/jobs/{ETH}")
        deleted_at = time.monotonic()
        assert status == 200 and deleted["job"]["id"] == ETH
        assert send(port, "GET", f"/jobs/{ETH}")[0] == 404
        time.sleep(2.0)  # four refresh ticks of the other jobs
        assert klines_after(rig.fake, "ETH/USDT", deleted_at + 0.3) == []
        assert klines_after(rig.fake, "BTC/USDT", deleted_at + 0.3)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'tda_job_run_duration_seconds_count{exchange="binance",mode="live"}' in metrics
    finally:
        assert collector.stop() == 0
    eth = stored(tmp_path, "ETH/USDT")  # its candles stay: the closed ones and the open one
    assert eth[:-1] == latest_closed(specs[1], INITIAL) and eth[-1][0] == NOW_MS - NOW_MS % MIN

    restarted = start_live(rig)  # the added job persists, the deleted one stays away
    port = restarted.port
    try:
        assert job_ids(port) == [BTC, "binance:SOL-USDT:1m:live"]
        sol = restarted.job("binance:SOL-USDT:1m:live")
        assert sol["schedule"] == cron["schedule"]
        # A job the file declares, deleted: gone, and still gone after a restart.
        assert send(port, "DELETE", f"/jobs/{BTC}")[0] == 200
    finally:
        assert restarted.stop() == 0
    again = Collector(tmp_path / "config.yaml", port, "--mode=live")
    try:
        again.wait_until(lambda: again.named("live_started"), what="live")
        assert job_ids(port) == ["binance:SOL-USDT:1m:live"]
        status, answer = send(port, "POST", "/jobs", {**body, "symbol": "BTC/USDT"})
        assert status == 201 and answer["job"]["id"] == BTC  # brought back by adding it
        again.wait_until(lambda: again.job(BTC)["runs_total"] >= 1, what="BTC runs again")
    finally:
        assert again.stop() == 0


def test_a_backfill_inside_the_live_daemon_stores_exactly_the_exchanges_candles(
    exchange_rig, tmp_path, specs
):
    rig = exchange_rig(specs, latency_s=0.01)
    collector = start_live(rig, page_limit=200, rps=100)
    port = collector.port
    start_ms, end_ms = NOW_MS - NOW_MS % DAY_MS - 2 * DAY_MS, NOW_MS - NOW_MS % DAY_MS
    try:
        status, answer = send(
            port, "POST", f"/jobs/{BTC}/backfill", {"start": "2024-02-28", "end": end_ms}
        )
        assert status == 202
        history = answer["job"]["id"]
        assert history == "binance:BTC-USDT:1m:history"
        assert send(port, "POST", f"/jobs/{BTC}/backfill", {"start": "2024-02-28"})[0] == 409
        done = collector.wait_until(
            lambda: collector.job(history)["status"] in ("COMPLETED", "FAILED") and True,
            timeout_s=60,
            what="the backfill",
        )
        assert done
        job = collector.job(history)
        assert job["status"] == "COMPLETED" and job["covered"] == 1.0
        assert job["runs_total"] == job["pages"] >= 2 * 1440 // 200
        assert collector.job(BTC)["status"] == "RUNNING"
    finally:
        assert collector.stop() == 0
    rows = stored(tmp_path, "BTC/USDT")
    in_range = [r for r in rows if start_ms <= r[0] < end_ms]
    assert in_range == expected_candles(specs[0], "1m", start_ms, end_ms, NOW_MS)
    assert rows[-INITIAL - 1 : -1] == latest_closed(specs[0], INITIAL)
    runs = collector.named("job_run")
    assert [r["status"] for r in runs if r.get("job") == history] == ["COMPLETED"]


def test_connector_upsert_is_idempotent_and_disable_stops_its_requests(
    exchange_rig, tmp_path, specs
):
    rig = exchange_rig(specs)
    collector = start_live(rig)
    port = collector.port
    try:
        status, listing = send(port, "GET", "/connectors")
        [binance] = listing["connectors"]
        assert status == 200 and binance["enabled"] is True
        state = binance["rate_limit_state"]
        assert state["limit"] >= 1 and state["period_ms"] == 1000 and state["usage"] >= 0
        assert state["period_start"].endswith("Z")

        for _ in range(2):  # the block as read, twice: one connector, unchanged
            status, same = send(port, "PUT", "/connectors/binance", binance)
            assert status == 200 and same["symbols"] == ["BTC/USDT"]
        assert len(send(port, "GET", "/connectors")[1]["connectors"]) == 1
        assert job_ids(port) == [BTC]

        changed = {**binance, "symbols": ["BTC/USDT", "XRP/USDT"]}
        status, answer = send(port, "PUT", "/connectors/binance", changed)
        assert status == 200 and answer["symbols"] == ["BTC/USDT", "XRP/USDT"]
        xrp = "binance:XRP-USDT:1m:live"
        collector.wait_until(lambda: collector.job(xrp)["rows"] >= INITIAL, what="XRP rows")
        assert collector.job(BTC)["rows"] >= INITIAL  # carried over the reopen

        status, answer = send(port, "POST", "/connectors/binance/disable")
        disabled_at = time.monotonic()
        assert status == 200 and answer["enabled"] is False
        assert {j["status"] for j in send(port, "GET", "/jobs")[1]["jobs"]} == {"PAUSED"}
        refused = send(port, "POST", f"/jobs/{BTC}/resume")
        assert refused[0] == 409 and "disabled" in refused[1]["error"]
        time.sleep(2.0)
        assert klines_after(rig.fake, "BTC/USDT", disabled_at + 0.3) == []
        assert klines_after(rig.fake, "XRP/USDT", disabled_at + 0.3) == []

        enabled_at = time.monotonic()
        status, answer = send(port, "POST", "/connectors/binance/enable")
        assert status == 200 and answer["enabled"] is True
        collector.wait_until(
            lambda: klines_after(rig.fake, "XRP/USDT", enabled_at), what="XRP asks again"
        )
        assert {j["status"] for j in send(port, "GET", "/jobs")[1]["jobs"]} == {"RUNNING"}

        # Changed while disabled: enabling opens it with the new block.
        assert send(port, "POST", "/connectors/binance/disable")[0] == 200
        status, answer = send(port, "PUT", "/connectors/binance", {**changed, "timeframes": ["1h"]})
        assert status == 200 and answer["enabled"] is False and job_ids(port) == []
        assert send(port, "POST", "/connectors/binance/enable")[0] == 200
        hourly = ["binance:BTC-USDT:1h:live", "binance:XRP-USDT:1h:live"]
        collector.wait_until(lambda: job_ids(port) == hourly, what="the hourly jobs")
        assert send(port, "PUT", "/connectors/binance", changed)[0] == 200  # back to 1m
        assert sorted(job_ids(port)) == [BTC, xrp]

        assert send(port, "POST", "/connectors/binance/disable")[0] == 200
    finally:
        assert collector.stop() == 0
    assert stored(tmp_path, "XRP/USDT")[:-1] == latest_closed(specs[3], INITIAL)

    # Restarted: still disabled, so not even opened; enabling opens it at run time.
    restarted = Collector(tmp_path / "config.yaml", port, "--mode=live")
    restarted_at = time.monotonic()
    try:
        restarted.wait_until(lambda: restarted.named("live_started"), what="the service")
        [binance] = send(port, "GET", "/connectors")[1]["connectors"]
        assert binance["enabled"] is False and binance["symbols"] == ["BTC/USDT", "XRP/USDT"]
        assert binance["rate_limit_state"] is None and job_ids(port) == []
        assert rig.fake.request_log()[-1].time < restarted_at  # nothing asked, markets neither
        assert send(port, "POST", "/connectors/binance/enable")[0] == 200
        restarted.wait_until(lambda: len(job_ids(port)) == 2, what="its jobs")
        xrp_job = restarted.wait_until(
            lambda: restarted.job(xrp)["runs_total"] >= 1 and restarted.job(xrp), what="XRP runs"
        )
        assert xrp_job["status"] == "RUNNING" and xrp_job["last_error"] is None
        assert xrp_job["rows"] >= INITIAL and xrp_job["cursor_ms"]  # carried over
    finally:
        assert restarted.stop() == 0


SQL = "BTC'); DROP TABLE x;--"
ETH_1M = {"exchange": "binance", "symbol": "ETH/USDT", "timeframe": "1m"}
BAD_JOBS = [
    (None, b"{not json", "body: not valid JSON"),
    (None, b"[1, 2]", "body: must be a JSON object"),
    ({"exchange": "kraken", "symbol": "BTC/USDT", "timeframe": "1m"}, None, "exchange"),
    (ETH_1M | {"symbol": SQL}, None, "symbol"),
    ({"exchange": "binance", "symbol": "BTC/USDT", "timeframe": "7m"}, None, "timeframe"),
    ({"exchange": "binance", "symbol": "X" * 500, "timeframe": "1m"}, None, "symbol"),
    ({"exchange": "binance", "timeframe": "1m"}, None, "symbol: is required"),
    (ETH_1M | {"x": 1}, None, "x: "),
    (ETH_1M | {"schedule": {"mode": "cron", "cron": "61 * * * *"}}, None, "cron"),
]
BAD_BACKFILLS = [
    ({"start": "2024-02-29", "end": "2024-02-28"}, "start: must be before end"),
    ({"start": "2024-02-29", "end": "2024-02-29"}, "start: must be before end"),
    ({"start": "yesterday"}, "start: not an ISO 8601"),
    ({"start": 10**17}, "start: out of range"),
    ({"start": -5}, "start: out of range"),
    ({}, "start: is required"),
    ({"start": "2024-02-28", "until": 1}, "until: unknown key"),
]


def test_bad_input_on_every_new_endpoint_changes_nothing(exchange_rig, tmp_path, specs):
    rig = exchange_rig(specs)
    collector = start_live(rig)
    port = collector.port
    try:
        before_jobs = send(port, "GET", "/jobs")[1]["total"]
        before_connectors = send(port, "GET", "/connectors")[1]
        for body, raw, named in BAD_JOBS:
            status, answer = send(port, "POST", "/jobs", body, raw)
            assert status == 400 and named in answer["error"], (body, answer)
            assert "\n" not in answer["error"]
        for body, named in BAD_BACKFILLS:
            status, answer = send(port, "POST", f"/jobs/{BTC}/backfill", body)
            assert status == 400 and answer["error"].startswith(named), (body, answer)
        for method, path in (("PUT", "/connectors/binance"), ("POST", f"/jobs/{BTC}/backfill")):
            for raw, named in ((b"{nope", "body: not valid JSON"), (b'"x"', "body: must be")):
                status, answer = send(port, method, path, raw=raw)
                assert status == 400 and answer["error"].startswith(named), (path, answer)
        nope = "/jobs/binance:NOPE-USDT:1m:live"
        assert send(port, "POST", f"{nope}/backfill", {"start": 0})[0] == 404
        assert send(port, "DELETE", "/jobs/binance:NOPE-USDT:1m:live")[0] == 404
        assert send(port, "POST", "/connectors/kraken/enable")[0] == 404
        assert send(port, "POST", "/connectors/binance/explode")[0] == 404
        assert send(port, "GET", "/connectors/kraken")[0] == 404
        bad_connectors = [
            ({"symbols": "BTC/USDT"}, "symbols"),
            ({"symbols": ["BTC/USDT"], "timeframes": ["7x"]}, "timeframes"),
            ({"symbols": ["BTC/USDT"], "rate_limit": {"safety": 5}}, "rate_limit.safety"),
            ({"symbols": ["BTC/USDT"], "ccxt": {"apiKey": "k"}}, "ccxt"),
            ({"symbols": ["BTC/USDT"], "credentials_env": {"apiKey": "HOME"}}, "credentials_env"),
            ({"symbols": [SQL], "ccxt": before_connectors["connectors"][0]["ccxt"]}, "symbol"),
        ]
        for body, named in bad_connectors:
            status, answer = send(port, "PUT", "/connectors/binance", body)
            assert status == 400 and named in answer["error"], (body, answer)
        dead = ccxt_options(f"http://127.0.0.1:{free_port()}")  # nothing listens there
        status, answer = send(
            port, "PUT", "/connectors/binance", {"symbols": ["BTC/USDT"], "ccxt": dead}
        )
        assert status == 400 and answer["error"].startswith("could not open binance")
        status, answer = send(port, "PUT", "/connectors/Bad%20Id", {"symbols": ["BTC/USDT"]})
        assert status == 400 and answer["error"].startswith("id:")
        assert send(port, "GET", "/jobs")[1]["total"] == before_jobs
        assert send(port, "GET", "/connectors")[1] == before_connectors | {
            "connectors": [
                before_connectors["connectors"][0] | {"rate_limit_state": answer_state(port)}
            ]
        }
    finally:
        assert collector.stop() == 0


def answer_state(port: int) -> dict[str, Any]:
    return send(port, "GET", "/connectors/binance")[1]["rate_limit_state"]


def test_off_loopback_every_change_needs_the_token(exchange_rig, tmp_path, specs, monkeypatch):
    monkeypatch.setenv("TDA_ADMIN_TOKEN", "s3cret-token")
    rig = exchange_rig(specs)
    port = free_port()
    config = rig.config(
        ["BTC/USDT"], live_initial_candles=INITIAL, admin={"host": "0.0.0.0", "port": port}
    )
    collector = Collector(config, port, "--mode=live")

    def authorised(method: str, path: str, body: Any = None):
        return send(port, method, path, body, token="s3cret-token")

    try:
        collector.wait_until(lambda: collector.named("live_started"), what="live")
        connectors = authorised("GET", "/connectors")[1]
        changes = [
            (
                "PUT",
                "/connectors/binance",
                {**connectors["connectors"][0], "symbols": ["ETH/USDT"]},
            ),
            ("POST", "/connectors/binance/disable", None),
            ("POST", "/jobs", {"exchange": "binance", "symbol": "ETH/USDT", "timeframe": "1m"}),
            ("DELETE", f"/jobs/{BTC}", None),
            ("POST", f"/jobs/{BTC}/backfill", {"start": "2024-02-28"}),
        ]
        for method, path, body in changes:
            # The server's access policy answers first: 401 without a token, 403 with a wrong one.
            status, answer = send(port, method, path, body, token=None)
            assert status == 401 and "bearer token is required" in answer["error"]
            status, answer = send(port, method, path, body, token="wrong")
            assert status == 403 and answer == {"error": "the bearer token is wrong"}
        assert authorised("GET", "/connectors")[1]["connectors"][0]["enabled"] is True
        assert [j["id"] for j in authorised("GET", "/jobs")[1]["jobs"]] == [BTC]
        status, answer = authorised("POST", "/jobs", changes[2][2])
        assert status == 201 and answer["job"]["id"] == ETH
    finally:
        assert collector.stop() == 0


def test_a_new_connector_put_at_run_time_is_opened_and_collected(exchange_rig, tmp_path, specs):
    rig = exchange_rig(specs)
    collector = start_live(rig)
    port = collector.port
    okx_id = "okx:ETH-USDT:1m:live"
    with FakeOkx([SymbolSpec("ETH/USDT")], clock=lambda: FROZEN_NOW_S) as okx:
        try:
            block = {
                "symbols": ["ETH/USDT"],
                "timeframes": ["1m"],
                "ccxt": okx_options(okx.base_url),
            }
            status, created = send(port, "PUT", "/connectors/okx", block)
            assert status == 201 and created["id"] == "okx" and created["enabled"] is True
            assert created["rate_limit_state"]["limit"] >= 1
            collector.wait_until(lambda: collector.job(okx_id)["rows"] >= INITIAL, what="okx rows")
            assert send(port, "PUT", "/connectors/okx", block)[0] == 200
            listed = send(port, "GET", "/connectors")[1]["connectors"]
            assert [c["id"] for c in listed] == ["binance", "okx"]
            assert job_ids(port) == [BTC, okx_id]

            status, deleted = send(port, "DELETE", "/connectors/okx")
            deleted_at = time.monotonic()
            assert status == 200 and deleted["connector"]["id"] == "okx"
            assert [c["id"] for c in send(port, "GET", "/connectors")[1]["connectors"]] == [
                "binance"
            ]
            assert job_ids(port) == [BTC] and send(port, "GET", "/connectors/okx")[0] == 404
            time.sleep(1.5)  # three refresh ticks
            assert [r for r in okx.candle_requests() if r.time > deleted_at] == []
            assert send(port, "DELETE", "/connectors/okx")[0] == 404
        finally:
            assert collector.stop() == 0
    rows = read_duckdb_rows(str(tmp_path / "ohlcv.duckdb"), JobKey("okx", "ETH/USDT", "1m"))
    closed = [
        (r["timestamp_ms"], r["open"], r["high"], r["low"], r["close"], r["volume"])
        for r in rows
        if r["is_closed"]
    ]
    assert closed == latest_closed(SymbolSpec("ETH/USDT"), INITIAL)
