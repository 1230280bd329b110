"""Peak memory of a DuckDB history backfill: against the rows written, and the symbols.

The collector runs as a subprocess against the fake exchange in its own process (no request
budget, no latency, 1,000-candle pages), so the peak RSS measured (wait4's rusage) is the
collector's alone. Two comparisons, each a ratio that should stay near 1:

- rows: 10 symbols × `--small-rows` in total against 10 symbols × `--large-rows` (1m);
- symbols: 10 against `--many-symbols` symbols at the same total of `--symbol-rows` rows.

The RSS is also sampled from /proc while pages are written, to show its trend over the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .harness import fake_exchange, synthetic_symbols, write_collector_config
from .throughput import MIN_MS, _range, history_argv

PAGE = 1000


@dataclass
class Run:
    symbols: int
    rows_asked: int
    rows: int
    seconds: float
    rss_mib: float
    returncode: int
    last_event: str = ""  # the last warning or error the collector logged, if any
    # (rows stored so far, RSS MiB) sampled as pages are written
    trend: list[tuple[int, float]] = field(default_factory=list)


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _measure(argv: list[str], samples: int = 8, expected_rows: int = 0) -> tuple[Any, ...]:
    """Run to completion; peak RSS from wait4, and about `samples` RSS readings on the way."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    step = max(1, expected_rows // samples)
    rows, next_sample, trend, summary, last = 0, step, [], None, ""
    for line in proc.stdout:
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        if event["level"] in ("WARNING", "ERROR"):
            last = line.strip()
        if event["event"] == "history_page_done":
            rows += event.get("rows", 0)
            if rows >= next_sample:
                trend.append((rows, _rss_mib(proc.pid)))
                next_sample += step
        elif event["event"] == "history_complete":
            summary = event
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return time.monotonic() - started, usage.ru_maxrss / 1024, code, summary, trend, last


def run(symbols: int, total_rows: int, settings: dict[str, Any] | None = None) -> Run:
    """A history backfill of `total_rows` 1m candles spread over `symbols` symbols."""
    per_symbol = max(1, total_rows // symbols)
    start_ms, end_ms = _range(1)
    start_ms = end_ms - per_symbol * MIN_MS
    with tempfile.TemporaryDirectory() as tmp, fake_exchange(symbols, None, 0.0) as fake:
        config = write_collector_config(
            Path(tmp), fake.base_url, synthetic_symbols(symbols), 100_000, 1.0, concurrency=16
        )
        if settings:
            loaded = yaml.safe_load(config.read_text())
            loaded["storage"]["duckdb"].update(settings)
            config.write_text(yaml.safe_dump(loaded))
        seconds, rss, code, summary, trend, last = _measure(
            history_argv(config, start_ms, end_ms), expected_rows=per_symbol * symbols
        )
    stored = summary["rows"] if summary else 0
    return Run(symbols, per_symbol * symbols, stored, seconds, rss, code, last, trend)


HEADER = "| symbols | rows | seconds | exit | peak RSS MiB | RSS trend MiB (rows stored: RSS) |"


def render(r: Run) -> str:
    trend = ", ".join(f"{rows / 1e6:.2f}M: {rss:.0f}" for rows, rss in r.trend)
    if r.returncode:
        trend += f" (failed: {r.last_event[:300]})"
    return (
        f"| {r.symbols} | {r.rows:,} | {r.seconds:.1f} | {r.returncode} | {r.rss_mib:.0f} "
        f"| {trend} |"
    )


def compare(name: str, a: Run, b: Run) -> str:
    ratio = b.rss_mib / a.rss_mib
    verdict = "within 20%" if abs(ratio - 1) <= 0.2 else "NOT within 20%"
    return f"{name}: {b.rss_mib:.0f} / {a.rss_mib:.0f} MiB = {ratio:.3f} ({verdict})"


def main(
    small_rows: int = 7_200,
    large_rows: int = 2_628_000,
    symbol_rows: int = 720_000,
    many_symbols: int = 1_000,
    settings: dict[str, Any] | None = None,
) -> None:
    print(HEADER + "\n|---|---|---|---|---|---|", flush=True)
    runs = {}
    for key, symbols, rows in (
        ("small", 10, small_rows),
        ("large", 10, large_rows),
        ("few", 10, symbol_rows),
        ("many", many_symbols, symbol_rows),
    ):
        runs[key] = run(symbols, rows, settings)
        print(render(runs[key]), flush=True)
    print()
    print(compare(f"rows {small_rows:,} -> {large_rows:,}", runs["small"], runs["large"]))
    print(compare(f"symbols 10 -> {many_symbols:,}", runs["few"], runs["many"]))
