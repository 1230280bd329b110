"""`GET /ohlcv` from a running collector (DuckDB): a year of 1m as JSON pages and as Parquet,
and the latency of one-day reads with and without a backfill writing at the full budget.

One DuckDB file is seeded (SQL, the collector's own table) with a year of 1m candles of one
series, ending at the fake exchange's clock. Then:

1. `--mode=live` on that series alone (nothing to catch up, so nothing is written): the year
   read as JSON (every page, `limit` 10,000) and as Parquet, each timed (wall seconds, the
   collector's CPU µs per candle from /proc, its peak RSS from VmHWM); then `--reads` one-day
   reads (JSON, one page), their p50/p99: the baseline.
2. `--mode=history` of `--symbols` more series at the budget (`--budget` × `--safety`
   requests/s, 1,000-candle pages), the same one-day reads while it writes: their p50/p99
   against the baseline's.
3. The floor: the same year read straight from the file with DuckDB and written as Parquet
   by pyarrow, in this process, no HTTP (what the API's cost is compared with).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import requests
import yaml

from .harness import FAKE_NOW_S, _cpu_so_far, fake_exchange, synthetic_symbols
from .harness import write_collector_config as base_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from collector_support import free_port
from seeding import MIN, YEAR_OF_MINUTES, seed_minutes

from tda_collector.models import JobKey

DAY = 1440 * MIN
NOW_MS = int(FAKE_NOW_S * 1000)
YEAR_END = NOW_MS - NOW_MS % MIN  # the candle in progress at the fake's clock is not seeded
YEAR_START = YEAR_END - YEAR_OF_MINUTES * MIN


@dataclass
class Timed:
    what: str
    seconds: float
    cpu_us_per_candle: float
    peak_rss_mib: float
    rows: int


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Collector:
    """A collector process with its admin API; stdout drained so it never blocks."""

    def __init__(self, config: Path, port: int, *args: str) -> None:
        argv = [sys.executable, "-m", "tda_collector", "--config", str(config), *args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        self.pages = 0
        self.ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(b"{"):
                event = json.loads(line)["event"]
                self.pages += event == "history_page_done"
                if event in ("live_cycle_complete", "history_page_done"):
                    self.ready.set()

    def wait_ready(self) -> None:
        if not self.ready.wait(120):
            raise RuntimeError("the collector did not start within 120 s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _params(start_ms: int, end_ms: int, **more: Any) -> dict[str, Any]:
    series = {"exchange": "binance", "symbol": "SYM0001/USDT", "timeframe": "1m"}
    return {**series, "start": start_ms, "end": end_ms, **more}


def _timed(collector: Collector, what: str, read: Any) -> Timed:
    cpu, started = _cpu_so_far(collector.proc.pid), time.monotonic()
    rows = read()
    seconds = time.monotonic() - started
    cpu_us = (_cpu_so_far(collector.proc.pid) - cpu) * 1e6 / max(rows, 1)
    return Timed(what, seconds, cpu_us, _peak_rss_mib(collector.proc.pid), rows)


def _year_as_json(url: str) -> int:
    rows, start = 0, YEAR_START
    with requests.Session() as session:
        while start is not None:
            page = session.get(url, params=_params(start, YEAR_END, limit=10_000), timeout=60)
            page.raise_for_status()
            body = page.json()
            rows += len(body["rows"])
            start = body["next"]
    return rows


def _year_as_parquet(url: str) -> int:
    body = io.BytesIO()
    params = _params(YEAR_START, YEAR_END, format="parquet")
    with requests.get(url, params=params, stream=True, timeout=60) as answer:
        answer.raise_for_status()
        for part in answer.iter_content(1 << 20):
            body.write(part)
    body.seek(0)
    return pq.ParquetFile(body).metadata.num_rows


def _day_latencies(url: str, reads: int) -> list[float]:
    """Seconds per one-day read, days spread over the year."""
    out = []
    with requests.Session() as session:
        for i in range(reads):
            start = YEAR_START + (i * 37 % 360) * DAY
            began = time.monotonic()
            answer = session.get(url, params=_params(start, start + DAY, limit=1440), timeout=60)
            answer.raise_for_status()
            assert len(answer.json()["rows"]) == 1440
            out.append(time.monotonic() - began)
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _floor(path: Path) -> Timed:
    """The year read straight from the file by DuckDB and written as Parquet, no HTTP."""
    cpu, started = time.process_time(), time.monotonic()
    with duckdb.connect(str(path), read_only=True) as con:
        table = con.execute(
            "SELECT * FROM market_data_ohlcv WHERE symbol = ? ORDER BY timestamp",
            ["SYM0001/USDT"],
        ).to_arrow_table()
    pq.write_table(table, io.BytesIO(), compression="zstd")
    seconds, cpu_s = time.monotonic() - started, time.process_time() - cpu
    rows = table.num_rows
    return Timed("floor: DuckDB → Parquet", seconds, cpu_s * 1e6 / rows, 0.0, rows)


def _config(workdir: Path, base_url: str, symbols: list[str], budget: int, safety: float) -> Path:
    path = base_config(workdir, base_url, symbols, budget, safety, concurrency=16)
    config = yaml.safe_load(path.read_text())
    port = free_port()
    config["admin"] = {"host": "127.0.0.1", "port": port}
    config["update_interval_seconds"] = 3600  # phase 1: no refresh writes while it reads
    # Off, so that start-up does not recompute the seeded year's indicators (the columns are
    # stored all the same): the peak RSS measured is the reads'.
    config["indicators"] = {"enabled": False}
    path.write_text(yaml.safe_dump(config))
    return path


def run(symbols: int, budget: int, safety: float, latency_ms: float, reads: int) -> None:
    with tempfile.TemporaryDirectory(prefix="tda-bench-read-") as tmp:
        workdir = Path(tmp)
        seed_minutes(
            str(workdir / "ohlcv.duckdb"),
            JobKey("binance", "SYM0001/USDT", "1m"),
            YEAR_START,
            YEAR_OF_MINUTES,
        )
        names = synthetic_symbols(symbols + 1)
        with fake_exchange(symbols + 1, None, latency_ms) as fake:
            config = _config(workdir, fake.base_url, names[:1], budget, safety)
            port = yaml.safe_load(config.read_text())["admin"]["port"]
            live = Collector(config, port, "--mode=live")
            try:
                live.wait_ready()
                url = live.url + "/ohlcv"
                idle_rss = _peak_rss_mib(live.proc.pid)
                timings = [
                    _timed(live, "year of 1m as JSON pages", lambda: _year_as_json(url)),
                    _timed(live, "year of 1m as Parquet", lambda: _year_as_parquet(url)),
                ]
                quiet = _day_latencies(url, reads)
            finally:
                live.stop()
            config = _config(workdir, fake.base_url, names, budget, safety)
            port = yaml.safe_load(config.read_text())["admin"]["port"]
            # Long enough to outlast the reads: `symbols` series of 200 pages each.
            start_iso = time.strftime("%Y-%m-%d", time.gmtime((YEAR_END - 200_000 * MIN) / 1000))
            history = Collector(config, port, "--mode=history", f"--start={start_iso}")
            try:
                history.wait_ready()
                pages_before, began = history.pages, time.monotonic()
                busy = _day_latencies(history.url + "/ohlcv", reads)
                pages_per_s = (history.pages - pages_before) / (time.monotonic() - began)
                still_writing = history.proc.poll() is None
            finally:
                history.stop()
        timings.append(_floor(workdir / "ohlcv.duckdb"))
    print(f"the collector's peak RSS before any read: {idle_rss:.1f} MiB")
    _report(timings, quiet, busy, pages_per_s, budget * safety, still_writing)


def _report(
    timings: list[Timed],
    quiet: list[float],
    busy: list[float],
    pages_per_s: float,
    budget_rps: float,
    still_writing: bool,
) -> None:
    print(f"{'read':<28} {'rows':>8} {'seconds':>8} {'CPU µs/candle':>14} {'peak RSS MiB':>13}")
    for t in timings:
        rss = f"{t.peak_rss_mib:13.1f}" if t.peak_rss_mib else f"{'-':>13}"
        print(f"{t.what:<28} {t.rows:>8} {t.seconds:8.2f} {t.cpu_us_per_candle:14.2f} {rss}")
    floor = timings[-1]
    for t in timings[:-1]:
        print(
            f"{t.what} ÷ floor: seconds {t.seconds / floor.seconds:.1f}x, "
            f"CPU per candle {t.cpu_us_per_candle / floor.cpu_us_per_candle:.1f}x"
        )
    print(f"\none-day reads (1,440 rows, JSON), {len(quiet)} each, milliseconds:")
    print(f"{'':<34} {'p50':>7} {'p99':>7} {'max':>7}")
    for what, values in (("no writer (baseline)", quiet), ("backfill writing", busy)):
        ms = [v * 1000 for v in values]
        print(f"{what:<34} {_pct(ms, 0.5):7.1f} {_pct(ms, 0.99):7.1f} {max(ms):7.1f}")
    print(
        f"p99 with the backfill ÷ without: {_pct(busy, 0.99) / _pct(quiet, 0.99):.2f}x; "
        f"the backfill stored {pages_per_s:.1f} pages/s meanwhile (budget {budget_rps:.0f} "
        f"requests/s){'' if still_writing else ' - it FINISHED before the reads did'}"
    )
