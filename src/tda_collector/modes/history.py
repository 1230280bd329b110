"""History mode's run: every job of every exchange backfilled over one window, then a summary.

The run registers its jobs (carrying over what an earlier run of the same window left), gives
each exchange a bounded pool of workers (`history_pool`) that page through each job's gaps
(`backfill.HistoryBackfill`), and ends with one `history_complete` event and the exit code:
0 when every job completed (cancelled ones do not count against it), 1 when any failed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from ..errors import EXIT_JOBS_FAILED, EXIT_OK
from ..exchange.runtime import ExchangeRuntime
from ..jobs.control import finish_history_run, register_history_jobs
from ..jobs.leases import LeaseKeeper, run_id_of
from ..jobs.model import CANCELLED, FAILED
from ..jobs.registry import JobRegistry
from ..jobs.state import StateStore
from ..models import JobKey
from ..observability.events import EventLog
from ..observability.metrics import Metrics
from ..retry import RetryPolicy
from ..store import CandleStore
from .archive_backfill import ArchiveBackfill
from .backfill import HistoryBackfill
from .durable_writer import DurableWriter
from .history_pool import ExchangeHistory, JobResult
from .indicator_stage import IndicatorStage
from .leased_history import LeasedHistory, LeaseSettings


@dataclass(frozen=True)
class HistorySettings:
    """History mode's part of the configuration (the app builds it once)."""

    page_limit: int  # candles per request, before the exchange's own maximum clamps it
    concurrency: int  # jobs in flight per exchange
    failure_limit: int  # more failed jobs than this stop the exchange's remaining jobs
    chunk_pages: int = 10  # with shared state: pages of a job per lease claim


def _summarise(
    events: EventLog,
    results: list[JobResult],
    runtimes: list[ExchangeRuntime],
    started: float,
    archives: list[ArchiveBackfill],
) -> int:
    duration = time.monotonic() - started
    failed = [r for r in results if r.status == FAILED]
    cancelled = sum(r.status == CANCELLED for r in results)
    for r in failed:
        events.error(
            "job_failed",
            f"{r.key} failed: {r.error}",
            exchange=r.key.exchange,
            symbol=r.key.symbol,
            timeframe=r.key.timeframe,
            error=r.error,
        )
    rows = sum(r.rows for r in results)
    requests = sum(rt.fetcher.requests for rt in runtimes)
    rejected = sum(sum(r.rejected.values()) for r in results)
    log = events.error if failed else events.info
    log(
        "history_complete",
        f"{len(results) - len(failed) - cancelled}/{len(results)} jobs complete, "
        f"{rows} candles stored"
        + (f"; {cancelled} cancelled" if cancelled else "")
        + (f"; failed: {', '.join(str(r.key) for r in failed)}" if failed else ""),
        jobs=len(results),
        completed=len(results) - len(failed) - cancelled,
        failed=len(failed),
        cancelled=cancelled or None,
        failed_jobs=[str(r.key) for r in failed] or None,
        rows=rows,
        rejected=rejected,
        requests=requests,
        archive_files=sum(a.files for a in archives) if archives else None,
        archive_bytes=sum(a.bytes for a in archives) if archives else None,
        duration_ms=round(duration * 1000),
        candles_per_s=round(rows / duration, 1) if duration > 0 else None,
        requests_per_s=round(requests / duration, 2) if duration > 0 else None,
    )
    return EXIT_JOBS_FAILED if failed else EXIT_OK


async def _discard_orphan_ledgers(
    store: CandleStore, state: StateStore, keys: list[JobKey], events: EventLog
) -> None:
    """A ledger whose store has lost the rows it recorded (file deleted, new dataset) would
    skip data forever; forget it so the range is fetched again. A series whose saved jobs
    stored no rows is left alone: its ledger holds proven holes (a range before a listing,
    a maintenance gap), and forgetting them would ask for them again on every run.

    The state is read before the store: the ledger moves only after its rows are durable, so
    the store then shows every row the ledger read had recorded, even while other instances
    are storing pages (the other order took a page stored between the two reads for lost)."""
    stored_rows: dict[JobKey, int] = {}
    for mode in ("history", "live"):
        for record in await state.load_jobs(mode):
            stored_rows[record.key] = stored_rows.get(record.key, 0) + record.rows
    covered = [k for k in keys if stored_rows.get(k, 0) > 0 and await state.coverage(k)]
    newest = await store.newest(covered, closed_only=False) if covered else {}
    for key in covered:
        if key not in newest:
            events.warning(
                "state_reset",
                f"{key}: the ledger covers ranges but the store has no rows; refetching",
                exchange=key.exchange,
                symbol=key.symbol,
                timeframe=key.timeframe,
            )
            await state.forget(key)


async def run_history(
    settings: HistorySettings,
    window: tuple[int, int],
    events: EventLog,
    runtimes: list[ExchangeRuntime],
    store: CandleStore,
    state: StateStore,
    metrics: Metrics,
    policy: RetryPolicy,
    indicators: IndicatorStage | None = None,
    registry: JobRegistry | None = None,
    keeper: LeaseKeeper | None = None,
) -> int:
    """Backfill `window` ([start, end) in epoch ms) for every job of `runtimes`, then report
    the run (`history_complete`); returns the process's exit code. With `keeper` (shared
    state), the jobs are claimed under leases with the other instances of the same window."""
    started = time.monotonic()
    keys = [k for rt in runtimes for k in rt.keys]
    await _discard_orphan_ledgers(store, state, keys, events)
    registry = registry or JobRegistry("history", state, metrics, events)
    exchanges = [(rt.config.id, rt.keys, rt.source.now_ms()) for rt in runtimes]
    origins = {rt.config.id: rt.source.capabilities.week_origin_ms for rt in runtimes}
    jobs = await register_history_jobs(registry, state, exchanges, *window, origins)
    per_exchange = []
    archives: list[ArchiveBackfill] = []
    for rt in runtimes:
        exchange_events = events.bind(exchange=rt.config.id)
        writer = DurableWriter(
            store, policy, exchange_events, metrics=metrics, indicators=indicators
        )
        archive = None
        if rt.archive is not None:
            archive = ArchiveBackfill(
                rt.archive,
                writer,
                state,
                registry,
                exchange_events,
                metrics,
                rt.source.capabilities,
                rt.source.now_ms,
            )
            archives.append(archive)
        # Leased: one page write in flight per job, so a dead instance costs at most one page
        # per job, fetched again by whoever takes the job over.
        backfill = HistoryBackfill(
            rt.fetcher,
            writer,
            state,
            exchange_events,
            settings.page_limit,
            metrics,
            registry,
            archive,
            pipeline_pages=1 if keeper is not None else None,
        )
        mine = [job for job in jobs if job.key.exchange == rt.config.id]
        pool: ExchangeHistory | LeasedHistory
        if keeper is not None:
            leases = LeaseSettings(
                run_id_of("history", *window), settings.chunk_pages, settings.failure_limit
            )
            pool = LeasedHistory(
                backfill,
                registry,
                mine,
                settings.concurrency,
                keeper,
                leases,
                exchange_events,
                indicators,
            )
        else:
            pool = ExchangeHistory(
                backfill,
                registry,
                mine,
                settings.concurrency,
                settings.failure_limit,
                exchange_events,
            )
        per_exchange.append(pool.run())
    results = [r for group in await asyncio.gather(*per_exchange) for r in group]
    if indicators is not None:
        await indicators.repair(DurableWriter(store, policy, events).write_as_is)
    await finish_history_run(registry, state)
    return _summarise(events, results, runtimes, started, archives)
