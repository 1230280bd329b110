"""Fake Binance public-data archive host (data.binance.vision) for tests and benchmarks.

It serves the candle world of `fake_exchange` (same specs, listings, maintenance gaps and
clock; candles from the same generator and rendered by the same code), so what a collector
stores from the archive must equal what the fake REST exchange answers, float for float.

Layout as the real host's (binance/binance-public-data README):
`/{market_path}/{daily|monthly}/klines/{ID}/{interval}/{ID}-{interval}-{YYYY-MM-DD|YYYY-MM}.zip`
and `<same>.zip.CHECKSUM` (`<sha256>  <name>`). Each zip holds one CSV `<name>.csv` of the 12
kline columns. Knobs, each as on the real host:
- `microseconds_from_ms`: files whose period starts at or after it give open and close times in
  microseconds (spot: 2025-01-01; futures: None).
- `header_from_ms`: files from then on start with a header row (futures' newer files).
- a daily file is published once its day has ended, a monthly one `monthly_delay_days` after
  its month ended; unpublished files, files holding no candle (before the listing) and the
  names in `missing` are 404.
- `drop`: file name -> [start, end) of open times left out of it (a file missing an hour).
- `bad_checksum`: file names whose CHECKSUM names another digest.
- `fail_next`: that many of the next requests answer 503 (a server error, retried).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
import zipfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from aiohttp import web
from fake_exchange import (
    TIMEFRAME_MS,
    FakeExchange,
    RequestRecord,
    SymbolSpec,
    _month_after,
    _render,
    _runs,
    _ticks,
)

SPOT_MICROSECONDS_FROM_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
DAY_MS = 86_400_000
HEADER = (
    "open_time,open,high,low,close,volume,close_time,quote_volume,count,"
    "taker_buy_volume,taker_buy_quote_volume,ignore\n"
)
INTERVALS = {tf: tf for tf in TIMEFRAME_MS}  # "1mo" (calendar months) is not served


def _period(stamp: str) -> tuple[int, int]:
    """[start, end) in ms of a `YYYY-MM-DD` day or a `YYYY-MM` month."""
    if len(stamp) == 10:
        day = datetime.strptime(stamp, "%Y-%m-%d").replace(tzinfo=UTC)
        start = int(day.timestamp() * 1000)
        return start, start + DAY_MS
    month = datetime.strptime(stamp, "%Y-%m").replace(tzinfo=UTC)
    start = int(month.timestamp() * 1000)
    return start, _month_after(start)


def zip_of(name: str, csv_text: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr(name.removesuffix(".zip") + ".csv", csv_text)
    return buffer.getvalue()


class FakeArchive(FakeExchange):
    """The archive host, served like `FakeExchange` (a background thread on loopback)."""

    def __init__(
        self,
        symbols: Sequence[SymbolSpec],
        *,
        market_path: str = "data/spot",
        microseconds_from_ms: int | None = SPOT_MICROSECONDS_FROM_MS,
        header_from_ms: int | None = None,
        monthly_delay_days: int = 3,
        missing: Sequence[str] = (),
        drop: Mapping[str, tuple[int, int]] | None = None,
        bad_checksum: Sequence[str] = (),
        cache_dir: Path | None = None,
        **server: object,
    ) -> None:
        super().__init__(symbols, **server)  # type: ignore[arg-type]
        self.market_path = market_path.strip("/")
        self.microseconds_from_ms, self.header_from_ms = microseconds_from_ms, header_from_ms
        self.monthly_delay_ms = monthly_delay_days * DAY_MS
        self.missing, self.drop = set(missing), dict(drop or {})
        self.bad_checksum = set(bad_checksum)
        self._zips: dict[str, bytes | None] = {}
        self.cache_dir = cache_dir  # rendered zips kept on disk (benchmarks), else in memory
        self.fail_next = 0

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._file)
        return app

    def archive_requests(self, suffix: str = ".zip") -> list[RequestRecord]:
        """Logged requests for zips (or, with `suffix=".CHECKSUM"`, checksum files)."""
        return [r for r in self.request_log() if r.path.endswith(suffix)]

    def csv_of(self, name: str) -> bytes | None:
        """The CSV inside file `name` (`BTCUSDT-1m-2024-01.zip`), None when not published."""
        market_id, interval, stamp = name.removesuffix(".zip").split("-", 2)
        spec, timeframe = self.specs.get(market_id), interval
        if spec is None or timeframe not in INTERVALS or name in self.missing:
            return None
        start, end = _period(stamp)
        delay = self.monthly_delay_ms if len(stamp) == 7 else 0
        if self.clock() * 1000 < end + delay:
            return None
        runs = _runs(spec, timeframe, start, end - 1, week_origin_ms=self.week_origin_ms)
        times = np.concatenate([np.asarray(run, dtype=np.int64) for run in runs] or [[]])
        times = times.astype(np.int64)
        if name in self.drop:
            a, b = self.drop[name]
            times = times[(times < a) | (times >= b)]
        if not len(times):
            return None
        scale = (
            1000
            if self.microseconds_from_ms is not None and start >= self.microseconds_from_ms
            else 1
        )
        tf_ms = TIMEFRAME_MS[timeframe]
        rows = _render(
            spec.symbol, tf_ms * scale, times * scale, _ticks(spec.symbol, timeframe, times)
        )
        header = HEADER if self.header_from_ms is not None and start >= self.header_from_ms else ""
        return (header + "".join(row[1:-1].replace('"', "") + "\n" for row in rows)).encode()

    def zip_file(self, name: str) -> bytes | None:
        """File `name` as served (rendered once), None when not published."""
        if self.cache_dir is not None:
            path = self.cache_dir / name
            if not path.exists():
                text = self.csv_of(name)
                path.write_bytes(b"" if text is None else zip_of(name, text))
            return path.read_bytes() or None
        if name not in self._zips:
            text = self.csv_of(name)
            self._zips[name] = None if text is None else zip_of(name, text)
        return self._zips[name]

    def _body(self, path: str) -> bytes | None:
        prefix = self.market_path + "/"
        if not path.startswith(prefix) or "/klines/" not in path:
            return None
        name = path.rsplit("/", 1)[-1]
        checksum = name.endswith(".zip.CHECKSUM")
        data = self.zip_file(name.removesuffix(".CHECKSUM"))
        if data is None or not checksum:
            return data
        digest = hashlib.sha256(data).hexdigest()
        if name.removesuffix(".CHECKSUM") in self.bad_checksum:
            digest = hashlib.sha256(data + b"tampered").hexdigest()
        return f"{digest}  {name.removesuffix('.CHECKSUM')}\n".encode()

    async def _file(self, request: web.Request) -> web.Response:
        with self._lock:
            failing, self.fail_next = self.fail_next > 0, max(0, self.fail_next - 1)
        if failing:
            self._record(RequestRecord(time.monotonic(), request.path, {}, 503))
            return web.Response(status=503, text="Service Unavailable")
        body = self._body(request.match_info["path"])
        status = 404 if body is None else 200
        self._record(RequestRecord(time.monotonic(), request.path, {}, status))
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if body is None:
            return web.Response(status=404, text="<Error><Code>NoSuchKey</Code></Error>")
        return web.Response(body=body, content_type="application/zip")
