"""Indicators on ingestion: each closed candle gets RSI/EMA/MACD continued from saved state.

A series' state (see `indicators.IndicatorState`) is kept in the state store beside the job
ledger (`StateStore.save_indicator_series`) and saved only after the rows it describes are
durable. Pages that extend a series forward (the normal case: a backfill moving forward, live
mode) are computed incrementally. A page that lands before the newest candle already computed
(a backfill that extends a range backwards, a page fetched again after a crash) may make later
values wrong, so its series is marked dirty and `repair` recomputes it once from its first
stored candle and rewrites the rows whose stored values differ from the recomputation (rows
stored with the right values before a crash are not written again: on BigQuery each rewrite is
one more version of the key in the base table). Such a page gets its own values at once,
continued from the stored candles before it (read when the series falls behind, and the pages
that follow continue from it: `_Behind`), so that a hole a stopped run left is filled with its
final values and not written a second time. Exchange gaps do not reset a series: the next
candle after a hole continues it, exactly as a computation over the stored rows in time order
would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from ..errors import StoreFault
from ..indicators import IndicatorSpec, IndicatorState, compute, initial_state, provisional
from ..jobs.state import SeriesState, StateStore
from ..models import CandleBatch, Column, JobKey
from ..observability.events import EventLog
from ..store import CandleStore

Commit = Callable[[], Awaitable[None]]

# Incremental and whole-series computations round differently in the last bits (measured over
# 20 random walks of 20,000 closes cut into 61 pieces: up to 1.2e-15 of a value's scale, see
# `differing_rows`, and a macd_signal value equal to the bit in fewer than 1 in 1,000 rows); a
# stored value within this fraction of the scale is the recomputed value.
SAME_VALUE_TOLERANCE = 1e-9
# MACD's rounding is that of the prices (about 1e-15 of the close, measured as above), so near
# zero its scale is this fraction of the close: the tolerance there is 1e-13 of the close.
MACD_SCALE_FLOOR = 1e-4


def differing_rows(
    stored: CandleBatch, recomputed: Mapping[str, np.ndarray], spec: IndicatorSpec
) -> np.ndarray:
    """Boolean mask of the rows whose stored indicator values (`stored.extra`) are not
    `recomputed`: a value where none is due or none where one is (NaN for NULL), a column the
    store did not return, or a value further than `SAME_VALUE_TOLERANCE` of its scale: the
    larger of the two values and, for MACD's columns, of `MACD_SCALE_FLOOR` times the close
    (MACD crosses zero, and its rounding follows the prices it is the difference of)."""
    differ = np.zeros(len(stored), dtype=bool)
    macd = {name for name in spec.column_names() if name.startswith("macd")}
    for name, want in recomputed.items():
        got = stored.extra.get(name)
        if got is None:
            return np.ones(len(stored), dtype=bool)
        scale = np.maximum(np.abs(got), np.abs(want))
        if name in macd:
            scale = np.maximum(scale, MACD_SCALE_FLOOR * np.abs(stored.close))
        with np.errstate(invalid="ignore"):  # NaN compares False: settled by the NaN test
            far = np.abs(got - want) > SAME_VALUE_TOLERANCE * scale
        differ |= far | (np.isnan(got) != np.isnan(want))
    return differ


def indicator_columns(spec: IndicatorSpec) -> tuple[Column, ...]:
    return tuple(Column(name, "FLOAT64") for name in spec.column_names())


@dataclass
class _Series:
    last_ms: int | None = None  # newest closed candle the state has seen
    state: IndicatorState | None = None
    dirty_from_ms: int | None = None  # earliest candle whose values need a recompute
    has_stored_rows: bool = False


@dataclass(frozen=True)
class _Behind:
    """Where the pages that landed before a dirty series' newest computed candle have got to,
    for the next such page to continue from: the newest closed candle of those pages, the state
    after it, and the stored closed candles after it (as read at the first such page; the ones
    before are not needed again, so a series at its head holds next to none)."""

    last_ms: int
    state: IndicatorState
    stored_ms: np.ndarray
    stored_close: np.ndarray


class IndicatorStage:
    def __init__(
        self, spec: IndicatorSpec, state: StateStore, store: CandleStore, events: EventLog
    ) -> None:
        """`state` is opened and closed by its owner, not here."""
        self.spec = spec
        self._state = state
        self._store = store
        self._events = events
        self._series: dict[JobKey, _Series] = {}
        self._behind: dict[JobKey, _Behind] = {}
        # A series' pages are prepared one at a time, in the order `prepare` was called.
        self._preparing: dict[JobKey, asyncio.Lock] = {}

    async def load(self, keys: list[JobKey], stored: Mapping[JobKey, int]) -> None:
        """Read saved states. `stored` is the newest stored closed candle per key (the
        caller's one `newest` query, which live mode also uses as its cursors)."""
        saved = await self._state.load_indicator_series()
        for key in keys:
            found = saved.get(key, SeriesState(None, None, None))
            last, text, dirty = found.last_ms, found.state, found.dirty_from_ms
            state = IndicatorState.from_json(text) if text else None
            if state is not None and state.spec != self.spec:
                state, last, dirty = None, None, None  # periods changed: recompute everything
            series = _Series(last, state, dirty, has_stored_rows=key in stored)
            if state is None and series.has_stored_rows:
                series.dirty_from_ms = 0  # rows exist that no saved state describes
            elif last is not None and stored.get(key, last) > last and dirty is None:
                series.dirty_from_ms = last + 1  # rows were stored but their state not saved
            self._series[key] = series

    async def reconcile(self, key: JobKey) -> bool:
        """Before working on a series that other instances may have moved since this one last
        did (a claimed lease): where the saved state is not the one held here, the state here is
        stale, and the saved one may lag the rows of an instance that died. The series is then
        marked dirty from the older of the two on, for `repair`. True when it is dirty."""
        saved = (await self._state.load_indicator_series(key)).get(
            key, SeriesState(None, None, None)
        )
        current = self._series.setdefault(key, _Series())
        held = SeriesState(
            current.last_ms,
            current.state.to_json() if current.state else None,
            current.dirty_from_ms,
        )
        if saved != held:
            self._behind.pop(key, None)  # read before the other instance's rows
            marks = [m for m in (saved.dirty_from_ms, current.dirty_from_ms) if m is not None]
            if saved.last_ms is None or current.last_ms is None:
                marks.append(0)
            else:
                marks.append(min(saved.last_ms, current.last_ms) + 1)
            current.dirty_from_ms = min(marks)
            current.has_stored_rows = True
            await self._save(key, current)
        return current.dirty_from_ms is not None

    async def _save(self, key: JobKey, series: _Series) -> None:
        text = series.state.to_json() if series.state else None
        await self._state.save_indicator_series(
            key, SeriesState(series.last_ms, text, series.dirty_from_ms)
        )

    def _commit(self, key: JobKey, series: _Series) -> Commit:
        async def commit() -> None:
            await self._save(key, series)

        return commit

    async def abort(self, batch: CandleBatch) -> None:
        """The prepared batch was not stored: what follows it must be recomputed."""
        current = self._series.setdefault(batch.key, _Series())
        first_ms = int(batch.timestamps[0]) if len(batch) else 0
        earlier = current.dirty_from_ms
        current.dirty_from_ms = first_ms if earlier is None else min(first_ms, earlier)
        await self._save(batch.key, current)

    async def prepare(self, batch: CandleBatch) -> tuple[CandleBatch, Commit]:
        """The batch with indicator columns, and what to save once it is durable.

        The in-memory state moves on at once, so the next page of the series can be prepared
        while this one is still being written (load jobs); the saved state only once durable.
        """
        async with self._preparing.setdefault(batch.key, asyncio.Lock()):
            return await self._prepare(batch)

    async def _prepare(self, batch: CandleBatch) -> tuple[CandleBatch, Commit]:
        key = batch.key
        current = self._series.setdefault(key, _Series())
        closed = np.flatnonzero(batch.closed)
        columns = {name: np.full(len(batch), np.nan) for name in self.spec.column_names()}
        following = replace(current)
        if len(closed):
            first_ms, last_ms = int(batch.timestamps[closed[0]]), int(batch.timestamps[closed[-1]])
            appends = current.dirty_from_ms is None and (
                (current.last_ms is not None and first_ms > current.last_ms)
                or (current.state is None and not current.has_stored_rows)
            )
            if appends:
                state = current.state or initial_state(self.spec)
                values, state = compute(batch.close[closed], state, self.spec)
                for name, column in values.items():
                    columns[name][closed] = column
                following = _Series(last_ms, state, None, has_stored_rows=True)
            else:
                values = await self._continued_behind(
                    key, batch.timestamps[closed], batch.close[closed]
                )
                for name, column in values.items():
                    columns[name][closed] = column
                earlier = current.dirty_from_ms
                dirty = first_ms if earlier is None else min(first_ms, earlier)
                following = replace(current, dirty_from_ms=dirty, has_stored_rows=True)
        if following.dirty_from_ms is None and following.state is not None:
            for i in np.flatnonzero(~batch.closed):  # open candle: provisional values
                for name, value in provisional(
                    float(batch.close[i]), following.state, self.spec
                ).items():
                    columns[name][i] = value
        self._series[key] = following
        return replace(batch, extra=columns), self._commit(key, following)

    async def _continued_behind(
        self, key: JobKey, stamps: np.ndarray, closes: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Values for closed candles that land before the newest computed one: continued from
        the previous such page through the stored candles between the two, or, for a page that
        does not follow one, computed from the stored candles before it, read then. Where they
        cannot be read, no values (NaN): the page is written all the same, and the
        recomputation writes it again with them."""
        first = int(stamps[0])
        behind = self._behind.get(key)
        if behind is not None and behind.last_ms < first:
            state, stored_ms, stored_close = behind.state, behind.stored_ms, behind.stored_close
        else:
            stored = await self._stored_series(key, len(closes))
            if stored is None:  # the page is still written; the recomputation fills it
                return {name: np.full(len(closes), np.nan) for name in self.spec.column_names()}
            state = initial_state(self.spec)
            stored_ms, stored_close = stored.timestamps, stored.close
        _, state = compute(stored_close[stored_ms < first], state, self.spec)
        values, state = compute(closes, state, self.spec)
        last_ms = int(stamps[-1])
        after = stored_ms > last_ms
        self._behind[key] = _Behind(last_ms, state, stored_ms[after], stored_close[after])
        return values

    async def _stored_series(self, key: JobKey, rows: int) -> CandleBatch | None:
        """The series' stored candles, or None (an `indicators_read_error`) if unreadable."""
        try:
            return await self._store.series(key)
        except StoreFault as exc:
            self._events.warning(
                "indicators_read_error",
                f"{key}: the stored candles could not be read; the indicators of {rows} candles "
                "are left to the series' recomputation",
                exchange=key.exchange,
                symbol=key.symbol,
                timeframe=key.timeframe,
                rows=rows,
                error=f"{type(exc).__name__}: {exc}"[:500],
            )
            return None

    def dirty(self) -> list[JobKey]:
        return sorted(k for k, s in self._series.items() if s.dirty_from_ms is not None)

    async def repair(
        self, write: Callable[[CandleBatch], Awaitable[int]], keys: list[JobKey] | None = None
    ) -> int:
        """Recompute every dirty series (of `keys`, default all) from its first stored candle;
        rewrite the rows whose stored values differ (`differing_rows`), and only those.

        `write` must make rows durable without passing them through `prepare` again. Returns
        the rows rewritten."""
        rewritten = 0
        for key in self.dirty():
            if keys is not None and key not in keys:
                continue
            self._behind.pop(key, None)
            stored = await self._store.series(key)
            if not len(stored):
                self._series[key] = _Series()
                await self._commit(key, _Series())()
                continue
            values, state = compute(stored.close, initial_state(self.spec), self.spec)
            changed = replace(stored, extra=values).select(
                differing_rows(stored, values, self.spec)
            )
            if len(changed):
                rewritten += await write(changed)
            repaired = _Series(int(stored.timestamps[-1]), state, None, has_stored_rows=True)
            self._series[key] = repaired
            await self._commit(key, repaired)()
            self._events.info(
                "indicators_recomputed",
                f"{key}: indicators recomputed from the first stored candle; "
                f"{len(changed)} of {len(stored)} rows differed and were rewritten",
                exchange=key.exchange,
                symbol=key.symbol,
                timeframe=key.timeframe,
                rows=len(changed),
                compared=len(stored),
            )
        return rewritten
