"""What a read of stored candles asks for, and the shape every store answers in.

A read streams one series' rows for `[start_ms, end_ms)`, oldest first, as Arrow tables of at
most `READ_CHUNK_ROWS` rows each, so that however long the range, a reader holds one chunk at a
time. Every stored column is answered, its timestamps in UTC (`utc_timestamps`). A read yields
at least one table: with nothing stored in the range, an empty one that still names the columns.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc

from ..models import JobKey
from ..timeframes import timeframe_ms

# Rows per chunk of a read: ~20 columns of 8 bytes make a chunk ~0.7 MB. DuckDB reads a chunk's
# window within a few blocks of its buffer pool (with 16,384 a read took ~20 MB more of it);
# a year of 1m is 129 chunks (`python -m bench read` served it as Parquet in 1.3 s).
READ_CHUNK_ROWS = 4_096


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
# The open time (epoch ms) of the query's first stored row in [start_ms, end_ms), or None.
FirstStored = Callable[[int, int], Awaitable[int | None]]


async def read_by_windows(
    query: CandleQuery, fetch: ChunkFetch, first_stored: FirstStored
) -> AsyncGenerator[pa.Table, None]:
    """The query's rows, one bounded chunk at a time. Each chunk is asked for a time window
    that holds `READ_CHUNK_ROWS` candles of the timeframe at most (a store scans only that
    window, and sorts no more than a chunk), starting at a stored row: a full chunk continues
    right after its last row; after a short one (a hole, or the end of the stored rows) a
    `first_stored` probe, which holds nothing in memory, finds where the rows go on."""
    window_ms = READ_CHUNK_ROWS * timeframe_ms(query.key.timeframe)
    remaining = query.limit  # None: no limit
    cursor: int | None = query.start_ms
    probe, yielded = True, False
    while cursor is not None and cursor < query.end_ms and remaining != 0:
        if probe:
            cursor = await first_stored(cursor, query.end_ms)
            if cursor is None:
                break
        window_end = min(query.end_ms, cursor + window_ms)
        want = READ_CHUNK_ROWS if remaining is None else min(READ_CHUNK_ROWS, remaining)
        chunk = await fetch(cursor, window_end, want)
        if chunk.num_rows:
            yielded = True
            yield chunk
        if remaining is not None:
            remaining -= chunk.num_rows
        probe = chunk.num_rows < want  # a full chunk may have left rows in its window
        cursor = window_end if probe else _last_ms(chunk) + 1
    if not yielded:  # nothing stored in the range: the columns still tell what would be
        yield await fetch(query.start_ms, min(query.end_ms, query.start_ms + window_ms), 1)
