"""Running the real collector against the fake exchange: config files, runs, event parsing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tda_collector.cli import main

# 2024-03-01T00:00:30Z: a fixed exchange clock makes every run see the same closed candles.
FROZEN_NOW_S = 1_709_251_230.0
DAY_MS = 86_400_000


def ccxt_options(base_url: str, timeout_ms: int = 10_000) -> dict[str, Any]:
    return {
        "urls": {"api": {"public": base_url + "/api/v3", "private": base_url + "/api/v3"}},
        "options": {
            "fetchMarkets": {"types": ["spot"]},
            "fetchCurrencies": False,
            "fetchMargins": False,
        },
        "timeout": timeout_ms,
    }


def write_config(
    tmp_path: Path,
    base_url: str,
    symbols: list[str],
    timeframes: list[str],
    *,
    rps: float = 200,
    safety: float = 0.9,
    used_weight: dict[str, Any] | None = None,
    page_limit: int = 1000,
    timeout_ms: int = 10_000,
    exchange_id: str = "binance",
    ccxt: dict[str, Any] | None = None,
    archive: dict[str, Any] | None = None,
    **top_level: Any,
) -> Path:
    """A config for one exchange served at `base_url` (a fake on loopback); `ccxt` replaces
    the ccxt options that point it there, for exchanges whose URLs are shaped otherwise.
    `archive` is the exchange's archive block; by default off (tests never touch the public
    archive host)."""
    rate_limit: dict[str, Any] = {"requests_per_second": rps, "safety": safety}
    if used_weight is not None:
        rate_limit["used_weight"] = used_weight
    config = {
        "service_name": "tda-test",
        "environment": "test",
        "exchanges": [
            {
                "id": exchange_id,
                "symbols": symbols,
                "timeframes": timeframes,
                "ccxt": ccxt if ccxt is not None else ccxt_options(base_url, timeout_ms),
                "rate_limit": rate_limit,
                "archive": archive if archive is not None else {"enabled": False},
            }
        ],
        "history_page_limit": page_limit,
        "live_page_limit": page_limit,
        "storage": {"backend": "duckdb", "duckdb": {"path": str(tmp_path / "ohlcv.duckdb")}},
        "state_path": str(tmp_path / "state.sqlite"),
        "admin": {"port": 0},
        "retry": {"base_seconds": 0.05, "cap_seconds": 0.2, "attempts": 5},
        **top_level,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def run_in_process(capsys, config: Path, *args: str) -> tuple[int, list[dict[str, Any]]]:
    """`tda-collector --config CONFIG ARGS` in this process; returns exit code and events."""
    capsys.readouterr()
    code = main(["--config", str(config), *args], environ={})
    return code, parse_events(capsys.readouterr().out)


def start_subprocess(config: Path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TDA__")}
    return subprocess.Popen(
        [sys.executable, "-m", "tda_collector", "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def events_named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


def wait_for_event(proc, name: str, timeout_s: float) -> tuple[dict, list[dict]]:
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("{"):
            event = json.loads(line)
            seen.append(event)
            if event["event"] == name:
                return event, seen
    raise AssertionError(f"no {name} event; last: {seen[-3:]}")


def stop(proc) -> tuple[float, list[dict]]:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    elapsed = time.monotonic() - started
    return elapsed, [json.loads(line) for line in out.splitlines() if line.startswith("{")]
