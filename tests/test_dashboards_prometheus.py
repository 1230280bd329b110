"""The metrics dashboard against a real Prometheus: every expression has data on a healthy run.

Debian's `prometheus` (installed by this test when missing and the machine allows it; under
CI=true a missing one fails the test) scrapes the collector's /metrics every second while the
collector runs live mode against the fake exchange on loopback. Every PromQL expression of
deploy/grafana/dashboards/tda-collector-metrics.json, with Grafana's variables substituted,
must then return at least one series through Prometheus's HTTP API: a panel on a healthy
system reads 0, never "No data".
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from collector_support import free_port, start_subprocess, write_config
from debian_support import find_or_install
from fake_exchange_process import FakeExchangeProcess

from test_deploy import dashboard_queries

BOARD = "tda-collector-metrics.json"
JOB = "tda-collector"  # the job name of deploy/prometheus/prometheus.yml, which the board reads
SCRAPE_S = 1
# Grafana's variables as it would send them for a 1 s scrape interval on a short range.
VARIABLES = {"__rate_interval": "10s", "__interval": "1s", "__range": "5m", "exchange": ".*"}
DATA_LIMIT_S = 40


def find_prometheus() -> tuple[str | None, str]:
    """The prometheus binary, installing Debian's package if needed; else None and why."""
    return find_or_install("prometheus", "prometheus", "--no-install-recommends")


def substitute(expr: str) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: VARIABLES[m.group(1)], expr)


def board_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every query of the metrics dashboard, its variable's selector too."""
    return [
        (where, substitute(expr))
        for where, lang, expr in dashboard_queries()
        if lang == "promql" and where.startswith(BOARD)
    ]


def query(base: str, expr: str) -> list[dict[str, object]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as answer:
        body = json.loads(answer.read())
    assert body["status"] == "success", body
    result: list[dict[str, object]] = body["data"]["result"]
    return result


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    binary, reason = find_prometheus()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"no Prometheus under CI=true: {reason}")
        pytest.skip(f"SKIPPED LOUDLY: no Prometheus ({reason}); dashboard NOT evaluated")
    return binary


@contextlib.contextmanager
def prometheus(binary: str, target_port: int) -> Iterator[str]:
    """Prometheus on loopback scraping 127.0.0.1:`target_port` every second; its base URL."""
    with tempfile.TemporaryDirectory(prefix="tda-prometheus-") as tmp:
        config = Path(tmp) / "prometheus.yml"
        scrape = {
            "job_name": JOB,
            "metrics_path": "/metrics",
            "scrape_interval": f"{SCRAPE_S}s",
            "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
        }
        config.write_text(yaml.safe_dump({"scrape_configs": [scrape]}), encoding="utf-8")
        port = free_port()
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp}/data",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 20
            while True:
                with (
                    contextlib.suppress(OSError),
                    urllib.request.urlopen(f"{base}/-/ready", timeout=1),
                ):
                    break
                assert proc.poll() is None, f"prometheus exited with {proc.returncode}"
                assert time.monotonic() < deadline, "prometheus not ready within 20 s"
                time.sleep(0.2)
            yield base
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_board_is_found_with_every_expression() -> None:
    expressions = board_expressions()
    assert len(expressions) == 20  # 19 panel queries and the $exchange variable's selector
    assert all("$" not in expr for _, expr in expressions)


def until_every_expression_has_data(base: str, process: subprocess.Popen[str]) -> list[str]:
    """Poll the board's expressions while `process` runs (at most DATA_LIMIT_S); the ones
    that never returned a series."""
    expressions = board_expressions()
    empty = {where for where, _ in expressions}
    deadline = time.monotonic() + DATA_LIMIT_S
    while empty and time.monotonic() < deadline and process.poll() is None:
        time.sleep(SCRAPE_S)
        empty -= {where for where, expr in expressions if where in empty and query(base, expr)}
    return sorted(empty)


def test_every_metrics_dashboard_expression_has_data_in_healthy_live_and_history_runs(
    tmp_path: Path, prometheus_binary: str
) -> None:
    admin_port = free_port()
    symbols = ["BTC/USDT", "ETH/USDT"]
    admin = {"host": "127.0.0.1", "port": admin_port}
    with FakeExchangeProcess(symbol=symbols) as fake:
        live_config = write_config(
            tmp_path,
            fake.base_url,
            symbols,
            ["1m", "1h"],
            admin=admin,
            live_initial_candles=50,
            update_interval_seconds=1,
        )
        with prometheus(prometheus_binary, admin_port) as base:
            collector = start_subprocess(live_config, "--mode=live")
            try:
                live_empty = until_every_expression_has_data(base, collector)
                assert collector.poll() is None, "the collector exited during the live run"
            finally:
                collector.send_signal(signal.SIGTERM)
                collector.communicate(timeout=10)
            assert collector.returncode == 0
            # A history run at 20 candles a request and ~18 requests/s: a few seconds of
            # scrapes on the same port, with history mode's own series.
            history_dir = tmp_path / "history"
            history_dir.mkdir()
            history_config = write_config(
                history_dir,
                fake.base_url,
                ["BTC/USDT"],
                ["1m"],
                admin=admin,
                rps=20,
                page_limit=20,
            )
            day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86_400))
            history = start_subprocess(history_config, "--mode=history", f"--start={day}")
            try:
                history_empty = until_every_expression_has_data(base, history)
            finally:
                out, _ = history.communicate(timeout=60)
    assert not live_empty, "no series in live mode for:\n" + "\n".join(live_empty)
    assert history.returncode == 0, out[-2000:]
    assert not history_empty, "no series in history mode for:\n" + "\n".join(history_empty)
