"""A real collector run seen from outside: /metrics moving, Loki pushes, secrets kept out."""

from __future__ import annotations

import json
import time
import urllib.request

from collector_support import (
    events_named,
    free_port,
    parse_events,
    run_in_process,
    start_subprocess,
    stop,
    wait_for_event,
    write_config,
)
from fake_exchange import SymbolSpec
from loki_capture import LokiCapture, closed_port_url

from tda_collector.cli import main

SPECS = [SymbolSpec("BTC/USDT"), SymbolSpec("ETH/USDT")]
ARGS = ("--mode=history", "--start=2024-02-27", "--end=2024-03-01")


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        named = line.startswith(name + "{") or line.startswith(name + " ")
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_and_health_move_during_a_live_run(exchange_rig):
    port = free_port()
    rig = exchange_rig(SPECS, clock=time.time)
    config = rig.config(
        live_initial_candles=500,
        page_limit=100,
        update_interval_seconds=2,
        admin={"host": "127.0.0.1", "port": port},
    )
    proc = start_subprocess(config, "--mode=live")
    try:
        wait_for_event(proc, "admin_started", 30)
        assert scrape(port, "/healthz")[0] == 200
        wait_for_event(proc, "live_cycle_complete", 60)
        status, first = scrape(port)
        assert scrape(port, "/readyz")[0] == 200
        rig.fake.reset_log()
        deadline = time.monotonic() + 20
        second = first
        while time.monotonic() < deadline and sample(
            second, "tda_exchange_requests_total"
        ) <= sample(first, "tda_exchange_requests_total"):
            time.sleep(0.5)
            second = scrape(port)[1]
    finally:
        stop(proc)
    assert status == 200
    assert sample(first, "tda_exchange_requests_total", exchange="binance", outcome="ok") >= 10
    assert sample(second, "tda_exchange_requests_total") > sample(
        first, "tda_exchange_requests_total"
    )
    assert sample(first, "tda_rows_written_total", store="duckdb") >= 2 * 500
    assert sample(first, "tda_fetch_duration_seconds_count", exchange="binance") >= 10
    assert sample(first, "tda_rate_limit_budget_per_second", exchange="binance") == 200
    lag = sample(first, "tda_candle_lag_seconds", exchange="binance", timeframe="1m")
    assert 0 <= lag < 120
    assert "symbol=" not in first


def test_loki_receives_every_event_with_its_own_timestamp(exchange_rig, capsys):
    rig = exchange_rig(SPECS)
    with LokiCapture() as loki:
        config = rig.config(page_limit=200, logging={"loki": {"url": loki.url}})
        code, events = run_in_process(capsys, config, *ARGS)
        entries = loki.wait_for_entries(len(events))
        pushes = len(loki.pushes)
    assert code == 0
    assert len(entries) == len(events) > 40
    assert pushes < len(events) / 10  # batched
    by_line = {json.dumps(line, sort_keys=True): (labels, ts) for labels, ts, line in entries}
    for event in events:
        labels, ts = by_line[json.dumps(event, sort_keys=True)]
        assert set(labels) <= {"service_name", "environment", "exchange", "mode", "level"}
        assert labels["mode"] == "history" and labels["level"] == event["level"]
        stamped = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(ts) / 1e9))
        assert event["ts"].startswith(stamped)


def timed_run(capsys, tmp_path, rig, loki_url):
    workdir = tmp_path / loki_url.replace(":", "_").replace("/", "_")
    workdir.mkdir()
    config = rig.config(workdir=workdir, page_limit=200, logging={"loki": {"url": loki_url}})
    started = time.monotonic()
    code, events = run_in_process(capsys, config, *ARGS)
    return code, events, time.monotonic() - started


def test_a_loki_that_is_down_or_hangs_changes_nothing(exchange_rig, tmp_path, capsys):
    rig = exchange_rig(SPECS)
    with LokiCapture() as up, LokiCapture(mode="hang") as hanging:
        baseline = timed_run(capsys, tmp_path, rig, up.url)
        for url in (closed_port_url(), hanging.url):
            code, events, seconds = timed_run(capsys, tmp_path, rig, url)
            assert code == baseline[0] == 0
            assert (
                events_named(events, "history_complete")[-1]["rows"]
                == events_named(baseline[1], "history_complete")[-1]["rows"]
            )
            assert seconds < baseline[2] + 1.5
            assert len(events_named(events, "loki_push_failed")) <= 1


def test_secrets_never_appear_in_any_output(exchange_rig, capsys):
    secrets = {
        "BINANCE_API_KEY": "key-3f9a7c1e5d",
        "BINANCE_SECRET": "secret-b84e02d6aa",
        "LOKI_USERNAME": "loki-user-71c2",
        "LOKI_PASSWORD": "loki-pass-9d0e4b",
        "LOKI_TENANT_ID": "tenant-5a1f",
    }
    port = free_port()
    rig = exchange_rig(SPECS)
    with LokiCapture() as loki:
        config = rig.config(
            logging={"loki": {"url": loki.url}}, admin={"host": "127.0.0.1", "port": port}
        )
        text = config.read_text().replace(
            "  id: binance\n",
            "  id: binance\n  credentials_env: {apiKey: BINANCE_API_KEY, secret: BINANCE_SECRET}\n",
        )
        config.write_text(text)
        capsys.readouterr()
        code = main(["--config", str(config), *ARGS], environ=secrets)
        out, err = capsys.readouterr()
        pushes = json.dumps([p.body for p in loki.pushes])
        headers = [p.headers for p in loki.pushes]
    assert code == 0
    assert headers and headers[0]["x-scope-orgid"] == "tenant-5a1f"
    assert headers[0]["authorization"].startswith("Basic ")
    everything = out + err + pushes
    for value in secrets.values():
        assert value not in everything
    assert parse_events(out)


def test_a_missing_credential_is_a_one_line_usage_error(tmp_path, capsys):
    config = write_config(tmp_path, "http://127.0.0.1:9", ["BTC/USDT"], ["1m"])
    config.write_text(
        config.read_text().replace(
            "  id: binance\n", "  id: binance\n  credentials_env: {apiKey: NOPE_KEY}\n"
        )
    )
    code = main(["--config", str(config), *ARGS], environ={})
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == (
        "tda-collector: error: exchanges[0].credentials_env.apiKey: NOPE_KEY is not set"
    )
