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
from tda_collector.timeframes import closed_before, timeframe_ms


class MemorySource:
    id = "binance"

    def __init__(
        self,
        specs: list[SymbolSpec],
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        latency_s: float = 0.0,
        page_size: int = 1000,
    ) -> None:
        self.specs = {s.symbol: s for s in specs}
        self._clock = clock
        self._sleep = sleep
        self.latency_s = latency_s
        self.capabilities = Capabilities(max_page_size=page_size)
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
            tf_ms = timeframe_ms(timeframe)
            spec = self.specs[symbol]
            rows = [list(c) for c in expected_candles(spec, timeframe, since_ms, until_ms + 1, now)]
            open_ms = closed_before(now, tf_ms)
            if since_ms <= open_ms <= until_ms and open_ms >= spec.listed_at_ms:
                rows.append(list(provisional_candle(symbol, timeframe, open_ms, now)))
            return rows[:limit]
        finally:
            self.in_flight[job] -= 1

    def watch_used_weight(self, header: str, listener: Callable[[int, int], None]) -> None:
        self.used_weight_listener = listener

    async def close(self) -> None:
        return None
