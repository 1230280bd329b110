"""A store fake with fault knobs (after dlt's fake destination), on the CandleStore contract."""

from __future__ import annotations

from tda_collector.models import CandleBatch, JobKey


class MemoryStore:
    name = "memory"

    def __init__(self) -> None:
        self.rows: dict[tuple[JobKey, int], tuple] = {}
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
        return len(batch)

    def series(self, key: JobKey) -> list[tuple]:
        return [row for (k, _), row in sorted(self.rows.items(), key=lambda kv: kv[0][1]) if k == key]

    async def newest(self, keys: list[JobKey], closed_only: bool = True) -> dict[JobKey, int]:
        newest: dict[JobKey, int] = {}
        for (key, ts), row in self.rows.items():
            if key in keys and (row[6] or not closed_only):
                newest[key] = max(newest.get(key, ts), ts)
        return newest

    async def close(self) -> None:
        return None
