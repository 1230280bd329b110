"""Indicators on ingestion: each closed candle gets RSI/EMA/MACD continued from saved state.

A series' state (see `indicators.IndicatorState`) is kept in the state store beside the job
ledger (`StateStore.save_indicator_series`) and saved only after the rows it describes are
durable. Pages that extend a series forward (the normal case: a backfill moving forward, live
mode) are computed incrementally. A page that lands before the newest candle already computed
(a backfill that extends a range backwards, a page fetched again after a crash) would make
every later value wrong, so its series is marked dirty and `repair` recomputes it once from its
first stored candle and rewrites the rows from the earliest change on. Exchange gaps do not
reset a series: the next candle after a hole continues it, exactly as a computation over the
stored rows in time order would.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from ..indicators import IndicatorSpec, IndicatorState, compute, initial_state, provisional
from ..jobs.state import SeriesState, StateStore
from ..models import CandleBatch, Column, JobKey
from ..observability.events import EventLog
from ..store import CandleStore

Commit = Callable[[], Awaitable[None]]


def indicator_columns(spec: IndicatorSpec) -> tuple[Column, ...]:
    return tuple(Column(name, "FLOAT64") for name in spec.column_names())


@dataclass
class _Series:
    last_ms: int | None = None  # newest closed candle the state has seen
    state: IndicatorState | None = None
    dirty_from_ms: int | None = None  # earliest candle whose values need a recompute
    has_stored_rows: bool = False


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

    def dirty(self) -> list[JobKey]:
        return sorted(k for k, s in self._series.items() if s.dirty_from_ms is not None)

    async def repair(
        self, write: Callable[[CandleBatch], Awaitable[int]], keys: list[JobKey] | None = None
    ) -> int:
        """Recompute every dirty series (of `keys`, default all) from its first stored candle;
        rewrite the changed tail.

        `write` must make rows durable without passing them through `prepare` again."""
        rewritten = 0
        for key in self.dirty():
            if keys is not None and key not in keys:
                continue
            series = self._series[key]
            stored = await self._store.series(key)
            if not len(stored):
                self._series[key] = _Series()
                await self._commit(key, _Series())()
                continue
            values, state = compute(stored.close, initial_state(self.spec), self.spec)
            tail = stored.timestamps >= (series.dirty_from_ms or 0)
            enriched = replace(stored, extra=values).select(tail)
            rewritten += await write(enriched)
            repaired = _Series(int(stored.timestamps[-1]), state, None, has_stored_rows=True)
            self._series[key] = repaired
            await self._commit(key, repaired)()
            self._events.info(
                "indicators_recomputed",
                f"{key}: indicators recomputed from the first stored candle",
                exchange=key.exchange,
                symbol=key.symbol,
                timeframe=key.timeframe,
                rows=len(enriched),
            )
        return rewritten
