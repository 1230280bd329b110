"""Shared benchmark plumbing: the fake exchange process and measured child processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))

from collector_support import ccxt_options  # noqa: E402
from fake_archive import FakeArchive as FakeArchive  # noqa: E402  (for bench/archive.py)
from fake_exchange import make_symbols as make_symbols  # noqa: E402
from fake_exchange_process import FakeExchangeProcess  # noqa: E402

# 2024-03-01T00:00:00Z: the fake exchange's clock for every benchmark run.
FAKE_NOW_S = 1_709_251_200.0


@dataclass
class Measured:
    wall_s: float
    cpu_s: float
    max_rss_mib: float
    returncode: int
    stdout: str
    # CPU seconds used so far, read each time a stdout line holds one of the `cpu_marks`
    cpu_at_marks: list[tuple[str, float]] = field(default_factory=list)


def _cpu_so_far(pid: int) -> float:
    """utime + stime of a running process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_measured(
    argv: list[str], env: dict[str, str] | None = None, cpu_marks: tuple[str, ...] = ()
) -> Measured:
    """Run a child to completion; whole-process CPU and peak RSS come from wait4's rusage."""
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    assert proc.stdout is not None
    lines, marks = [], []
    for line in proc.stdout:
        lines.append(line)
        if any(mark in line for mark in cpu_marks):
            marks.append((line, _cpu_so_far(proc.pid)))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(
        wall_s=time.monotonic() - started,
        cpu_s=usage.ru_utime + usage.ru_stime,
        max_rss_mib=usage.ru_maxrss / 1024,
        returncode=proc.returncode,
        stdout="".join(lines),
        cpu_at_marks=marks,
    )


def fake_exchange(
    symbols: int, rps: int | None, latency_ms: float, realtime: bool = False
) -> FakeExchangeProcess:
    """The fake exchange in its own process (its CPU is not counted as ours) with ``symbols``
    synthetic markets; its clock runs from FAKE_NOW_S, or is the wall clock if ``realtime``."""
    return FakeExchangeProcess(
        port=0,
        symbols=symbols,
        synthetic_only=True,
        latency_ms=latency_ms,
        start_time=None if realtime else FAKE_NOW_S,
        rps=rps or None,
    )


def write_collector_config(
    workdir: Path, base_url: str, symbols: list[str], rps: float, safety: float, concurrency: int
) -> Path:
    config = {
        "exchanges": [
            {
                "id": "binance",
                "symbols": symbols,
                "timeframes": ["1m"],
                "ccxt": ccxt_options(base_url),
                "rate_limit": {"requests_per_second": rps, "safety": safety},
                "archive": {"enabled": False},  # the REST path (bench/archive.py: the archive)
            }
        ],
        "history_page_limit": 1000,
        "history_concurrency": concurrency,
        "storage": {"backend": "duckdb", "duckdb": {"path": str(workdir / "ohlcv.duckdb")}},
        "state_path": str(workdir / "state.sqlite"),
        "logging": {"level": "INFO"},
        "admin": {"port": 0},
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def synthetic_symbols(count: int) -> list[str]:
    return [f"SYM{i:04d}/USDT" for i in range(1, count + 1)]
