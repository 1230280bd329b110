"""`GET /ohlcv`: stored candles of one series over HTTP, while the collector runs.

    GET /ohlcv?exchange=&symbol=&timeframe=&start=&end=[&limit=][&closed_only=true]
              [&format=json|csv|parquet]

Rows of `[start, end)` on candle open time, oldest first, with every stored column. `start` and
`end` are ISO 8601 (UTC unless a zone is given) or epoch ms; answers carry ISO 8601 UTC.

- json (default): `{"exchange", "symbol", "timeframe", "rows": [...], "next"}`, at most `limit`
  rows (default `DEFAULT_PAGE_ROWS`, larger values are capped at `MAX_PAGE_ROWS`); `next` is
  the open time of the first row left out, to pass back as `start`, or null at the range's end.
- csv (a header row) and parquet: the whole range in one streamed response, read from the
  store a bounded chunk at a time and encoded on a worker thread, so memory stays bounded
  however long the range; `limit` is refused with them.

The series must be one the collector is configured for (`catalog`); anything else, like any
malformed or unknown parameter, is a 400 naming the parameter. The SQL is parameterised in the
stores; a symbol with quotes in it is only an unknown symbol here.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from aiohttp import web
from multidict import MultiMapping

from ..errors import StoreFault
from ..models import JobKey
from ..observability.events import EventLog
from ..store import CandleQuery, CandleStore
from ..timeframes import instant_ms

DEFAULT_PAGE_ROWS = 1_000
MAX_PAGE_ROWS = 10_000
FORMATS = ("json", "csv", "parquet")
_REQUIRED = ("exchange", "symbol", "timeframe", "start", "end")
_KNOWN = (*_REQUIRED, "limit", "closed_only", "format")
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
_SERIES_COLUMNS = ("exchange", "symbol", "timeframe")  # in the JSON envelope, not in each row
_UNSAFE_IN_NAMES = re.compile(r"[^A-Za-z0-9._-]+")
_CONTENT_TYPES = {"csv": "text/csv", "parquet": "application/vnd.apache.parquet"}

# The series the collector may answer for, or None while it is still starting.
Catalog = Callable[[], Collection[JobKey] | None]


class BadParameter(ValueError):
    """A request parameter that cannot be served; the message names it."""


@dataclass(frozen=True)
class OhlcvRequest:
    query: CandleQuery
    format: str


def _single(params: MultiMapping[str], name: str) -> str | None:
    values = params.getall(name, [])
    if len(values) > 1:
        raise BadParameter(f"{name}: given {len(values)} times")
    return values[0] if values else None


def _instant(name: str, text: str) -> int:
    try:
        return instant_ms(text)
    except ValueError as exc:
        raise BadParameter(f"{name}: {exc}") from None


def _limit(text: str | None, fmt: str) -> int | None:
    if text is None:
        return DEFAULT_PAGE_ROWS if fmt == "json" else None
    if fmt != "json":
        raise BadParameter(f"limit: only for format=json; {fmt} holds the whole range")
    try:
        limit = int(text)
    except ValueError:
        raise BadParameter(f"limit: not an integer: {text!r}") from None
    if limit <= 0:
        raise BadParameter(f"limit: must be at least 1, got {limit}")
    return min(limit, MAX_PAGE_ROWS)


def _series(values: dict[str, str], known: Collection[JobKey]) -> JobKey:
    exchange, symbol, timeframe = values["exchange"], values["symbol"], values["timeframe"]
    on_exchange = [k for k in known if k.exchange == exchange]
    if not on_exchange:
        configured = ", ".join(sorted({k.exchange for k in known})) or "none"
        raise BadParameter(f"exchange: {exchange!r} is not configured (configured: {configured})")
    if not any(k.symbol == symbol for k in on_exchange):
        raise BadParameter(f"symbol: {symbol!r} is not configured on {exchange}")
    key = JobKey(exchange, symbol, timeframe)
    if key not in known:
        raise BadParameter(f"timeframe: {timeframe!r} is not configured for {symbol} on {exchange}")
    return key


def parse_request(params: MultiMapping[str], known: Collection[JobKey]) -> OhlcvRequest:
    """The read a query string asks for; BadParameter naming the first parameter at fault."""
    unknown = sorted(set(params) - set(_KNOWN))
    if unknown:
        name = unknown[0] if unknown[0].isidentifier() else repr(unknown[0])
        raise BadParameter(f"{name}: unknown parameter (known: {', '.join(_KNOWN)})")
    values = {name: value for name in _KNOWN if (value := _single(params, name)) is not None}
    for name in _REQUIRED:
        if not values.get(name):
            raise BadParameter(f"{name}: required")
    fmt = values.get("format", "json")
    if fmt not in FORMATS:
        raise BadParameter(f"format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    closed_text = values.get("closed_only", "false").lower()
    if closed_text not in _BOOLEANS:
        raise BadParameter(f"closed_only: must be true or false, got {closed_text!r}")
    key = _series(values, known)
    start = _instant("start", values["start"])
    end = _instant("end", values["end"])
    if start >= end:
        raise BadParameter("start: must be before end")
    limit = _limit(values.get("limit"), fmt)
    query = CandleQuery(key, start, end, _BOOLEANS[closed_text], limit + 1 if limit else None)
    return OhlcvRequest(query, fmt)


def iso_columns(table: pa.Table) -> pa.Table:
    """`table` with its timestamp columns as ISO 8601 UTC strings (`2024-01-01T00:00:00Z`,
    milliseconds only where there are any)."""
    for i, field in enumerate(table.schema):
        if pa.types.is_timestamp(field.type):
            as_ms = pc.cast(table.column(i), pa.timestamp("ms", tz="UTC"), safe=False)
            text = pc.strftime(as_ms, format="%Y-%m-%dT%H:%M:%SZ")  # %S carries the millis
            whole = pc.replace_substring(text, ".000Z", "Z")
            table = table.set_column(i, pa.field(field.name, pa.string()), whole)
    return table


def json_page(key: JobKey, table: pa.Table, limit: int) -> bytes:
    """The JSON answer for up to `limit` rows of `table` (which may hold one more: the next)."""
    rows = iso_columns(table.drop_columns([c for c in _SERIES_COLUMNS if c in table.schema.names]))
    following = rows.column("timestamp")[limit].as_py() if rows.num_rows > limit else None
    page = rows.slice(0, limit)
    names = page.column_names
    # Column by column: Table.to_pylist builds each value through a scalar, ~6x slower.
    columns = [page.column(name).to_pylist() for name in names]
    body: dict[str, Any] = {
        "exchange": key.exchange,
        "symbol": key.symbol,
        "timeframe": key.timeframe,
        "rows": [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)],
        "next": following,
    }
    return orjson.dumps(body)


class _Collected(io.RawIOBase):
    """A write-only file whose bytes are taken out after each write (the Parquet sink)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


class _ParquetEncoder:
    """Parquet bytes, a row group per chunk, handed out as they are made."""

    def __init__(self, schema: pa.Schema) -> None:
        self._sink = _Collected()
        self._writer = pq.ParquetWriter(self._sink, schema, compression="zstd")

    def encode(self, chunk: pa.Table) -> bytes:
        self._writer.write_table(chunk)
        return self._sink.take()

    def finish(self) -> bytes:
        self._writer.close()
        return self._sink.take()


def csv_bytes(chunk: pa.Table, header: bool) -> bytes:
    out = io.BytesIO()
    pa_csv.write_csv(iso_columns(chunk), out, pa_csv.WriteOptions(include_header=header))
    return out.getvalue()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class OhlcvApi:
    def __init__(self, store: CandleStore, catalog: Catalog, events: EventLog) -> None:
        self._store = store
        self._catalog = catalog
        self._events = events

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/ohlcv", self.ohlcv)]

    async def ohlcv(self, request: web.Request) -> web.StreamResponse:
        known = self._catalog()
        if known is None:
            return _error(503, "the collector is starting; the store is not open yet")
        try:
            read = parse_request(request.query, known)
        except BadParameter as exc:
            return _error(400, str(exc))
        async with contextlib.aclosing(self._store.read(read.query)) as chunks:
            try:
                first = await anext(chunks)  # a store fault here is still a clean error answer
            except StoreFault as exc:
                return self._store_error(read.query, exc)
            if read.format == "json":
                return await self._json(read.query, first, chunks)
            return await self._stream(request, read, first, chunks)

    def _store_error(self, query: CandleQuery, exc: StoreFault) -> web.Response:
        self._events.error(
            "ohlcv_read_error",
            f"reading {query.key} failed: {exc}",
            exchange=query.key.exchange,
            symbol=query.key.symbol,
            timeframe=query.key.timeframe,
            error=str(exc),
        )
        return _error(500 if exc.permanent else 503, f"the store could not be read: {exc}")

    async def _json(
        self, query: CandleQuery, first: pa.Table, rest: AsyncIterator[pa.Table]
    ) -> web.Response:
        assert query.limit is not None
        try:
            table = pa.concat_tables([first, *[chunk async for chunk in rest]])
        except StoreFault as exc:
            return self._store_error(query, exc)
        body = await asyncio.to_thread(json_page, query.key, table, query.limit - 1)
        return web.Response(body=body, content_type="application/json")

    async def _stream(
        self,
        request: web.Request,
        read: OhlcvRequest,
        first: pa.Table,
        rest: AsyncIterator[pa.Table],
    ) -> web.StreamResponse:
        key = read.query.key
        name = _UNSAFE_IN_NAMES.sub("-", f"{key.exchange}_{key.symbol}_{key.timeframe}")
        response = web.StreamResponse(
            headers={
                "Content-Type": _CONTENT_TYPES[read.format],
                "Content-Disposition": f'attachment; filename="{name}.{read.format}"',
            }
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        encoder = _ParquetEncoder(first.schema) if read.format == "parquet" else None
        chunk: pa.Table | None = first
        try:
            while chunk is not None:
                if encoder is not None:
                    data = await asyncio.to_thread(encoder.encode, chunk)
                else:
                    data = await asyncio.to_thread(csv_bytes, chunk, chunk is first)
                await response.write(data)
                chunk = await anext(rest, None)
            if encoder is not None:
                await response.write(await asyncio.to_thread(encoder.finish))
        except StoreFault as exc:
            # The status is sent: cut the transfer short (no final chunk), so no client takes
            # a partial answer for a whole one.
            self._store_error(read.query, exc)
            if request.transport is not None:
                request.transport.abort()
            return response
        except ConnectionResetError:  # the client went away: nobody is left to answer
            return response
        await response.write_eof()
        return response


def ohlcv_routes(store: CandleStore, catalog: Catalog, events: EventLog) -> list[web.RouteDef]:
    return OhlcvApi(store, catalog, events).routes()
