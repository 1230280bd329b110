"""`python -m bench [throughput|live|progress|floors|memory|instances]`: measurements as tables.

throughput (default): history backfill against the naive baseline at 10/100/1000 symbols.
live: close-to-stored latency for many symbols at one budget, against its bound.
progress: `GET /progress` latency with 2,500 jobs (--jobs) while pages are recorded.
floors: what start-up, the request path and DuckDB's writes cost alone, per candle.
memory: peak RSS of DuckDB backfills, 7,200 against 2.6 M rows and 10 against 1,000 symbols.
instances: one budget shared by 1, 2, 4 processes in Postgres, against a group each.
"""

from __future__ import annotations

import argparse

from . import floors, instances, live_latency, memory, progress
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


def shared_budget(args: argparse.Namespace) -> None:
    instances.run(args.budget, args.safety, args.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "what",
        nargs="?",
        default="throughput",
        choices=["throughput", "live", "progress", "floors", "memory", "instances"],
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
    parser.add_argument("--seconds", type=float, default=5.0, help="instances: per run")
    args = parser.parse_args()
    {
        "throughput": throughput,
        "live": live,
        "progress": progress_latency,
        "floors": cpu_floors,
        "memory": peak_memory,
        "instances": shared_budget,
    }[args.what](args)


if __name__ == "__main__":
    main()
