"""A store fake with fault knobs (after dlt's fake destination), on the CandleStore contract."""

from __future__ import annotations

import numpy as np

from tda_collector.models import CandleBatch, JobKey


class MemoryStore:
    name = "memory"
    pipeline_pages = 1

    def __init__(self) -> None:
        self.rows: dict[tuple[JobKey, int], tuple] = {}
        self.extra: dict[tuple[JobKey, int], dict[str, float]] = {}
        self.fail_next_writes = 0
        self.writes = 0

    async def ensure(self) -> None:
        return None

    async def write(self, batch: CandleBatch) -> int:
        if self.fail_next_writes:
            self.fail_next_writes -= 1
            raise OSError("disk full (injected)")
        self.writes += 1
        for i, ts in enumerate(batch.timestamps.tolist()):
            self.rows[(batch.key, ts)] = (
                ts,
                float(batch.open[i]),
                float(batch.high[i]),
                float(batch.low[i]),
                float(batch.close[i]),
                float(batch.volume[i]),
                bool(batch.closed[i]),
            )
            self.extra[(batch.key, ts)] = {n: float(v[i]) for n, v in batch.extra.items()}
        return len(batch)

    def series_rows(self, key: JobKey) -> list[tuple]:
        return [
            row for (k, _), row in sorted(self.rows.items(), key=lambda kv: kv[0][1]) if k == key
        ]

    async def newest(self, keys: list[JobKey], closed_only: bool = True) -> dict[JobKey, int]:
        newest: dict[JobKey, int] = {}
        for (key, ts), row in self.rows.items():
            if key in keys and (row[6] or not closed_only):
                newest[key] = max(newest.get(key, ts), ts)
        return newest

    async def series(self, key: JobKey) -> CandleBatch:
        closed = [r for r in self.series_rows(key) if r[6]]
        columns = np.array([r[:6] for r in closed], dtype=float).reshape(-1, 6)
        return CandleBatch(
            key=key,
            timestamps=columns[:, 0].astype(np.int64),
            open=columns[:, 1],
            high=columns[:, 2],
            low=columns[:, 3],
            close=columns[:, 4],
            volume=columns[:, 5],
            closed=np.ones(len(closed), dtype=bool),
        )

    async def close(self) -> None:
        return None
