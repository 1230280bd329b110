"""What a read of stored candles asks for, and the shape every store answers in.

A read streams one series' rows for `[start_ms, end_ms)`, oldest first, as Arrow tables of at
most `READ_CHUNK_ROWS` rows each, so that however long the range, a reader holds one chunk at a
time. Every stored column is answered, its timestamps in UTC (`utc_timestamps`). A read yields
at least one table: with nothing stored in the range, an empty one that still names the columns.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc

from ..models import JobKey
from ..timeframes import timeframe_ms

# Rows per chunk of a read: ~20 columns of 8 bytes make a chunk ~3 MB, small beside DuckDB's
# 32 MB buffer pool and a BigQuery result page, and large enough that a year of 1m is 33 chunks.
READ_CHUNK_ROWS = 16_384


@dataclass(frozen=True)
class CandleQuery:
    """Stored rows of `key` with open time in `[start_ms, end_ms)`, oldest first; without the
    candle in progress when `closed_only`; at most `limit` rows when it is set."""

    key: JobKey
    start_ms: int
    end_ms: int
    closed_only: bool = False
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.start_ms >= self.end_ms:
            raise ValueError("CandleQuery: start_ms must be before end_ms")
        if self.limit is not None and self.limit <= 0:
            raise ValueError("CandleQuery: limit must be positive")


def utc_datetime(ms: int) -> datetime:
    """An epoch-ms instant as an aware UTC datetime (a query parameter)."""
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


def utc_timestamps(table: pa.Table) -> pa.Table:
    """`table` with every timestamp column marked UTC (DuckDB answers naive ones)."""
    fields = [
        pa.field(f.name, pa.timestamp(f.type.unit, tz="UTC"), f.nullable)
        if pa.types.is_timestamp(f.type)
        else f
        for f in table.schema
    ]
    return table.cast(pa.schema(fields))


def _last_ms(chunk: pa.Table) -> int:
    """Open time (epoch ms) of a chunk's last row."""
    last = pc.cast(chunk.column("timestamp")[-1:], pa.timestamp("ms", tz="UTC"), safe=False)
    return int(last[0].value)


# Fetches stored rows of the query's series with open time in [start_ms, end_ms), oldest
# first, at most `limit` of them.
ChunkFetch = Callable[[int, int, int], Awaitable[pa.Table]]


async def read_by_windows(query: CandleQuery, fetch: ChunkFetch) -> AsyncIterator[pa.Table]:
    """The query's rows, one bounded chunk at a time: each chunk is asked for a time window
    that holds about `READ_CHUNK_ROWS` candles of the timeframe (a store scans only that
    window), and at most that many rows. A full chunk continues right after its last row; a
    short one means the window is sparse, and the next window is twice as long, so a range
    reaching far past the stored rows (or long before them) costs a few dozen windows."""
    base_ms = READ_CHUNK_ROWS * timeframe_ms(query.key.timeframe)
    step_ms = base_ms
    remaining = query.limit
    cursor = query.start_ms
    empty: pa.Table | None = None  # the last empty chunk, while nothing was yielded
    yielded = False
    while cursor < query.end_ms and (remaining is None or remaining > 0):
        window_end = min(query.end_ms, cursor + step_ms)
        want = READ_CHUNK_ROWS if remaining is None else min(READ_CHUNK_ROWS, remaining)
        chunk = await fetch(cursor, window_end, want)
        if chunk.num_rows:
            yielded = True
            yield chunk
        elif not yielded:
            empty = chunk
        if remaining is not None:
            remaining -= chunk.num_rows
        if chunk.num_rows == want:  # it may have left rows in its window
            cursor, step_ms = _last_ms(chunk) + 1, base_ms
        else:
            cursor, step_ms = window_end, step_ms * 2
    if not yielded and empty is not None:
        yield empty  # nothing at all was stored: the columns still tell what would be
