"""Pure parts of the BigQuery store: identifiers, schema, SQL, row encoding, error triage.

No client calls here, so everything is tested without a server. SQL is built only from
identifiers validated by `TableNames`; every value travels as a query parameter.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from google.cloud import bigquery

from ..errors import UsageError
from ..models import Column, JobKey
from .reads import CandleQuery, utc_datetime

# Project ids also allow "-"; dataset and table names are letters, digits and underscores.
_PROJECT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,1000}")

_ARROW_TYPES = {
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
    "STRING": pa.string(),
    "FLOAT64": pa.float64(),
    "BOOL": pa.bool_(),
    "INT64": pa.int64(),
}
# The REST API reports legacy type names; Column uses the standard-SQL ones.
_API_TYPES = {"FLOAT64": "FLOAT", "BOOL": "BOOLEAN", "INT64": "INTEGER"}
_SQL_TYPES = {api: sql for sql, api in _API_TYPES.items()}

# Per-row streaming error reasons worth sending again with the same row id. "stopped" marks a
# row that was fine but not inserted because another row of the request was invalid.
# https://cloud.google.com/bigquery/docs/error-messages
RETRYABLE_REASONS = frozenset(
    {"stopped", "backendError", "internalError", "timeout", "rateLimitExceeded", "quotaExceeded"}
)

# BigQuery's limits are 50,000 rows and 10 MB per insertAll request; it recommends 500 rows.
MAX_ROWS_PER_REQUEST = 500
MAX_BYTES_PER_REQUEST = 5_000_000


@dataclass(frozen=True)
class TableNames:
    """Validated, fully qualified names of the table and its one-row-per-key view."""

    project: str
    dataset: str
    table: str

    def __post_init__(self) -> None:
        for field, value, pattern in (
            ("project", self.project, _PROJECT_RE),
            ("dataset", self.dataset, _NAME_RE),
            ("table", self.table, _NAME_RE),
        ):
            if not pattern.fullmatch(value):
                allowed = "letters, digits, _ and -" if field == "project" else "letters, digits, _"
                raise UsageError(f"storage.bigquery.{field}: {value!r} may only hold {allowed}")

    @property
    def dataset_id(self) -> str:
        return f"{self.project}.{self.dataset}"

    @property
    def table_id(self) -> str:
        return f"{self.dataset_id}.{self.table}"

    @property
    def view_id(self) -> str:
        return f"{self.table_id}_latest"


def schema_fields(columns: Sequence[Column]) -> list[bigquery.SchemaField]:
    return [
        bigquery.SchemaField(
            c.name,
            _API_TYPES.get(c.sql_type, c.sql_type),
            mode="NULLABLE" if c.nullable else "REQUIRED",
        )
        for c in columns
    ]


def check_types(columns: Sequence[Column]) -> None:
    unknown = sorted({c.sql_type for c in columns} - set(_ARROW_TYPES))
    if unknown:
        raise ValueError(f"BigQuery store: unsupported column types {unknown}")


def missing_fields(
    existing: Sequence[bigquery.SchemaField], wanted: Sequence[Column]
) -> list[bigquery.SchemaField]:
    """Wanted columns the table lacks, as NULLABLE fields (all that BigQuery can add).

    A missing REQUIRED column means the table is not one of ours: that is a usage error.
    """
    have = {f.name.lower() for f in existing}
    absent = [c for c in wanted if c.name.lower() not in have]
    required = [c.name for c in absent if not c.nullable]
    if required:
        raise UsageError(
            f"storage.bigquery.table: the existing table lacks required column(s) "
            f"{', '.join(required)}; point the config at another table"
        )
    return schema_fields(absent)


def layout_differences(
    table: bigquery.Table, partitioning: str, clustering: Sequence[str]
) -> list[str]:
    """How an existing table's partitioning and clustering differ from what we would create."""
    found = table.time_partitioning
    differences = []
    if found is None or found.field != "timestamp" or found.type_ != partitioning:
        seen = f"{found.type_} on {found.field or '_PARTITIONTIME'}" if found else "none"
        differences.append(f"partitioning is {seen}, expected {partitioning} on timestamp")
    if list(table.clustering_fields or []) != list(clustering):
        differences.append(
            f"clustering is {table.clustering_fields or 'none'}, expected {list(clustering)}"
        )
    return differences


def partition_ids(timestamps_ms: np.ndarray, partitioning: str) -> set[object]:
    """The partitions (days or months) that rows with these open times land in."""
    unit = "D" if partitioning == "DAY" else "M"
    return set(np.unique(timestamps_ms.astype("datetime64[ms]").astype(f"datetime64[{unit}]")))


def latest_view_sql(names: TableNames) -> str:
    """One row per key: a closed version before an open one, then the newest write."""
    return f"""CREATE OR REPLACE VIEW `{names.view_id}` AS
SELECT * FROM `{names.table_id}`
WHERE TRUE
QUALIFY ROW_NUMBER() OVER (
  PARTITION BY exchange, symbol, timeframe, timestamp
  ORDER BY IF(is_closed, 0, 1), ingested_at DESC
) = 1"""


def newest_query(
    names: TableNames, keys: Sequence[JobKey], closed_only: bool
) -> tuple[str, bigquery.QueryJobConfig]:
    """The newest candle open time per key, with the keys passed as an array of structs."""
    sql = f"""SELECT t.exchange, t.symbol, t.timeframe, UNIX_MILLIS(MAX(t.timestamp)) AS newest_ms
FROM `{names.table_id}` AS t
JOIN UNNEST(@keys) AS k
  ON t.exchange = k.exchange AND t.symbol = k.symbol AND t.timeframe = k.timeframe
WHERE NOT @closed_only OR t.is_closed IS NOT FALSE
GROUP BY t.exchange, t.symbol, t.timeframe"""
    structs = [
        bigquery.StructQueryParameter(
            None,
            *(
                bigquery.ScalarQueryParameter(name, "STRING", getattr(key, name))
                for name in ("exchange", "symbol", "timeframe")
            ),
        )
        for key in keys
    ]
    config = bigquery.QueryJobConfig(
        query_parameters=[
            bigquery.ArrayQueryParameter("keys", "STRUCT", structs),
            bigquery.ScalarQueryParameter("closed_only", "BOOL", closed_only),
        ]
    )
    return sql, config


def series_query(
    names: TableNames, key: JobKey, extra: Sequence[Column]
) -> tuple[str, bigquery.QueryJobConfig]:
    """One series' closed candles as users query them (the view), oldest first, with the
    `extra` columns (the store's own, so validated identifiers)."""
    selected = "".join(f", `{c.name}`" for c in extra)
    sql = f"""SELECT UNIX_MILLIS(timestamp) AS ts, open, high, low, close, volume{selected}
FROM `{names.view_id}`
WHERE exchange = @exchange AND symbol = @symbol AND timeframe = @timeframe
  AND is_closed IS NOT FALSE
ORDER BY timestamp"""
    config = bigquery.QueryJobConfig(
        query_parameters=[
            bigquery.ScalarQueryParameter(name, "STRING", getattr(key, name))
            for name in ("exchange", "symbol", "timeframe")
        ]
    )
    return sql, config


def read_query(names: TableNames, query: CandleQuery) -> tuple[str, bigquery.QueryJobConfig]:
    """One series' rows in the query's range as users query them (the view), every column,
    oldest first; all values are parameters."""
    sql = f"""SELECT * FROM `{names.view_id}`
WHERE exchange = @exchange AND symbol = @symbol AND timeframe = @timeframe
  AND timestamp >= @start AND timestamp < @end
  AND (NOT @closed_only OR is_closed IS NOT FALSE)
ORDER BY timestamp{" LIMIT @limit" if query.limit is not None else ""}"""
    key = query.key
    parameters = [
        *(
            bigquery.ScalarQueryParameter(name, "STRING", getattr(key, name))
            for name in ("exchange", "symbol", "timeframe")
        ),
        bigquery.ScalarQueryParameter("start", "TIMESTAMP", utc_datetime(query.start_ms)),
        bigquery.ScalarQueryParameter("end", "TIMESTAMP", utc_datetime(query.end_ms)),
        bigquery.ScalarQueryParameter("closed_only", "BOOL", query.closed_only),
    ]
    if query.limit is not None:
        parameters.append(bigquery.ScalarQueryParameter("limit", "INT64", query.limit))
    return sql, bigquery.QueryJobConfig(query_parameters=parameters)


def conform(table: pa.Table, fields: Sequence[bigquery.SchemaField]) -> pa.Table:
    """`table` with exactly `fields`' columns, in order, typed for BigQuery (UTC timestamps,
    REQUIRED as non-nullable so a Parquet load matches the table's modes); absent ones null."""
    by_name = {name.lower(): name for name in table.column_names}  # BigQuery ignores case
    columns, schema = [], []
    for f in fields:
        arrow_type = _ARROW_TYPES[_SQL_TYPES.get(f.field_type, f.field_type)]
        name = by_name.get(f.name.lower())
        if name is None:
            columns.append(pa.nulls(table.num_rows, arrow_type))
        else:
            column = table[name]
            if pa.types.is_timestamp(column.type) and column.type.tz is None:
                column = pc.assume_timezone(column, "UTC")
            columns.append(column.cast(arrow_type))
        schema.append(pa.field(f.name, arrow_type, nullable=f.mode != "REQUIRED"))
    return pa.Table.from_arrays(columns, schema=pa.schema(schema))


def stream_rows(table: pa.Table) -> tuple[list[dict[str, Any]], list[str]]:
    """JSON rows for insertAll (from a `conform`ed table) and their row ids.

    A row id is a hash of the key and `ingested_at`: a request sent again (a retry of the same
    write) carries the same ids and BigQuery drops the copies, while a later write of the same
    candle is a new version with new ids.
    """
    for i, f in enumerate(table.schema):
        if pa.types.is_timestamp(f.type):
            # Text such as "2024-01-01 00:00:00.123000Z" keeps microseconds exact; JSON floats
            # of epoch seconds would not.
            table = table.set_column(i, f.name, table[f.name].cast(pa.string()))
    rows = table.to_pylist()
    return rows, [_row_id(row) for row in rows]


def _row_id(row: dict[str, Any]) -> str:
    version = "|".join(
        str(row[name]) for name in ("exchange", "symbol", "timeframe", "timestamp", "ingested_at")
    )
    return hashlib.blake2b(version.encode(), digest_size=16).hexdigest()


def chunks(
    rows: Sequence[dict[str, Any]],
    ids: Sequence[str],
    max_rows: int = MAX_ROWS_PER_REQUEST,
    max_bytes: int = MAX_BYTES_PER_REQUEST,
) -> Iterator[tuple[list[dict[str, Any]], list[str]]]:
    """Consecutive slices of at most `max_rows` rows and about `max_bytes` of JSON."""
    start, size = 0, 0
    for i, row in enumerate(rows):
        row_bytes = len(json.dumps(row)) + len(ids[i])
        if i > start and (i - start >= max_rows or size + row_bytes > max_bytes):
            yield list(rows[start:i]), list(ids[start:i])
            start, size = i, 0
        size += row_bytes
    if start < len(rows):
        yield list(rows[start:]), list(ids[start:])


@dataclass(frozen=True)
class RowErrors:
    """insertAll's per-row errors sorted into what to send again and what can never succeed."""

    retry: list[int]
    rejected: dict[int, str]  # row index -> reason and message

    @classmethod
    def of(cls, errors: Sequence[dict[str, Any]]) -> RowErrors:
        retry, rejected = [], {}
        for entry in errors:
            details = entry.get("errors") or [{"reason": "unknown"}]
            reasons = {d.get("reason", "unknown") for d in details}
            if reasons <= RETRYABLE_REASONS:
                retry.append(int(entry["index"]))
            else:
                worst = next(d for d in details if d.get("reason") not in RETRYABLE_REASONS)
                where = f" at {worst['location']}" if worst.get("location") else ""
                rejected[int(entry["index"])] = (
                    f"{worst.get('reason', 'unknown')}{where}: {worst.get('message', '')}"
                )
        return cls(sorted(retry), rejected)
