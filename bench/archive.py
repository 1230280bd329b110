"""Deep history from the public archive against the same history over REST, and a scale point.

One run: (1) the same range (`--compare-symbols` × January 2024 of 1m) stored over REST (a fake
exchange process with budget B and latency, as `throughput`) and from the fake archive host
(monthly zips with CHECKSUM files); (2) the scale point, `--scale-symbols` × `--scale-days` of
1m up to the end of January 2024 from the archive (monthly files), with the store's default
group commit (`storage.duckdb.batch_rows` 262,144: several files a transaction) and, as the
baseline, with the former default 16,000 (a month's file a transaction when the writer is idle).
CPU is the collector's whole process (user + system from `wait4`, start-up included), peak RSS
from the same rusage. The archive host runs in this process (its CPU is not the collector's)
and serves zips rendered before the run, from disk.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import yaml

from tda_collector.exchange.archive_layout import ARCHIVE_LAYOUTS, plan_files
from tda_collector.timeframes import grid_of

from .harness import (
    FAKE_NOW_S,
    FakeArchive,
    FakeExchangeProcess,
    make_symbols,
    run_measured,
    synthetic_symbols,
    write_collector_config,
)
from .throughput import history_argv

DAY_MS = 86_400_000
END_MS = int(FAKE_NOW_S * 1000)  # 2024-03-01T00:00Z
JANUARY_2024 = (END_MS - 60 * DAY_MS, END_MS - 29 * DAY_MS)
# The former default group commit: a flush at 16,000 waiting rows, so a month's file (44,640
# rows) is committed alone whenever the writer is idle.
SMALL_GROUP = {"batch_rows": 16_000}


@dataclass
class Row:
    run: str
    symbols: int
    candles: int
    wall_s: float
    cpu_s: float
    rss_mib: float
    rest_requests: int
    files: int
    archive_mib: float

    def cells(self) -> list[str]:
        return [
            self.run,
            str(self.symbols),
            f"{self.candles:,}",
            f"{self.wall_s:.1f}",
            f"{self.candles / self.wall_s:,.0f}",
            f"{self.cpu_s * 1e6 / max(1, self.candles):.2f}",
            f"{self.rss_mib:.0f}",
            str(self.rest_requests),
            str(self.files),
            f"{self.archive_mib:,.0f}",
        ]


HEADER = [
    "run",
    "symbols",
    "candles",
    "wall s",
    "candles/s",
    "CPU µs/candle",
    "peak RSS MiB",
    "REST requests",
    "archive files",
    "archive MiB",
]


def render(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(r.cells()) + " |" for r in rows])


def _file_names(symbols: int, window: tuple[int, int]) -> list[str]:
    ids = [s.id for s in make_symbols(symbols, real_names=False)]
    layout, grid = ARCHIVE_LAYOUTS["binance"], grid_of("1m")
    return [f.name for i in ids for f in plan_files(layout, i, grid, window, END_MS)]


def _render_one(job: tuple[int, str, str]) -> int:
    symbols, cache, name = job
    host = FakeArchive(make_symbols(symbols, real_names=False), clock=lambda: FAKE_NOW_S)
    host.cache_dir = Path(cache)
    return len(host.zip_file(name) or b"")


def prerender(symbols: int, window: tuple[int, int], cache: Path) -> int:
    """Render every zip of the run to `cache` (two worker processes); returns their bytes."""
    jobs = [(symbols, str(cache), name) for name in _file_names(symbols, window)]
    with Pool(2) as pool:
        return sum(pool.map(_render_one, jobs, chunksize=4))


def _run(
    name: str,
    symbols: int,
    window: tuple[int, int],
    rest_url: str,
    archive: FakeArchive | None,
    duckdb: dict[str, object] | None = None,
) -> Row:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        config = write_collector_config(workdir, rest_url, synthetic_symbols(symbols), 50, 0.9, 16)
        loaded = yaml.safe_load(config.read_text())
        loaded["storage"]["duckdb"].update(duckdb or {})
        if archive is not None:
            loaded["exchanges"][0]["archive"] = {"base_url": archive.base_url}
            archive.reset_log()
        config.write_text(yaml.safe_dump(loaded))
        measured = run_measured(history_argv(config, *window))
    events = [json.loads(line) for line in measured.stdout.splitlines() if line.startswith("{")]
    summary = next(e for e in events if e["event"] == "history_complete")
    if measured.returncode != 0 or summary["failed"]:
        raise RuntimeError(f"{name}: exit {measured.returncode}: {summary['message']}")
    done = [e for e in events if e["event"] == "archive_file_done"]
    return Row(
        name,
        symbols,
        summary["rows"],
        measured.wall_s,
        measured.cpu_s,
        measured.max_rss_mib,
        summary["requests"],
        len(done),
        sum(e["bytes"] for e in done) / 2**20,
    )


def run(
    compare_symbols: int, scale_symbols: int, scale_days: int, budget: int, latency_ms: float
) -> None:
    """The table of the module's docstring. The scale window ends with January 2024, so it is
    made of monthly files, as deep history is (February's is not published by 1 March)."""
    scale_end = JANUARY_2024[1]
    scale_window = (scale_end - scale_days * DAY_MS, scale_end)
    symbols = max(compare_symbols, scale_symbols)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = Path(cache_dir)
        rendered = prerender(compare_symbols, JANUARY_2024, cache)
        rendered += prerender(scale_symbols, scale_window, cache)
        print(f"archive files rendered: {rendered / 2**20:,.0f} MiB", flush=True)
        specs = make_symbols(symbols, real_names=False)
        with (
            FakeExchangeProcess(
                port=0,
                symbols=symbols,
                synthetic_only=True,
                start_time=FAKE_NOW_S,
                rps=budget,
                latency_ms=latency_ms,
            ) as rest,
            FakeArchive(specs, clock=lambda: FAKE_NOW_S, cache_dir=cache) as archive,
        ):
            rows.append(_run("REST", compare_symbols, JANUARY_2024, rest.base_url, None))
            print(render(rows[-1:]), flush=True)
            rows.append(_run("archive", compare_symbols, JANUARY_2024, rest.base_url, archive))
            print(render(rows[-1:]), flush=True)
            rows.append(_run("archive, scale", scale_symbols, scale_window, rest.base_url, archive))
            print(render(rows[-1:]), flush=True)
            rows.append(
                _run(
                    "archive, scale, batch_rows 16,000",
                    scale_symbols,
                    scale_window,
                    rest.base_url,
                    archive,
                    SMALL_GROUP,
                )
            )
    print("\n" + render(rows))
    by_rest, by_archive = rows[0], rows[1]
    speed = (by_archive.candles / by_archive.wall_s) / (by_rest.candles / by_rest.wall_s)
    cpu = (by_archive.cpu_s / by_archive.candles) / (by_rest.cpu_s / by_rest.candles)
    print(f"\nsame range, archive ÷ REST: candles/s {speed:.1f}x, CPU per candle {cpu:.2f}x")
    large, small = rows[2], rows[3]
    print(
        f"scale, group commit 262,144 ÷ 16,000: candles/s "
        f"{(large.candles / large.wall_s) / (small.candles / small.wall_s):.2f}x, CPU per candle "
        f"{(large.cpu_s / large.candles) / (small.cpu_s / small.candles):.2f}x"
    )
