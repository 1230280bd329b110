"""Typed records that flow between layers: job keys, candle batches and the table's columns."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

# One exchange page: rows starting [open_ms, open, high, low, close, volume] (numbers or numeric
# strings), or the same as an (n, 6) float64 matrix.
RawCandles = list[list[Any]] | np.ndarray

TABLE_NAME = "market_data_ohlcv"
KEY_COLUMNS = ("exchange", "symbol", "timeframe", "timestamp")
PRICE_COLUMNS = ("open", "high", "low", "close", "volume")


@dataclass(frozen=True, order=True)
class JobKey:
    """One series the collector keeps: an (exchange, symbol, timeframe)."""

    exchange: str
    symbol: str
    timeframe: str

    def __str__(self) -> str:
        return f"{self.exchange}:{self.symbol}:{self.timeframe}"


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str  # the DuckDB and BigQuery standard-SQL spelling where they agree
    nullable: bool = True


# The interface's table. Extra columns (closed flag, indicators) are NULLABLE, so a store's
# ensure step can add them to existing tables.
BASE_COLUMNS: tuple[Column, ...] = (
    Column("timestamp", "TIMESTAMP", nullable=False),
    Column("exchange", "STRING", nullable=False),
    Column("symbol", "STRING", nullable=False),
    Column("timeframe", "STRING", nullable=False),
    *(Column(name, "FLOAT64", nullable=False) for name in PRICE_COLUMNS),
    Column("ingested_at", "TIMESTAMP", nullable=False),
    Column("is_closed", "BOOL"),
)


@dataclass(frozen=True)
class CandleBatch:
    """Validated candles of one series, columnar, sorted by open time, one row per timestamp.

    `closed[i]` is False only for a candle still in progress (live mode). `extra` holds
    additional float columns by name (indicators), each as long as the batch.
    """

    key: JobKey
    timestamps: np.ndarray  # int64 epoch ms
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    closed: np.ndarray  # bool
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.timestamps)

    def select(self, mask: np.ndarray) -> CandleBatch:
        """The candles where `mask` (boolean, or indices) selects them."""
        return CandleBatch(
            key=self.key,
            timestamps=self.timestamps[mask],
            open=self.open[mask],
            high=self.high[mask],
            low=self.low[mask],
            close=self.close[mask],
            volume=self.volume[mask],
            closed=self.closed[mask],
            extra={name: values[mask] for name, values in self.extra.items()},
        )

    @property
    def newest_closed_ms(self) -> int | None:
        closed_ts = self.timestamps[self.closed]
        return int(closed_ts[-1]) if len(closed_ts) else None

    @classmethod
    def closed_from_arrow(cls, key: JobKey, table: pa.Table) -> CandleBatch:
        """Closed candles from a query result with columns ts (epoch ms) and the prices; any
        other column goes to `extra` as float64, NULL as NaN."""
        column = {name: table.column(name).to_numpy() for name in ("ts", *PRICE_COLUMNS)}
        others = [name for name in table.column_names if name not in column]
        return cls(
            key=key,
            timestamps=column["ts"].astype(np.int64),
            open=column["open"],
            high=column["high"],
            low=column["low"],
            close=column["close"],
            volume=column["volume"],
            closed=np.ones(table.num_rows, dtype=bool),
            extra={
                name: table.column(name).cast(pa.float64()).to_numpy().astype(np.float64)
                for name in others
            },
        )

    def to_arrow(self, ingested_at: datetime) -> pa.Table:
        """The batch as table rows (UTC timestamps), ready for a bulk insert or load job."""
        n = len(self)

        def constant(value: object, arrow_type: pa.DataType) -> pa.Array:
            return pa.repeat(pa.scalar(value, arrow_type), n)  # no Python list of n values

        columns = {
            "timestamp": pa.array(self.timestamps, pa.timestamp("ms")),
            "exchange": constant(self.key.exchange, pa.string()),
            "symbol": constant(self.key.symbol, pa.string()),
            "timeframe": constant(self.key.timeframe, pa.string()),
            "open": pa.array(self.open, pa.float64()),
            "high": pa.array(self.high, pa.float64()),
            "low": pa.array(self.low, pa.float64()),
            "close": pa.array(self.close, pa.float64()),
            "volume": pa.array(self.volume, pa.float64()),
            "ingested_at": constant(ingested_at.replace(tzinfo=None), pa.timestamp("us")),
            "is_closed": pa.array(self.closed, pa.bool_()),
        }
        for name, values in self.extra.items():
            columns[name] = pa.array(values, pa.float64(), from_pandas=True)
        return pa.table(columns)
