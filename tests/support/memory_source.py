"""An in-memory exchange source on a virtual clock, serving the fake exchange's candles.

For scheduling tests that must be exact and instant; the HTTP fake covers the wire.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from fake_exchange import SymbolSpec, expected_candles, provisional_candle

from tda_collector.errors import TransientFault
from tda_collector.exchange.source import Capabilities, MarketInfo


class MemorySource:
    id = "binance"

    def __init__(
        self,
        specs: list[SymbolSpec],
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        latency_s: float = 0.0,
        page_size: int = 1000,
        *,
        newest_first: bool = False,
        answer_cap: int | None = None,
        corrupt: frozenset[int] = frozenset(),
        publication_lag_ms: int = 0,
    ) -> None:
        """`newest_first`: a window holding more than a page is answered from its newest end
        (OKX, Coinbase); `answer_cap`: the exchange answers at most this many candles whatever
        `limit` asks; `corrupt`: open times whose candles come back invalid (high < low);
        `publication_lag_ms`: candles that closed less than this long ago are not served yet
        (nor is the one in progress)."""
        self.specs = {s.symbol: s for s in specs}
        self._clock = clock
        self._sleep = sleep
        self.latency_s = latency_s
        self.capabilities = Capabilities(max_page_size=page_size)
        self.newest_first = newest_first
        self.answer_cap = answer_cap
        self.corrupt = corrupt
        self.publication_lag_ms = publication_lag_ms
        self.down = False
        self.calls: list[tuple[float, str, str, int, int]] = []
        self.in_flight: Counter[tuple[str, str]] = Counter()
        self.max_in_flight_per_job = 0

    default_requests_per_second = 1000.0
    timeframes: ClassVar[set[str]] = {"1m", "5m", "1h"}

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def open(self) -> None:
        return None

    def markets(self) -> list[MarketInfo]:
        return [MarketInfo(s, s.split("/")[1], "spot", True) for s in self.specs]

    async def quote_volumes(self, symbols: list[str]) -> dict[str, float]:
        return {}

    async def fetch_ohlcv(
        self, symbol: str, timeframe: str, since_ms: int, until_ms: int, limit: int
    ) -> list[list[Any]]:
        job = (symbol, timeframe)
        self.in_flight[job] += 1
        self.max_in_flight_per_job = max(self.max_in_flight_per_job, self.in_flight[job])
        self.calls.append((self._clock(), symbol, timeframe, since_ms, until_ms))
        try:
            if self.latency_s:
                await self._sleep(self.latency_s)
            if self.down:
                raise TransientFault("exchange unreachable")
            now = self.now_ms()
            spec = self.specs[symbol]
            origin = self.capabilities.week_origin_ms
            candles = expected_candles(
                spec, timeframe, since_ms, until_ms + 1, now, week_origin_ms=origin
            )
            grid = self.capabilities.grid(timeframe)
            published = now - self.publication_lag_ms
            rows = [list(c) for c in candles if grid.next_open(c[0]) <= published]
            open_ms = grid.floor(now)  # the candle in progress
            in_gap = any(a <= open_ms < b for a, b in spec.gaps) or self.publication_lag_ms > 0
            if since_ms <= open_ms <= until_ms and open_ms >= spec.listed_at_ms and not in_gap:
                rows.append(list(provisional_candle(symbol, timeframe, open_ms, now)))
            for row in rows:
                if row[0] in self.corrupt:
                    row[2], row[3] = row[3] - 1, row[2] + 1  # high below low
            page = min(limit, self.answer_cap or limit)
            return rows[-page:] if self.newest_first else rows[:page]
        finally:
            self.in_flight[job] -= 1

    def watch_used_weight(self, header: str, listener: Callable[[int, int], None]) -> None:
        self.used_weight_listener = listener

    async def close(self) -> None:
        return None
