"""Live mode: how soon after a candle closes is it stored, for many symbols on one budget?

A fake exchange process serves N symbols in real time with a strict budget; the collector runs
live on 1m candles until two closes have passed. For every candle that closed during the run,
latency = ingested_at of its closed row - its close time. The bound to compare with is the time
one cycle needs at the budget plus the settle delay: N / (B × safety) + 2 s.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import yaml

from .harness import ccxt_options, fake_exchange, synthetic_symbols

MIN_MS = 60_000
SETTLE_S = 2.0


def run(symbols: int, budget: int, safety: float, latency_ms: float) -> dict[str, float]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        fake_exchange(symbols, budget, latency_ms, realtime=True) as fake,
    ):
        workdir = Path(tmp)
        config = {
            "exchanges": [
                {
                    "id": "binance",
                    "symbols": synthetic_symbols(symbols),
                    "timeframes": ["1m"],
                    "ccxt": ccxt_options(fake.base_url),
                    "rate_limit": {"requests_per_second": budget, "safety": safety},
                }
            ],
            "live_initial_candles": 2,
            "live_concurrency": 64,
            "storage": {"duckdb": {"path": str(workdir / "ohlcv.duckdb")}},
            "state_path": str(workdir / "state.sqlite"),
            "logging": {"level": "WARNING"},
            "admin": {"port": 0},
        }
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tda_collector",
                "--config",
                str(workdir / "config.yaml"),
                "--mode=live",
            ],
            stdout=subprocess.DEVNULL,
        )
        started_ms = time.time() * 1000
        first_close = (int(started_ms) // MIN_MS + 1) * MIN_MS
        if first_close - started_ms < 40_000:  # leave the start-up catch-up its own minute
            first_close += MIN_MS
        cycle_s = symbols / (budget * safety)
        stop_at = first_close + MIN_MS + (cycle_s + SETTLE_S + 5) * 1000
        time.sleep(max(0.0, (stop_at - time.time() * 1000) / 1000))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        with duckdb.connect(str(workdir / "ohlcv.duckdb"), read_only=True) as con:
            rows = con.execute(
                """SELECT epoch_ms(timestamp), epoch_ms(ingested_at) FROM market_data_ohlcv
                   WHERE is_closed AND epoch_ms(timestamp) + 60000 IN (?, ?)""",
                [first_close, first_close + MIN_MS],
            ).fetchall()
    latencies = np.array([(ingested - (opened + MIN_MS)) / 1000 for opened, ingested in rows])
    expected = 2 * symbols
    return {
        "symbols": symbols,
        "candles_expected": expected,
        "candles_stored": len(rows),
        "p50_s": float(np.percentile(latencies, 50)) if len(rows) else float("nan"),
        "p95_s": float(np.percentile(latencies, 95)) if len(rows) else float("nan"),
        "max_s": float(latencies.max()) if len(rows) else float("nan"),
        "bound_s": cycle_s + SETTLE_S,
    }


def render(result: dict[str, float]) -> str:
    return (
        f"| {result['symbols']} | {result['candles_stored']}/{result['candles_expected']} | "
        f"{result['p50_s']:.2f} | {result['p95_s']:.2f} | {result['max_s']:.2f} | "
        f"{result['bound_s']:.2f} | {result['max_s'] / result['bound_s']:.2f} |"
    )


HEADER = (
    "| symbols | closed candles stored | p50 s | p95 s | max s | bound N/(B×safety)+2 s "
    "| max ÷ bound |\n|---|---|---|---|---|---|---|"
)
