"""A store fake with fault knobs (after dlt's dummy destination), on the CandleStore contract.

Knobs, as constructor keywords and as attributes to change mid-test:
- `fail_next_writes`: that many writes raise TransientStoreError, then writes succeed again;
- `fail_permanently`: every write raises PermanentStoreError until it is set back to False;
- `write_delay_s`: each write first waits this long on `sleep` (inject a virtual clock's);
- `fail_reads_after`: a read yields that many chunks, then raises TransientStoreError (None:
  reads succeed);
- `fail_series_reads`: that many `series` calls raise TransientStoreError.
A failed write stores nothing and does not count in `writes`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from tda_collector.errors import PermanentStoreError, TransientStoreError
from tda_collector.models import CandleBatch, Column, JobKey
from tda_collector.store import reads
from tda_collector.store.reads import CandleQuery


class MemoryStore:
    """Rows by (key, open time), the newest write winning. `extra_columns=None` takes any
    extra column; a tuple makes it refuse the others, as the real stores do."""

    name = "memory"
    pipeline_pages = 1

    def __init__(
        self,
        extra_columns: tuple[Column, ...] | None = None,
        *,
        fail_next_writes: int = 0,
        fail_permanently: bool = False,
        write_delay_s: float = 0.0,
        fail_reads_after: int | None = None,
        fail_series_reads: int = 0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rows: dict[tuple[JobKey, int], tuple] = {}
        self.extra: dict[tuple[JobKey, int], dict[str, float]] = {}
        self.columns = None if extra_columns is None else {c.name for c in extra_columns}
        self.fail_next_writes = fail_next_writes
        self.fail_permanently = fail_permanently
        self.write_delay_s = write_delay_s
        self.fail_reads_after = fail_reads_after
        self.fail_series_reads = fail_series_reads
        self.sleep = sleep
        self.writes = 0

    async def ensure(self) -> None:
        return None

    async def write(self, batch: CandleBatch) -> int:
        if not len(batch):
            return 0
        if self.write_delay_s:
            await self.sleep(self.write_delay_s)
        unknown = sorted(set(batch.extra) - self.columns) if self.columns is not None else []
        if unknown:
            raise PermanentStoreError(f"columns {unknown} are not in the store's schema")
        if self.fail_permanently:
            raise PermanentStoreError("memory store refused the write (injected)")
        if self.fail_next_writes:
            self.fail_next_writes -= 1
            raise TransientStoreError("disk full (injected)")
        self.writes += 1
        for i, ts in enumerate(batch.timestamps.tolist()):
            self.rows[(batch.key, ts)] = (
                ts,
                float(batch.open[i]),
                float(batch.high[i]),
                float(batch.low[i]),
                float(batch.close[i]),
                float(batch.volume[i]),
                bool(batch.closed[i]),
            )
            self.extra[(batch.key, ts)] = {n: float(v[i]) for n, v in batch.extra.items()}
        return len(batch)

    def series_rows(self, key: JobKey) -> list[tuple]:
        return [
            row for (k, _), row in sorted(self.rows.items(), key=lambda kv: kv[0][1]) if k == key
        ]

    async def newest(self, keys: list[JobKey], closed_only: bool = True) -> dict[JobKey, int]:
        newest: dict[JobKey, int] = {}
        for (key, ts), row in self.rows.items():
            if key in keys and (row[6] or not closed_only):
                newest[key] = max(newest.get(key, ts), ts)
        return newest

    async def series(self, key: JobKey) -> CandleBatch:
        """Closed rows, with the extra columns (the configured ones, else every one the
        series was written with), NaN where a row has none."""
        if self.fail_series_reads:
            self.fail_series_reads -= 1
            raise TransientStoreError("the disk went away (injected)")
        closed = [r for r in self.series_rows(key) if r[6]]
        columns = np.array([r[:6] for r in closed], dtype=float).reshape(-1, 6)
        stored = [self.extra[(key, r[0])] for r in closed]
        names = self.columns if self.columns is not None else {n for e in stored for n in e}
        return CandleBatch(
            key=key,
            timestamps=columns[:, 0].astype(np.int64),
            open=columns[:, 1],
            high=columns[:, 2],
            low=columns[:, 3],
            close=columns[:, 4],
            volume=columns[:, 5],
            closed=np.ones(len(closed), dtype=bool),
            extra={
                name: np.array([e.get(name, np.nan) for e in stored], dtype=float)
                for name in sorted(names)
            },
        )

    def _table(self, query: CandleQuery) -> pa.Table:
        stamps = [
            ts
            for (key, ts), row in sorted(self.rows.items(), key=lambda kv: kv[0][1])
            if key == query.key
            and query.start_ms <= ts < query.end_ms
            and (row[6] or not query.closed_only)
        ][: query.limit]
        rows = [self.rows[(query.key, ts)] for ts in stamps]
        names = sorted({n for ts in stamps for n in self.extra[(query.key, ts)]})
        columns = {
            "timestamp": pa.array(stamps, pa.timestamp("ms", tz="UTC")),
            "exchange": [query.key.exchange] * len(rows),
            "symbol": [query.key.symbol] * len(rows),
            "timeframe": [query.key.timeframe] * len(rows),
            **{
                name: pa.array([r[i] for r in rows], pa.float64())
                for i, name in enumerate(("open", "high", "low", "close", "volume"), start=1)
            },
            "ingested_at": pa.array([datetime.now(UTC)] * len(rows), pa.timestamp("us", "UTC")),
            "is_closed": pa.array([r[6] for r in rows], pa.bool_()),
            **{
                name: pa.array(
                    [self.extra[(query.key, ts)].get(name) for ts in stamps], pa.float64()
                )
                for name in names
            },
        }
        return pa.table(columns)

    async def read(self, query: CandleQuery) -> AsyncIterator[pa.Table]:
        table = self._table(query)
        step = reads.READ_CHUNK_ROWS
        for number, offset in enumerate(range(0, max(table.num_rows, 1), step)):
            if self.fail_reads_after is not None and number >= self.fail_reads_after:
                raise TransientStoreError("the disk went away (injected)")
            yield table.slice(offset, step)

    async def close(self) -> None:
        return None
