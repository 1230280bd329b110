"""The store seam: a table of candles, and the stores that implement it (DuckDB, BigQuery)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from typing import Literal, Protocol

import pyarrow as pa

from ..config import StorageConfig
from ..models import CandleBatch, Column, JobKey
from ..observability.events import EventLog
from .duckdb_store import DuckDBStore
from .reads import CandleQuery
from .write_streams import WriteStreamState

__all__ = ["CandleQuery", "CandleStore", "build_store"]


class CandleStore(Protocol):
    """A table of candles keyed by (exchange, symbol, timeframe, timestamp).

    `write` returns only once the rows are durable (committed, or loaded); callers move their
    cursor after it returns and never before. Writing a key again replaces it: the newest
    version wins in what users query.

    Errors (after dlt's transient/terminal split): each store sorts its client's errors in one
    place. A call that may succeed if repeated raises `TransientStoreError`; one that cannot
    (an unknown or mistyped column, rows rejected for good, no permission) raises
    `PermanentStoreError`. A batch with a column the store does not know is refused that way
    before any of it is stored. `ensure` raises one of them, with a one-line message, when
    the store cannot be opened. Anything else a store raises is a bug it could not sort.
    """

    name: str
    # How many pages of one history job may be waiting for their write while it fetches the
    # next; a crash refetches up to this many per job. 1 for DuckDB (issue 2's bound), 16 for
    # BigQuery load jobs, which take seconds.
    pipeline_pages: int

    async def ensure(self) -> None: ...

    async def write(self, batch: CandleBatch) -> int: ...

    async def newest(self, keys: list[JobKey], closed_only: bool = True) -> dict[JobKey, int]: ...

    async def series(self, key: JobKey) -> CandleBatch:
        """Stored closed candles of one series, oldest first, as users query them; the
        store's extra columns (indicators) in `extra`, NULL as NaN."""
        ...

    def read(self, query: CandleQuery) -> AsyncGenerator[pa.Table, None]:
        """The query's rows as users query them (one per key, the newest version), every
        stored column, timestamps in UTC, oldest first, in chunks of at most
        `reads.READ_CHUNK_ROWS` rows; runs beside the writers without stalling them. A chunk
        that cannot be read raises TransientStoreError or PermanentStoreError."""
        ...

    async def close(self) -> None: ...


def build_store(
    config: StorageConfig,
    events: EventLog,
    mode: Literal["history", "live"],
    extra_columns: tuple[Column, ...] = (),
    environ: Mapping[str, str] | None = None,
    state: WriteStreamState | None = None,
    live_owner: str = "live",
) -> CandleStore:
    """DuckDB (writes grouped into commits), or BigQuery through the Storage Write API: a
    committed stream for live mode (its offsets kept in `state`), pending streams committed
    in batches for history; or, with `write_path: legacy`, streaming inserts and load jobs.
    `live_owner` keys the committed stream's position in `state` (one stream per owner)."""
    if config.backend == "duckdb":
        duck = config.duckdb
        return DuckDBStore(
            duck.path,
            events,
            extra_columns,
            batch_rows=duck.batch_rows,
            # Live: a candle's latency is what counts, and its writes are a row or two; a
            # commit then carries the writes made in one turn of the event loop, with no wait.
            batch_seconds=duck.batch_seconds if mode == "history" else 0.0,
            memory_limit=duck.memory_limit,
            threads=duck.threads,
        )
    from .bigquery_store import BigQueryStore, WriteMode  # Google's libraries: ~0.5 s to import

    bq = config.bigquery
    history = mode == "history"
    if bq.write_path == "legacy":
        write_mode: WriteMode = "load" if history else "stream"
    else:
        write_mode = "pending" if history else "committed"
    return BigQueryStore(
        bq,
        events,
        mode=write_mode,
        state=state,
        owner=live_owner,
        extra_columns=extra_columns,
        environ=environ or {},
        partitioning=bq.partitioning,
        flush_rows=bq.load_batch_rows,
        flush_seconds=bq.load_batch_seconds,
    )
