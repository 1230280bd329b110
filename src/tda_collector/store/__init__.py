"""The store seam: a table of candles, and the stores that implement it (DuckDB, BigQuery)."""

from __future__ import annotations

from typing import Protocol

from ..models import CandleBatch, JobKey


class CandleStore(Protocol):
    """A table of candles keyed by (exchange, symbol, timeframe, timestamp).

    `write` returns only once the rows are durable (committed, or loaded); callers move their
    cursor after it returns and never before. Writing a key again replaces it: the newest
    version wins in what users query.
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
        """Stored closed candles of one series, oldest first, as users query them."""
        ...

    async def close(self) -> None: ...
