"""Fake Binance spot REST server for tests and benchmarks.

Real ccxt (``ccxt.async_support.binance``) talks HTTP to it when its public/private API
URLs point at ``<base_url>/api/v3``. Candles are a pure function of (symbol, timeframe,
open time), so tests can compare what a collector stored with :func:`expected_candles`.
The server follows an injectable clock, can enforce a Binance-like request budget
(429, then 418 bans) and injects seedable faults, so retry and backoff paths get exercised.

Run standalone for benchmarks: ``python tests/support/fake_exchange.py --port 0 --symbols 100``
prints the base URL, serves until SIGTERM, then prints the counters as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import signal
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache, lru_cache

import numpy as np
from aiohttp import web

TIMEFRAME_MS = {
    "1m": 60_000,
    "3m": 180_000,
    "5m": 300_000,
    "15m": 900_000,
    "30m": 1_800_000,
    "1h": 3_600_000,
    "2h": 7_200_000,
    "4h": 14_400_000,
    "6h": 21_600_000,
    "8h": 28_800_000,
    "12h": 43_200_000,
    "1d": 86_400_000,
    "3d": 259_200_000,  # Binance's 3d candles open on the epoch's grid
    "1w": 604_800_000,
}
# Calendar months: candles open at 00:00 UTC on the 1st of each month (Binance spot's `1M`).
MONTH_TIMEFRAMES = frozenset({"1M"})
TIMEFRAMES = (*TIMEFRAME_MS, *sorted(MONTH_TIMEFRAMES))  # every interval the klines endpoint serves
# Binance weeks open on Monday (the epoch was a Thursday); a fake with another week origin
# (Kraken, KuCoin: the epoch's Thursday, EPOCH_WEEK_ORIGIN_MS) passes ``week_origin_ms``.
MONDAY_WEEK_ORIGIN_MS = _WEEK_OFFSET_MS = 4 * 86_400_000
EPOCH_WEEK_ORIGIN_MS = 0
DEFAULT_KLINES_LIMIT = 500
MAX_KLINES_LIMIT = 1000
DEFAULT_LISTED_AT_MS = 1_672_531_200_000  # 2023-01-01T00:00:00Z
FAULT_KINDS = ("500", "502", "503", "stall", "truncated", "garbage")  # transient: retry them
INJECTABLE_KINDS = (*FAULT_KINDS, "429", "418", "400")  # '400' is permanent: do not retry
_REAL_PRICES = {"BTC": 60_000, "ETH": 3_000, "BNB": 550, "SOL": 150, "XRP": 0.5, "DOGE": 0.15}
REAL_SYMBOLS = tuple(f"{base}/USDT" for base in _REAL_PRICES)

_API_PREFIX = "/api/v3/"
_VOLUME_DECIMALS = 3
_BLOCK = 1000  # candles per cached text block


# --------------------------------------------------------------------------- symbols


@dataclass(frozen=True)
class SymbolSpec:
    """One spot market: when it was listed, maintenance gaps ``[a, b)`` and its 24h volume."""

    symbol: str
    listed_at_ms: int = DEFAULT_LISTED_AT_MS
    gaps: Sequence[tuple[int, int]] = ()
    quote_volume: float | None = None  # None: derived deterministically from the symbol
    status: str = "TRADING"

    def __post_init__(self) -> None:
        if self.symbol.count("/") != 1:
            raise ValueError(f"symbol must look like BASE/QUOTE: {self.symbol!r}")
        if any(a >= b for a, b in self.gaps):
            raise ValueError(f"gaps must be non-empty [start, end) intervals: {self.gaps!r}")
        object.__setattr__(self, "gaps", _merge_gaps(self.gaps))

    @property
    def id(self) -> str:
        """Binance market id, e.g. ``BTCUSDT``."""
        return self.symbol.replace("/", "")

    @property
    def volume_24h(self) -> float:
        if self.quote_volume is not None:
            return self.quote_volume
        return round(10 ** (5 + 4 * _hash64(self.symbol, "volume") / 2**64), 2)


def _merge_gaps(gaps: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(gaps):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return tuple(merged)


def make_symbols(
    count: int, *, real_names: bool = True, listed_at_ms: int = DEFAULT_LISTED_AT_MS
) -> list[SymbolSpec]:
    """``count`` specs: real-looking names first (if asked), then ``SYM0001/USDT``, ...

    The 24h quote volume strictly decreases along the list, so ranking by volume
    gives back the list order.
    """
    names = list(REAL_SYMBOLS[:count]) if real_names else []
    names += [f"SYM{i:04d}/USDT" for i in range(1, count - len(names) + 1)]
    return [
        SymbolSpec(name, listed_at_ms=listed_at_ms, quote_volume=1e9 / (rank + 1))
        for rank, name in enumerate(names)
    ]


# --------------------------------------------------------------------------- candles


def _hash64(*parts: str) -> int:
    """Stable 64-bit hash (Python's hash() is salted per process)."""
    digest = hashlib.blake2b("|".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@cache
def _price_params(symbol: str) -> tuple[int, int]:
    """(base price in ticks, price decimals): ~7 significant digits, 0.01 to 50000."""
    price = _REAL_PRICES.get(symbol.split("/")[0]) or 10 ** (
        -2 + 6.7 * _hash64(symbol, "price") / 2**64
    )
    decimals = min(8, 6 - math.floor(math.log10(price)))
    return round(price * 10**decimals), decimals


def _tf_ms(timeframe: str) -> int:
    """Length of a fixed-length timeframe (ValueError for months and unknown timeframes)."""
    try:
        return TIMEFRAME_MS[timeframe]
    except KeyError:
        raise ValueError(f"unsupported timeframe {timeframe!r}") from None


def _offset(timeframe: str, week_origin_ms: int = MONDAY_WEEK_ORIGIN_MS) -> int:
    """Where the fixed-length grid of ``timeframe`` starts: weeks on the week origin."""
    return week_origin_ms % TIMEFRAME_MS[timeframe] if timeframe.endswith("w") else 0


def _month_start(ms: int) -> int:
    day = datetime.fromtimestamp(ms // 1000, tz=UTC)
    return int(datetime(day.year, day.month, 1, tzinfo=UTC).timestamp()) * 1000


def _month_after(open_ms: int) -> int:
    day = datetime.fromtimestamp(open_ms // 1000, tz=UTC)
    year, month = divmod(day.year * 12 + day.month, 12)  # the next month, 0-based
    return int(datetime(year, month + 1, 1, tzinfo=UTC).timestamp()) * 1000


def _next_open(timeframe: str, open_ms: int) -> int:
    """Open time of the candle after the one opening at ``open_ms`` (its close time + 1)."""
    return _month_after(open_ms) if timeframe in MONTH_TIMEFRAMES else open_ms + _tf_ms(timeframe)


def _is_open_time(timeframe: str, t: int, week_origin_ms: int = MONDAY_WEEK_ORIGIN_MS) -> bool:
    if timeframe in MONTH_TIMEFRAMES:
        return _month_start(t) == t
    return (t - _offset(timeframe, week_origin_ms)) % _tf_ms(timeframe) == 0


def _block_start(timeframe: str, open_ms: int, week_origin_ms: int = MONDAY_WEEK_ORIGIN_MS) -> int:
    offset = _offset(timeframe, week_origin_ms)
    return open_ms - (open_ms - offset) % (TIMEFRAME_MS[timeframe] * _BLOCK)


def _block_times(timeframe: str, block_start: int) -> np.ndarray:
    tf_ms = TIMEFRAME_MS[timeframe]
    return np.arange(block_start, block_start + _BLOCK * tf_ms, tf_ms, dtype=np.int64)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit affects every output bit (wraps mod 2**64)."""
    z = (z ^ (z >> 30)) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> 27)) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> 31)


def _ticks(symbol: str, timeframe: str, times: np.ndarray) -> np.ndarray:
    """Final open, high, low, close, volume, trades in integer ticks: a (6, len(times)) array."""
    key = times.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(
        _hash64(symbol, timeframe)
    )
    a, b = _mix(key), _mix(~key)
    r1, r2, r3, r4 = (((a >> shift) & 0xFFFF).astype(np.int64) for shift in (0, 16, 32, 48))
    base = _price_params(symbol)[0]
    o = base + base * (r1 - 32768) // 327_680  # +-10% around the base price
    c = o + o * (r2 - 32768) // 1_638_400  # +-2% move
    h = np.maximum(o, c) + base * r3 // 6_553_600  # wicks up to 1%
    low = np.minimum(o, c) - base * r4 // 6_553_600
    volume = 1 + (b & 0xFFFFFF).astype(np.int64)
    trades = 1 + (b >> 32).astype(np.int64) % 5000
    return np.stack([o, h, low, c, volume, trades])


def _open_ticks(symbol: str, timeframe: str, open_ms: int, now_ms: int) -> np.ndarray:
    """The in-progress candle grows linearly towards its final values, reached at close."""
    tf_ms = _next_open(timeframe, open_ms) - open_ms
    elapsed = min(max(now_ms - open_ms, 0), tf_ms)
    o, h, low, c, volume, trades = _ticks(symbol, timeframe, np.array([open_ms]))
    close = o + (c - o) * elapsed // tf_ms
    high = np.maximum(o, close) + (h - np.maximum(o, c)) * elapsed // tf_ms
    low = np.minimum(o, close) - (np.minimum(o, c) - low) * elapsed // tf_ms
    return np.stack([o, high, low, close, volume * elapsed // tf_ms, trades * elapsed // tf_ms])


def _as_tuples(symbol: str, times: np.ndarray, ticks: np.ndarray) -> list[tuple]:
    # Exact int64 -> float64 and a correctly rounded division by a power of ten give the
    # same float as parsing the decimal string the server sends.
    prices = (ticks[:4] / 10 ** _price_params(symbol)[1]).tolist()
    volumes = (ticks[4] / 10**_VOLUME_DECIMALS).tolist()
    return list(zip(times.tolist(), *prices, volumes, strict=True))


@lru_cache(maxsize=64)
def _closed_block(symbol: str, timeframe: str, block_start: int) -> list[tuple]:
    times = _block_times(timeframe, block_start)
    return _as_tuples(symbol, times, _ticks(symbol, timeframe, times))


def candle(
    symbol: str, timeframe: str, open_ms: int, *, week_origin_ms: int = MONDAY_WEEK_ORIGIN_MS
) -> tuple[int, float, float, float, float, float]:
    """Final (open_ms, open, high, low, close, volume) of a candle, exactly as ccxt parses it.
    Weekly open times are checked against ``week_origin_ms``, monthly ones against the 1st."""
    if timeframe not in MONTH_TIMEFRAMES:
        _tf_ms(timeframe)  # unknown timeframes are refused
    if not _is_open_time(timeframe, open_ms, week_origin_ms):
        raise ValueError(f"{open_ms} is not a {timeframe} candle open time")
    if timeframe in MONTH_TIMEFRAMES:
        times = np.array([open_ms], dtype=np.int64)
        return _as_tuples(symbol, times, _ticks(symbol, timeframe, times))[0]
    block_start = _block_start(timeframe, open_ms, week_origin_ms)
    index = (open_ms - block_start) // _tf_ms(timeframe)
    return _closed_block(symbol, timeframe, block_start)[index]


def provisional_candle(symbol: str, timeframe: str, open_ms: int, now_ms: int) -> tuple:
    """What klines returns for the in-progress candle at ``now_ms`` (open <= now < next open)."""
    times = np.array([open_ms])
    return _as_tuples(symbol, times, _open_ticks(symbol, timeframe, open_ms, now_ms))[0]


# Binance's 12-field kline; each decimal is a (whole, 8-digit fraction) pair of 8-decimal ticks
_KLINE = (
    '[%d,"%d.%08d","%d.%08d","%d.%08d","%d.%08d","%d.%08d",%d,"%d.%08d",%d,"%d.%08d","%d.%08d","0"]'
)


def _render(
    symbol: str, tf_ms: int | np.ndarray, times: np.ndarray, ticks: np.ndarray
) -> list[str]:
    """Binance klines as JSON text, one string per candle (``tf_ms``: the candles' length, or
    an array of lengths, one a candle, for calendar months)."""
    o, h, low, c, volume, trades = ticks
    decimals = _price_params(symbol)[1]
    to8 = 10 ** (8 - decimals)  # Binance sends 8 decimals
    volume8 = volume * 10 ** (8 - _VOLUME_DECIMALS)
    # quote volume = volume * mid price, in 8-decimal ticks, ordered to stay within int64
    quote8 = volume * (o + c) * 10 ** max(0, 5 - decimals) // (2 * 10 ** max(0, decimals - 5))
    columns: list[np.ndarray] = []
    for values, decimal in (
        (times, False),
        (o * to8, True),
        (h * to8, True),
        (low * to8, True),
        (c * to8, True),
        (volume8, True),
        (times + tf_ms - 1, False),
        (quote8, True),
        (trades, False),
        (volume8 // 2, True),
        (quote8 // 2, True),
    ):
        columns += np.divmod(values, 10**8) if decimal else [values]
    return [_KLINE % tuple(row) for row in np.stack(columns, axis=1).tolist()]


def _align_up(ms: int, tf_ms: int, offset: int) -> int:
    return ms + (offset - ms) % tf_ms


def _month_runs(spec: SymbolSpec, start: int, hi: int) -> list[list[int]]:
    """`_runs` for calendar months: lists of consecutive month open times."""
    first = _month_start(start)
    t = first if first == start else _month_after(first)
    runs: list[list[int]] = [[]]
    while t <= hi:
        if any(a <= t < b for a, b in spec.gaps):
            runs.append([])
        else:
            runs[-1].append(t)
        t = _month_after(t)
    return [run for run in runs if run]


def _runs(
    spec: SymbolSpec,
    timeframe: str,
    lo: int,
    hi: int,
    *,
    week_origin_ms: int = MONDAY_WEEK_ORIGIN_MS,
) -> list[range]:
    """Maximal runs of existing candle open times in ``[lo, hi]``, ascending.

    Candles exist from the listing time on (open >= listed_at_ms), except those whose
    open time falls inside a gap. Runs are ranges; for calendar months (``1M``), lists of
    open times (sequences all the same: slicing, ``len``, ``[-1]``).
    """
    if timeframe in MONTH_TIMEFRAMES:
        return _month_runs(spec, max(lo, spec.listed_at_ms, 0), hi)  # type: ignore[return-value]
    tf_ms, offset = _tf_ms(timeframe), _offset(timeframe, week_origin_ms)
    start = max(lo, spec.listed_at_ms, 0)
    runs = []
    for a, b in spec.gaps:
        if a > hi:
            break
        if b <= start:
            continue
        if a > start:
            runs.append(range(_align_up(start, tf_ms, offset), min(a, hi + 1), tf_ms))
        start = b
    runs.append(range(_align_up(start, tf_ms, offset), hi + 1, tf_ms))
    return [run for run in runs if run]


def _take(runs: list[range], limit: int, newest: bool) -> list[range]:
    """The first (or, with ``newest``, the last) ``limit`` open times, as runs."""
    taken: list[range] = []
    for run in reversed(runs) if newest else runs:
        room = limit - sum(map(len, taken))
        if room <= 0:
            break
        taken.append(run[-room:] if newest else run[:room])
    return taken[::-1] if newest else taken


def _last_closed_open(timeframe: str, now_ms: int) -> int:
    """Every candle opening at or before this has closed at ``now_ms``."""
    if timeframe in MONTH_TIMEFRAMES:
        return _month_start(_month_start(now_ms) - 1)  # the month before the one in progress
    return now_ms - _tf_ms(timeframe)


def expected_candles(
    spec: SymbolSpec,
    timeframe: str,
    start_ms: int,
    end_ms: int,
    now_ms: int,
    *,
    week_origin_ms: int = MONDAY_WEEK_ORIGIN_MS,
) -> list[tuple]:
    """Closed candles the exchange holds with open time in ``[start_ms, end_ms)`` at ``now_ms``."""
    hi = min(end_ms - 1, _last_closed_open(timeframe, now_ms))
    runs = _runs(spec, timeframe, start_ms, hi, week_origin_ms=week_origin_ms)
    return [
        candle(spec.symbol, timeframe, t, week_origin_ms=week_origin_ms)
        for run in runs
        for t in run
    ]


class _KlineCache:
    """LRU of rendered closed klines in blocks of _BLOCK candles, so a page is a few joins."""

    def __init__(self, max_blocks: int) -> None:
        self._blocks: OrderedDict[tuple, list[str]] = OrderedDict()
        self._max_blocks = max_blocks

    def _block(self, symbol: str, timeframe: str, block_start: int) -> list[str]:
        key = (symbol, timeframe, block_start)
        block = self._blocks.get(key)
        if block is None:
            times = _block_times(timeframe, block_start)
            block = _render(
                symbol, TIMEFRAME_MS[timeframe], times, _ticks(symbol, timeframe, times)
            )
            self._blocks[key] = block
            if len(self._blocks) > self._max_blocks:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(key)
        return block

    def slices(
        self,
        symbol: str,
        timeframe: str,
        run: range,
        *,
        week_origin_ms: int = MONDAY_WEEK_ORIGIN_MS,
    ) -> Iterator[str]:
        """Comma-joined klines for the contiguous open times in ``run``."""
        if timeframe in MONTH_TIMEFRAMES:  # a handful of candles: rendered, not cached
            times = np.array(run, dtype=np.int64)
            lengths = np.array([_month_after(t) - t for t in run], dtype=np.int64)
            yield ",".join(_render(symbol, lengths, times, _ticks(symbol, timeframe, times)))
            return
        t, last = run.start, run[-1]
        while t <= last:
            block_start = _block_start(timeframe, t, week_origin_ms)
            i = (t - block_start) // run.step
            j = min(_BLOCK, (last - block_start) // run.step + 1)
            yield ",".join(self._block(symbol, timeframe, block_start)[i:j])
            t = block_start + _BLOCK * run.step


# --------------------------------------------------------------------------- server parts


class _ApiError(Exception):
    """A Binance-style ``{"code", "msg"}`` error response."""

    def __init__(self, status: int, code: int, msg: str) -> None:
        super().__init__(msg)
        self.status, self.code, self.msg = status, code, msg


@dataclass(frozen=True)
class RequestRecord:
    time: float  # time.monotonic() at arrival
    path: str
    params: dict[str, str]
    status: int
    fault: str | None = None
    answered: float = 0.0  # time.monotonic() when the answer leaves (after any latency)


class _RateBudget:
    """Request weight as Binance counts it. Per sliding second: 429 when over ``per_second``,
    and a 418 ban for clients that send more than ``ban_after`` requests while told to wait.
    Per fixed window of the exchange's clock (a minute on Binance): every request's weight adds
    to the IP's count that X-MBX-USED-WEIGHT-1M reports, ``shared_weight`` stands for another
    client on the same IP (spent as each window opens), and past ``weight_limit`` every request
    is a 429 until the window turns over."""

    def __init__(
        self,
        per_second: int | None,
        ban_after: int,
        ban_seconds: int,
        weight_limit: int | None = None,
        window_s: float = 60.0,
        shared_weight: int = 0,
    ) -> None:
        self.per_second, self.ban_after, self.ban_seconds = per_second, ban_after, ban_seconds
        self.weight_limit, self.window_s, self.shared_weight = weight_limit, window_s, shared_weight
        self._second: deque[tuple[float, int]] = deque()
        self._second_used = 0
        self._window: int | None = None
        self._window_used = 0
        self._retry_until = self._banned_until = 0.0
        self._strikes = 0

    def count(self, exchange_now: float, weight: int) -> int:
        """Add a request's weight to its window; return the window's count so far."""
        window = math.floor(exchange_now / self.window_s)
        if window != self._window:
            self._window, self._window_used = window, self.shared_weight
        self._window_used += weight
        return self._window_used

    def reject(
        self, now: float, weight: int, used: int = 0, exchange_now: float = 0.0
    ) -> tuple[str, int] | None:
        """``(status, retry_after_s)`` if the request must be refused, else admit it. ``used``
        is the window's count with this request, at ``exchange_now``."""
        if now < self._banned_until:
            return "418", math.ceil(self._banned_until - now)
        if now < self._retry_until:
            self._strikes += 1
            if self._strikes > self.ban_after:
                self._banned_until = now + self.ban_seconds
                return "418", self.ban_seconds
            return "429", math.ceil(self._retry_until - now)
        if self.weight_limit is not None and used > self.weight_limit:
            return "429", max(1, math.ceil(self.window_s - exchange_now % self.window_s))
        if self.per_second is None:
            return None
        while self._second and self._second[0][0] <= now - 1:
            self._second_used -= self._second.popleft()[1]
        if self._second_used + weight > self.per_second:
            self._retry_until, self._strikes = now + 1, 0
            return "429", 1
        self._second.append((now, weight))
        self._second_used += weight
        return None


def _json_response(obj: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(obj, separators=(",", ":")), content_type="application/json"
    )


_FAULT_RESPONSES = {  # kind: (status, content type, body); Binance sends both kinds of body
    "500": (
        500,
        "application/json",
        '{"code":-1000,"msg":"An unknown error occurred while processing the request."}',
    ),
    "502": (502, "text/html", "<html><body><h1>502 Bad Gateway</h1></body></html>"),
    "503": (
        503,
        "application/json",
        '{"code":-1008,"msg":"Server is currently overloaded '
        'with other requests. Please try again in a few minutes."}',
    ),
    "garbage": (200, "text/html", "<html>Service temporarily unavailable</html>"),
    "400": (
        400,
        "application/json",
        '{"code":-1100,"msg":"Illegal characters found in a parameter."}',
    ),
}


def _fault_response(kind: str, retry_after: int) -> web.Response:
    if kind in _FAULT_RESPONSES:
        status, content_type, text = _FAULT_RESPONSES[kind]
        return web.Response(status=status, content_type=content_type, text=text)
    message = (
        "Too many requests; current limit is exceeded, please use the Retry-After header."
        if kind == "429"
        else f"Way too many requests; IP banned for {retry_after} seconds."
    )
    response = _json_response({"code": -1003, "msg": message}, int(kind))
    response.headers["Retry-After"] = str(retry_after)
    return response


def _int_param(query: dict[str, str], name: str) -> int | None:
    value = query.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise _ApiError(400, -1100, f"Illegal characters found in parameter '{name}'.") from None


# --------------------------------------------------------------------------- the server


class FakeExchange:
    """Binance spot REST look-alike served from a background thread with its own loop."""

    def __init__(
        self,
        symbols: Sequence[SymbolSpec] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        host: str = "127.0.0.1",
        port: int = 0,
        requests_per_second: int | None = None,
        klines_weight: int = 1,
        ban_after: int = 5,
        ban_seconds: int = 10,
        weight_limit: int | None = None,
        weight_window_s: float = 60.0,
        shared_weight: int = 0,
        fault_rate: float = 0.0,
        fault_kinds: Sequence[str] = FAULT_KINDS,
        fault_paths: Sequence[str] | None = None,
        stall_seconds: float = 30.0,
        latency_s: float = 0.0,
        latency_jitter_s: float = 0.0,
        seed: int = 0,
        cache_blocks: int = 256,
        log_size: int = 200_000,
        week_origin_ms: int = MONDAY_WEEK_ORIGIN_MS,
    ) -> None:
        unknown = set(fault_kinds) - set(INJECTABLE_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; use {INJECTABLE_KINDS}")
        specs = list(symbols) if symbols is not None else make_symbols(5)
        self.specs = {spec.id: spec for spec in specs}
        self.week_origin_ms = week_origin_ms  # where weekly candles open (Binance: Monday)
        self.clock, self.host, self.port = clock, host, port
        self.klines_weight = klines_weight
        self.fault_rate, self.fault_kinds, self.fault_paths = fault_rate, fault_kinds, fault_paths
        self.stall_seconds = stall_seconds
        self.latency_s, self.latency_jitter_s = latency_s, latency_jitter_s
        self._budget = _RateBudget(
            requests_per_second,
            ban_after,
            ban_seconds,
            weight_limit=weight_limit,
            window_s=weight_window_s,
            shared_weight=shared_weight,
        )
        self._fault_rng, self._latency_rng = random.Random(seed), random.Random(seed + 1)
        self._cache = _KlineCache(cache_blocks)
        self._lock = threading.Lock()
        self._log: deque[RequestRecord] = deque(maxlen=log_size)
        self._counters = dict.fromkeys(("requests", "429", "418", "faults"), 0)
        self._scripted: list[list] = []  # [kind, remaining, path, retry_after]
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> str:
        """Serve in a background thread; returns the base URL. Restarts reuse the port."""
        if self._thread is not None:
            raise RuntimeError("FakeExchange is already running")
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._serve, args=(ready, failure), name="fake-exchange", daemon=True
        )
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self.base_url

    def stop(self) -> None:
        """Close the listener and all connections (stalled requests are cancelled)."""
        if self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> FakeExchange:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _serve(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(self._make_app(), access_log=None, shutdown_timeout=0.2)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            loop.run_until_complete(site.start())
            self.port = runner.addresses[0][1]
        except BaseException as exc:  # reported to start() in the caller's thread
            failure.append(exc)
            loop.run_until_complete(runner.cleanup())
            loop.close()
            ready.set()
            return
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._gate])
        for name, handler in (
            ("ping", self._ping),
            ("time", self._time),
            ("exchangeInfo", self._exchange_info),
            ("klines", self._klines),
            ("ticker/24hr", self._ticker_24hr),
        ):
            app.router.add_get(_API_PREFIX + name, handler)
        return app

    # ---- faults, log and counters

    def inject(
        self, kind: str, count: int = 1, path: str | None = "klines", retry_after: int | None = None
    ) -> None:
        """Answer the next ``count`` requests to endpoint ``path`` (None: any) with ``kind``.

        ``path`` is the part after ``/api/v3/``, e.g. ``klines`` or ``exchangeInfo``.
        ``retry_after`` sets the Retry-After header of '429' (default 1) and '418'
        (default ``ban_seconds``) responses.
        """
        if kind not in INJECTABLE_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; use {INJECTABLE_KINDS}")
        if retry_after is None:
            retry_after = self._budget.ban_seconds if kind == "418" else 1
        with self._lock:
            self._scripted.append([kind, count, path, retry_after])

    def request_log(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._log)

    def klines_requests(self, symbol: str | None = None) -> list[RequestRecord]:
        """Logged klines requests, optionally for one symbol (``BTC/USDT`` or ``BTCUSDT``)."""
        market_id = symbol.replace("/", "") if symbol else None
        return [
            r
            for r in self.request_log()
            if r.path == _API_PREFIX + "klines" and market_id in (None, r.params.get("symbol"))
        ]

    @property
    def counters(self) -> dict[str, int]:
        """Totals since construction (or reset_log): requests, '429', '418', 'faults'."""
        with self._lock:
            return dict(self._counters)

    def reset_log(self) -> None:
        """Forget logged requests and counters (the rate budget keeps its state)."""
        with self._lock:
            self._log.clear()
            self._counters = dict.fromkeys(self._counters, 0)

    def _pick_fault(self, endpoint: str) -> tuple[str, int] | None:
        with self._lock:
            for entry in self._scripted:
                kind, _, path, retry_after = entry
                if path in (None, endpoint):
                    entry[1] -= 1
                    if entry[1] <= 0:
                        self._scripted.remove(entry)
                    return kind, retry_after
        if (
            self.fault_rate
            and (self.fault_paths is None or endpoint in self.fault_paths)
            and self._fault_rng.random() < self.fault_rate
        ):
            return self._fault_rng.choice(self.fault_kinds), 1
        return None

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._log.append(record)
            self._counters["requests"] += 1
            if record.fault is not None:
                self._counters["faults"] += 1
            if record.status in (429, 418):
                self._counters[str(record.status)] += 1

    @web.middleware
    async def _gate(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        """Budget, faults, latency, logging and the weight header around every endpoint."""
        arrival = time.monotonic()
        endpoint = request.path.removeprefix(_API_PREFIX)
        weight = self.klines_weight if endpoint == "klines" else 1
        exchange_now = self.clock()
        used = self._budget.count(exchange_now, weight)
        rejected = self._budget.reject(arrival, weight, used, exchange_now)
        fault = None if rejected else self._pick_fault(endpoint)
        kind, retry_after = rejected or fault or (None, 0)
        delay = self.latency_s + self._latency_rng.uniform(0, self.latency_jitter_s)
        if kind in ("stall", "truncated", None):
            try:
                response = await handler(request)
            except _ApiError as exc:
                response = _json_response({"code": exc.code, "msg": exc.msg}, exc.status)
            except web.HTTPException as exc:
                response = web.Response(status=exc.status, text=exc.text)
            if kind == "stall":
                delay += self.stall_seconds
            elif kind == "truncated":
                body = response.body
                response = web.Response(
                    status=response.status,
                    body=body[: len(body) // 2],
                    content_type=response.content_type,
                )
        else:
            response = _fault_response(kind, retry_after)
        response.headers["X-MBX-USED-WEIGHT-1M"] = str(used)
        self._record(
            RequestRecord(
                arrival,
                request.path,
                dict(request.query),
                response.status,
                fault[0] if fault else None,
                time.monotonic() + delay,
            )
        )
        if delay > 0:
            await asyncio.sleep(delay)
        return response

    # ---- endpoints

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _spec(self, market_id: str | None) -> SymbolSpec:
        if not market_id:
            raise _ApiError(
                400,
                -1102,
                "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.",
            )
        try:
            return self.specs[market_id]
        except KeyError:
            raise _ApiError(400, -1121, "Invalid symbol.") from None

    async def _ping(self, request: web.Request) -> web.Response:
        return _json_response({})

    async def _time(self, request: web.Request) -> web.Response:
        return _json_response({"serverTime": self._now_ms()})

    async def _exchange_info(self, request: web.Request) -> web.Response:
        limits = []
        if self._budget.per_second is not None:
            limits.append(
                {
                    "rateLimitType": "REQUEST_WEIGHT",
                    "interval": "SECOND",
                    "intervalNum": 1,
                    "limit": self._budget.per_second,
                }
            )
        if self._budget.weight_limit is not None:
            limits.append(
                {
                    "rateLimitType": "REQUEST_WEIGHT",
                    "interval": "SECOND",
                    "intervalNum": self._budget.window_s,
                    "limit": self._budget.weight_limit,
                }
            )
        return _json_response(
            {
                "timezone": "UTC",
                "serverTime": self._now_ms(),
                "rateLimits": limits,
                "exchangeFilters": [],
                "symbols": [_market(s) for s in self.specs.values()],
            }
        )

    async def _klines(self, request: web.Request) -> web.Response:
        query = request.query
        spec = self._spec(query.get("symbol"))
        timeframe = query.get("interval")
        if timeframe not in TIMEFRAMES:
            raise _ApiError(400, -1120, "Invalid interval.")
        origin = self.week_origin_ms
        limit = _int_param(query, "limit") or DEFAULT_KLINES_LIMIT
        limit = max(1, min(limit, MAX_KLINES_LIMIT))
        start, end = _int_param(query, "startTime"), _int_param(query, "endTime")
        if start is not None and end is not None and start > end:
            raise _ApiError(400, -1023, "Start time is greater than end time.")
        now_ms = self._now_ms()
        hi = now_ms if end is None else min(end, now_ms)
        runs = _take(
            _runs(spec, timeframe, -(2**62) if start is None else start, hi, week_origin_ms=origin),
            limit,
            newest=start is None,
        )
        parts = []
        open_row = None
        if runs and _next_open(timeframe, runs[-1][-1]) > now_ms:  # the in-progress candle
            open_ms = runs[-1][-1]
            ticks = _open_ticks(spec.symbol, timeframe, open_ms, now_ms)
            length = _next_open(timeframe, open_ms) - open_ms
            open_row = _render(spec.symbol, length, np.array([open_ms]), ticks)[0]
            runs[-1] = runs[-1][:-1]
        for run in runs:
            if run:
                parts.extend(self._cache.slices(spec.symbol, timeframe, run, week_origin_ms=origin))
        if open_row is not None:
            parts.append(open_row)
        return web.Response(text="[" + ",".join(parts) + "]", content_type="application/json")

    async def _ticker_24hr(self, request: web.Request) -> web.Response:
        now_ms = self._now_ms()
        if "symbol" in request.query:
            return _json_response(_ticker(self._spec(request.query["symbol"]), now_ms))
        specs = self.specs.values()
        if "symbols" in request.query:
            try:
                market_ids = json.loads(request.query["symbols"])
            except ValueError:
                raise _ApiError(
                    400, -1100, "Illegal characters found in parameter 'symbols'."
                ) from None
            specs = [self._spec(market_id) for market_id in market_ids]
        return _json_response([_ticker(spec, now_ms) for spec in specs])


def _market(spec: SymbolSpec) -> dict:
    """A Binance exchangeInfo symbol entry with the fields and filters ccxt parses."""
    base, quote = spec.symbol.split("/")
    tick = f"{10.0 ** -_price_params(spec.symbol)[1]:.8f}"
    return {
        "symbol": spec.id,
        "status": spec.status,
        "baseAsset": base,
        "baseAssetPrecision": 8,
        "quoteAsset": quote,
        "quotePrecision": 8,
        "quoteAssetPrecision": 8,
        "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET"],
        "isSpotTradingAllowed": True,
        "isMarginTradingAllowed": False,
        "filters": [
            {
                "filterType": "PRICE_FILTER",
                "minPrice": tick,
                "maxPrice": "1000000.00000000",
                "tickSize": tick,
            },
            {
                "filterType": "LOT_SIZE",
                "minQty": "0.00100000",
                "maxQty": "9000000.00000000",
                "stepSize": "0.00100000",
            },
            {
                "filterType": "NOTIONAL",
                "minNotional": "5.00000000",
                "applyMinToMarket": True,
                "maxNotional": "9000000.00000000",
                "applyMaxToMarket": False,
                "avgPriceMins": 5,
            },
        ],
        "permissions": ["SPOT"],
        "permissionSets": [["SPOT"]],
    }


def _ticker(spec: SymbolSpec, now_ms: int) -> dict:
    """24h statistics; prices follow the current daily candle, quoteVolume is the spec's."""
    day_open = now_ms - now_ms % TIMEFRAME_MS["1d"]
    _, o, h, low, c, _ = provisional_candle(spec.symbol, "1d", day_open, now_ms)
    return {
        "symbol": spec.id,
        "priceChange": f"{c - o:.8f}",
        "priceChangePercent": f"{(c - o) / o * 100:.3f}",
        "weightedAvgPrice": f"{(o + c) / 2:.8f}",
        "prevClosePrice": f"{o:.8f}",
        "lastPrice": f"{c:.8f}",
        "lastQty": "1.00000000",
        "bidPrice": f"{c:.8f}",
        "bidQty": "1.00000000",
        "askPrice": f"{c:.8f}",
        "askQty": "1.00000000",
        "openPrice": f"{o:.8f}",
        "highPrice": f"{h:.8f}",
        "lowPrice": f"{low:.8f}",
        "volume": f"{spec.volume_24h / c:.8f}",
        "quoteVolume": f"{spec.volume_24h:.8f}",
        "openTime": now_ms - TIMEFRAME_MS["1d"],
        "closeTime": now_ms,
        "firstId": 1,
        "lastId": 1000,
        "count": 1000,
    }


# --------------------------------------------------------------------------- process mode


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; print the base URL first and the counters last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--symbols", type=int, default=100, help="number of markets")
    parser.add_argument(
        "--symbol",
        action="append",
        default=[],
        metavar="BASE/QUOTE",
        help="a market with SymbolSpec's defaults (repeatable); replaces --symbols",
    )
    parser.add_argument("--synthetic-only", action="store_true", help="no BTC/USDT etc.")
    parser.add_argument("--listed-at-ms", type=int, default=DEFAULT_LISTED_AT_MS)
    parser.add_argument(
        "--start-time",
        type=float,
        default=None,
        help="epoch seconds the clock starts at (then runs in real time)",
    )
    parser.add_argument(
        "--frozen-time", type=float, default=None, help="epoch seconds the clock stays at"
    )
    parser.add_argument("--rps", type=int, default=None, help="request weight per second")
    parser.add_argument("--klines-weight", type=int, default=1)
    parser.add_argument("--ban-after", type=int, default=5)
    parser.add_argument("--ban-seconds", type=int, default=10)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--faults", default=",".join(FAULT_KINDS), help="comma-separated kinds")
    parser.add_argument("--stall-seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-blocks", type=int, default=256)
    args = parser.parse_args(argv)

    clock = time.time
    if args.frozen_time is not None:

        def clock() -> float:
            return args.frozen_time

    elif args.start_time is not None:
        started = time.monotonic()

        def clock() -> float:
            return args.start_time + time.monotonic() - started

    specs = [SymbolSpec(name, listed_at_ms=args.listed_at_ms) for name in args.symbol] or (
        make_symbols(
            args.symbols, real_names=not args.synthetic_only, listed_at_ms=args.listed_at_ms
        )
    )
    exchange = FakeExchange(
        specs,
        clock=clock,
        host=args.host,
        port=args.port,
        requests_per_second=args.rps,
        klines_weight=args.klines_weight,
        ban_after=args.ban_after,
        ban_seconds=args.ban_seconds,
        fault_rate=args.fault_rate,
        fault_kinds=args.faults.split(","),
        stall_seconds=args.stall_seconds,
        latency_s=args.latency_ms / 1000,
        latency_jitter_s=args.jitter_ms / 1000,
        seed=args.seed,
        cache_blocks=args.cache_blocks,
        log_size=10_000,
    )
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    print(exchange.start(), flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        exchange.stop()
        print(json.dumps(exchange.counters), flush=True)


if __name__ == "__main__":
    main()
