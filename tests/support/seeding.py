"""A DuckDB file holding long series, made fast with SQL (for reads of a year of 1m)."""

from __future__ import annotations

import asyncio

import duckdb
from google.cloud import bigquery
from store_support import quiet_events

from tda_collector.config import IndicatorsConfig
from tda_collector.models import TABLE_NAME, JobKey
from tda_collector.modes.indicator_stage import indicator_columns
from tda_collector.store.duckdb_store import DuckDBStore

MIN = 60_000
YEAR_OF_MINUTES = 525_600

_SEED_SQL = f"""INSERT INTO {TABLE_NAME}
SELECT make_timestamp(($start + i * 60000) * 1000) AS timestamp,
       $exchange, $symbol, '1m',
       100 + sin(i / 500.0) * 10 AS open, 111 + sin(i / 500.0) * 10 AS high,
       89 + sin(i / 500.0) * 10 AS low, 100.5 + sin(i / 500.0) * 10 AS close,
       (i % 97) + 0.25 AS volume, make_timestamp($start * 1000) AS ingested_at, true AS is_closed,
       COLUMNS(* EXCLUDE (i))
FROM (SELECT i, {{indicators}} FROM range($count) AS r(i))"""


def seed_minutes(path: str, key: JobKey, start_ms: int, count: int) -> float:
    """`count` closed 1m candles of `key` from `start_ms` (indicator columns filled), written
    into the DuckDB file at `path` with the collector's own table; returns the sum of `close`."""

    async def ensure() -> None:
        spec = IndicatorsConfig().spec()
        store = DuckDBStore(path, quiet_events(), indicator_columns(spec))
        await store.ensure()
        await store.close()

    asyncio.run(ensure())
    with duckdb.connect(path) as con:
        names = [
            row[0]
            for row in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ? "
                "ORDER BY ordinal_position",
                [TABLE_NAME],
            ).fetchall()
        ]
        indicators = ", ".join(f"cos(i / 77.0) + {n} AS {c}" for n, c in enumerate(names[11:]))
        sql = _SEED_SQL.replace("{indicators}", indicators)
        params = {"start": start_ms, "count": count, "exchange": key.exchange, "symbol": key.symbol}
        con.execute(sql, params)
        (total,) = con.execute(
            f"SELECT sum(close) FROM {TABLE_NAME} WHERE symbol = ?", [key.symbol]
        ).fetchone()
    return float(total)


def seed_minutes_bigquery(
    client: bigquery.Client, table_id: str, start_ms: int, count: int
) -> float:
    """The same candles as `seed_minutes` (series binance BTC/USDT 1m) in an ensured BigQuery
    table (`project.dataset.table`, the emulator's), by one INSERT; returns the sum of
    `close` read back through the `_latest` view."""
    table = client.get_table(table_id)
    indicators = ", ".join(
        f"COS(i / 77.0) + {n} AS {f.name}" for n, f in enumerate(table.schema[11:])
    )
    wave = "SIN(i / 500.0) * 10"
    client.query(
        f"""INSERT INTO `{table_id}`
SELECT TIMESTAMP_MILLIS({start_ms} + i * 60000), 'binance', 'BTC/USDT', '1m',
       100 + {wave}, 111 + {wave}, 89 + {wave}, 100.5 + {wave}, MOD(i, 97) + 0.25,
       TIMESTAMP_MILLIS({start_ms}), TRUE, {indicators}
FROM UNNEST(GENERATE_ARRAY(0, {count} - 1)) AS i"""
    ).result()
    [(total,)] = client.query(
        f"SELECT SUM(close) FROM `{table_id}_latest` WHERE symbol = 'BTC/USDT'"
    ).result()
    return float(total)
