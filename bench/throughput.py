"""History throughput at the exchange's limit: the collector against the naive baseline.

Each scale runs a fresh fake exchange process with a strict budget (429, then 418 bans, like
Binance) and injected latency. Every run asks for about the same number of requests (fewer
symbols get longer ranges), so rates and CPU per candle compare across scales; the baseline,
being sequential, gets a smaller slice of the same workload to keep the run short.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .harness import (
    FAKE_NOW_S,
    fake_exchange,
    run_measured,
    synthetic_symbols,
    write_collector_config,
)

MIN_MS = 60_000
PAGE = 1000


@dataclass
class Row:
    name: str
    symbols: int
    requests: int
    candles: int
    seconds: float
    cpu_s: float
    rss_mib: float
    status_429: int
    status_418: int
    target_rps: float
    sustained_rps: float  # between the first and the last page: start-up and the tail excluded
    steady_cpu_us: float | None = None  # CPU per candle between the first and the last page

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def cells(self) -> list[str]:
        return [
            self.name,
            str(self.symbols),
            f"{self.rps:.1f}",
            f"{self.rps / self.target_rps:.3f}",
            f"{self.sustained_rps / self.target_rps:.3f}",
            f"{self.candles / self.seconds:,.0f}",
            str(self.status_429),
            str(self.status_418),
            f"{self.cpu_s * 1e6 / max(1, self.candles):.2f}",
            "" if self.steady_cpu_us is None else f"{self.steady_cpu_us:.2f}",
            f"{self.rss_mib:.0f}",
        ]


def _steady_cpu_us(marks: list[tuple[str, float]]) -> float | None:
    """CPU per candle stored between the first and the last page: no start-up, no shutdown."""
    pages = [(json.loads(line), cpu) for line, cpu in marks]
    if len(pages) < 2:
        return None
    rows = sum(event["rows"] for event, _ in pages[1:])
    return (pages[-1][1] - pages[0][1]) * 1e6 / max(1, rows)


def _sustained_rps(events: list[dict]) -> float:
    """Pages per second between the first and the last page written (one request a page)."""
    stamps = [
        datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).timestamp()
        for e in events
        if e["event"] == "history_page_done"
    ]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0


HEADER = [
    "run",
    "symbols",
    "req/s",
    "req/s ÷ (B×safety)",
    "sustained ÷ (B×safety)",
    "candles/s",
    "429",
    "418",
    "CPU µs/candle",
    "steady CPU µs/candle",
    "peak RSS MiB",
]


def _range(pages_per_symbol: int) -> tuple[int, int]:
    end_ms = int(FAKE_NOW_S * 1000) // MIN_MS * MIN_MS - 60 * MIN_MS
    return end_ms - pages_per_symbol * PAGE * MIN_MS, end_ms


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def history_argv(config: Path, start_ms: int, end_ms: int) -> list[str]:
    """The collector's history mode over [start_ms, end_ms), as a command line."""
    return [
        sys.executable,
        "-m",
        "tda_collector",
        "--config",
        str(config),
        "--mode=history",
        f"--start={_iso(start_ms)}",
        f"--end={_iso(end_ms)}",
    ]


def run_collector(
    symbols: int, budget: int, safety: float, latency_ms: float, requests: int
) -> Row:
    pages = max(1, requests // symbols)
    start_ms, end_ms = _range(pages)
    with (
        tempfile.TemporaryDirectory() as tmp,
        fake_exchange(symbols, budget, latency_ms) as fake,
    ):
        config = write_collector_config(
            Path(tmp), fake.base_url, synthetic_symbols(symbols), budget, safety, concurrency=32
        )
        measured = run_measured(
            history_argv(config, start_ms, end_ms), cpu_marks=('"history_page_done"',)
        )
    events = [json.loads(line) for line in measured.stdout.splitlines() if line.startswith("{")]
    summary = next(e for e in reversed(events) if e["event"] == "history_complete")
    return Row(
        "collector",
        symbols,
        summary["requests"],
        summary["rows"],
        summary["duration_ms"] / 1000,
        measured.cpu_s,
        measured.max_rss_mib,
        fake.counters.get("429", 0),
        fake.counters.get("418", 0),
        budget * safety,
        _sustained_rps(events),
        _steady_cpu_us(measured.cpu_at_marks),
    )


def run_baseline(symbols: int, budget: int, safety: float, latency_ms: float, requests: int) -> Row:
    pages = max(1, requests // symbols)
    names = synthetic_symbols(min(symbols, requests))
    start_ms, end_ms = _range(pages)
    with fake_exchange(symbols, budget, latency_ms) as fake:
        measured = run_measured(
            [
                sys.executable,
                "-m",
                "bench.naive",
                fake.base_url,
                str(start_ms),
                str(end_ms),
                *names,
            ]
        )
    result = json.loads(measured.stdout.strip().splitlines()[-1])
    return Row(
        "naive baseline",
        len(names),
        result["requests"],
        result["candles"],
        measured.wall_s,
        measured.cpu_s,
        measured.max_rss_mib,
        fake.counters.get("429", 0),
        fake.counters.get("418", 0),
        budget * safety,
        result["requests"] / result["seconds"],
    )


def render(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)
