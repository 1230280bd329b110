"""`python -m bench [throughput|live|progress|floors|memory|bigquery_write|read|priority|
archive|instances]`:
measurements as tables, with ratios.

throughput (default): history backfill against the naive baseline at 10/100/1000 symbols.
live: close-to-stored latency for many symbols at one budget, against its bound.
progress: `GET /progress` latency with 2,500 jobs (--jobs) while pages are recorded.
floors: what start-up, the request path and DuckDB's writes cost alone, per candle.
memory: peak RSS of DuckDB backfills, 7,200 against 2.6 M rows and 10 against 1,000 symbols.
bigquery_write: the BigQuery store's Storage Write API paths against insertAll and load jobs.
read: GET /ohlcv of a year of 1m as JSON and Parquet; one-day read p99 beside a backfill.
priority: a live request's wait for its slot while a backfill saturates the budget, background
slots against call order.
archive: deep history from the public archive against REST on one range, and a scale point.
instances: one budget shared by 1, 2, 4 processes in Postgres, against a group each.
"""

from __future__ import annotations

import argparse

from . import archive, bigquery_write, floors, instances, live_latency, memory, priority, progress
from . import read as reads
from .throughput import render, run_baseline, run_collector


def throughput(args: argparse.Namespace) -> None:
    rows = []
    for scale in (int(s) for s in args.scales.split(",")):
        rows.append(run_collector(scale, args.budget, args.safety, args.latency_ms, args.requests))
        rows.append(
            run_baseline(scale, args.budget, args.safety, args.latency_ms, args.baseline_requests)
        )
        print(render(rows[-2:]), flush=True)
    collector = [r for r in rows if r.name == "collector"]
    baseline = [r for r in rows if r.name != "collector"]
    print("\n" + render(rows))
    rss = [r.rss_mib for r in collector]
    print(
        f"\ncollector peak RSS growth {collector[0].symbols} -> {collector[-1].symbols} symbols: "
        f"{(rss[-1] / rss[0] - 1) * 100:+.1f}%"
    )
    for c, b in zip(collector, baseline, strict=True):
        print(
            f"{c.symbols} symbols, collector ÷ baseline: candles/s "
            f"{(c.candles / c.seconds) / (b.candles / b.seconds):.1f}x, CPU per candle "
            f"{(c.cpu_s / c.candles) / (b.cpu_s / b.candles):.1f}x"
        )


def live(args: argparse.Namespace) -> None:
    print(live_latency.HEADER)
    print(
        live_latency.render(
            live_latency.run(args.symbols, args.budget, args.safety, args.latency_ms)
        )
    )


def progress_latency(args: argparse.Namespace) -> None:
    progress.run(args.jobs)


def cpu_floors(args: argparse.Namespace) -> None:
    floors.run()


def peak_memory(args: argparse.Namespace) -> None:
    settings = {"memory_limit": args.duckdb_memory_limit} if args.duckdb_memory_limit else None
    memory.main(args.small_rows, args.large_rows, args.symbol_rows, args.many_symbols, settings)


def bigquery_writes(args: argparse.Namespace) -> None:
    bigquery_write.main(args.live_series, args.live_writes, args.history_jobs, args.history_pages)


def read_api(args: argparse.Namespace) -> None:
    reads.run(args.read_symbols, args.budget, args.safety, args.latency_ms, args.reads)


def live_priority(args: argparse.Namespace) -> None:
    priority.run(args.budget, args.safety, args.workers, args.seconds, 1.0)


def archive_history(args: argparse.Namespace) -> None:
    archive.run(
        args.compare_symbols, args.scale_symbols, args.scale_days, args.budget, args.latency_ms
    )


def shared_budget(args: argparse.Namespace) -> None:
    instances.run(args.budget, args.safety, args.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "what",
        nargs="?",
        default="throughput",
        choices=[
            "throughput",
            "live",
            "progress",
            "floors",
            "memory",
            "bigquery_write",
            "read",
            "priority",
            "archive",
            "instances",
        ],
    )
    parser.add_argument("--budget", type=int, default=50, help="exchange budget B, requests/s")
    parser.add_argument("--safety", type=float, default=0.9)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--scales", default="10,100,1000", help="throughput: symbol counts")
    parser.add_argument("--requests", type=int, default=1000, help="throughput: per run")
    parser.add_argument("--baseline-requests", type=int, default=150)
    parser.add_argument("--symbols", type=int, default=500, help="live: symbols")
    parser.add_argument("--jobs", type=int, default=2500, help="progress: jobs")
    parser.add_argument("--small-rows", type=int, default=7_200, help="memory: 10 symbols")
    parser.add_argument("--large-rows", type=int, default=2_628_000, help="memory: 10 symbols")
    parser.add_argument("--symbol-rows", type=int, default=720_000, help="memory: either count")
    parser.add_argument("--many-symbols", type=int, default=1_000, help="memory")
    parser.add_argument("--duckdb-memory-limit", help="memory: storage.duckdb.memory_limit")
    parser.add_argument("--live-series", type=int, default=50, help="bigquery_write")
    parser.add_argument("--live-writes", type=int, default=20, help="bigquery_write: per series")
    parser.add_argument("--history-jobs", type=int, default=8, help="bigquery_write")
    parser.add_argument("--history-pages", type=int, default=10, help="bigquery_write: per job")
    parser.add_argument("--read-symbols", type=int, default=20, help="read: series backfilled")
    parser.add_argument("--reads", type=int, default=200, help="read: one-day reads per phase")
    parser.add_argument("--workers", type=int, default=16, help="priority: backfill tasks")
    parser.add_argument("--seconds", type=float, default=15.0, help="priority, instances: per run")
    parser.add_argument("--compare-symbols", type=int, default=10, help="archive: vs REST")
    parser.add_argument("--scale-symbols", type=int, default=100, help="archive: scale point")
    parser.add_argument("--scale-days", type=int, default=92, help="archive: 1m days, scale")
    args = parser.parse_args()
    {
        "throughput": throughput,
        "live": live,
        "progress": progress_latency,
        "floors": cpu_floors,
        "memory": peak_memory,
        "bigquery_write": bigquery_writes,
        "read": read_api,
        "priority": live_priority,
        "archive": archive_history,
        "instances": shared_budget,
    }[args.what](args)


if __name__ == "__main__":
    main()
