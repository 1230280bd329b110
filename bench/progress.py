"""`GET /progress` with 2,500 jobs: how long it takes while the jobs keep moving.

A registry holds N history jobs (1m, one year each) on one exchange; a background task records
pages on them as a busy backfill would (default 2,000 pages/s) and the rates are sampled every
second, as in a run. The real admin server answers on loopback; a client on the same event loop
asks `/progress` over a kept-alive connection. Round trips include that client's own work, so
they are an upper bound; the handler time is the summary built and serialised in process.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import aiohttp

from tda_collector.admin.jobs_api import jobs_routes
from tda_collector.admin.server import AdminServer
from tda_collector.jobs.model import Job, JobRecord
from tda_collector.jobs.progress import Progress
from tda_collector.jobs.registry import JobRegistry
from tda_collector.models import JobKey
from tda_collector.observability.metrics import Metrics

MIN_MS = 60_000
YEAR_MS = 365 * 1440 * MIN_MS
START_MS = 1_672_531_200_000  # 2023-01-01


def build(jobs: int) -> tuple[JobRegistry, Progress]:
    registry = JobRegistry("history", metrics=Metrics())
    for i in range(jobs):
        record = JobRecord.of(
            JobKey("binance", f"SYM{i:04d}/USDT", "1m"),
            "history",
            start_ms=START_MS,
            end_ms=START_MS + YEAR_MS,
            cursor_ms=START_MS,
        )
        registry.add(Job(record))
    registry.track_budget("binance", 20.0, 18.0, lambda: 0)
    return registry, Progress(registry)


async def churn(registry: JobRegistry, progress: Progress, pages_per_s: float) -> None:
    """Pages stored round-robin over the jobs, and one rate sample a second."""
    jobs = list(registry.jobs.values())
    for job in jobs[:64]:
        registry.apply(job, "start")
    i, last_tick = 0, time.monotonic()
    while True:
        for _ in range(max(1, int(pages_per_s / 100))):
            job = jobs[i % 64]
            since = job.record.cursor_ms or START_MS
            registry.record_page(job, [(since, since + 1000 * MIN_MS)], rows=1000)
            i += 1
        if time.monotonic() - last_tick >= 1:
            last_tick = time.monotonic()
            progress.tick()
        await asyncio.sleep(0.01)


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p = statistics.quantiles(ordered, n=100)
    return f"p50 {p[49] * 1000:.3f} ms, p99 {p[98] * 1000:.3f} ms, max {ordered[-1] * 1000:.3f} ms"


async def measure(jobs: int, requests: int, pages_per_s: float) -> None:
    registry, progress = build(jobs)
    server = AdminServer(
        "127.0.0.1",
        0,
        Metrics(),
        _ready,
        jobs_routes(registry, progress, "127.0.0.1", None, "TDA_ADMIN_TOKEN"),
    )
    await server.start()
    load = asyncio.create_task(churn(registry, progress, pages_per_s))
    try:
        await asyncio.sleep(2.5)  # a few rate samples first, as in a run under way
        handler = []
        for _ in range(requests):
            started = time.perf_counter()
            json.dumps(progress.summary().to_json())
            handler.append(time.perf_counter() - started)
            await asyncio.sleep(0)  # let the pages go on meanwhile
        round_trips = []
        async with aiohttp.ClientSession() as session:
            for _ in range(requests):
                started = time.perf_counter()
                async with session.get(server.url + "/progress") as response:
                    body = await response.json()
                round_trips.append(time.perf_counter() - started)
            started = time.perf_counter()
            async with session.get(server.url + "/jobs") as response:
                listed = await response.json()
            list_s = time.perf_counter() - started
    finally:
        load.cancel()
        await server.stop()
    assert body["jobs"]["total"] == jobs and listed["total"] == jobs
    print(
        f"GET /progress with {jobs:,} jobs, {requests:,} requests, "
        f"{pages_per_s:,.0f} pages/s recorded meanwhile"
    )
    print(f"  handler (summary + JSON): {percentiles(handler)}")
    print(f"  HTTP round trip:          {percentiles(round_trips)}")
    print(
        f"  candles counted: {body['candles']:,}; covered {body['covered']:.4%}; "
        f"ETA {body['eta_s']} s"
    )
    print(f"GET /jobs (all {jobs:,}): {list_s * 1000:.1f} ms, for comparison")


async def _ready() -> None:
    return None


def run(jobs: int = 2500, requests: int = 2000, pages_per_s: float = 2000.0) -> None:
    asyncio.run(measure(jobs, requests, pages_per_s))
