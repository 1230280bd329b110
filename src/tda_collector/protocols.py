"""The seams: what the collector needs from an exchange and from a store.

Everything above these (pagination, live scheduling, progress) is written against them, so a
new exchange library or store plugs in without touching the rest, and tests can put fakes here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .exchange import Capabilities, MarketInfo
from .models import CandleBatch, JobKey, RawCandles


class CandleSource(Protocol):
    id: str
    capabilities: Capabilities

    @property
    def default_requests_per_second(self) -> float: ...

    @property
    def timeframes(self) -> set[str]: ...

    def now_ms(self) -> int: ...

    async def open(self) -> None: ...

    def markets(self) -> list[MarketInfo]: ...

    async def quote_volumes(self, symbols: list[str]) -> dict[str, float]: ...

    async def fetch_ohlcv(
        self, symbol: str, timeframe: str, since_ms: int, until_ms: int, limit: int
    ) -> RawCandles: ...

    def watch_used_weight(self, header: str, listener: Callable[[int, int], None]) -> None:
        """Call `listener(used_weight, sent_ms)` for every answer carrying `header`."""

    async def close(self) -> None: ...


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
