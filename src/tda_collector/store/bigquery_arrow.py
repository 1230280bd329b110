"""What the Storage Write API's AppendRows takes: an Arrow schema and record batches, in bytes.

Pure functions over a `conform`ed table (the store's columns, typed for BigQuery): no per-row
JSON, no client. A request may carry at most 10 MB (BigQuery answers INVALID_ARGUMENT above
that), and gRPC servers that keep gRPC's default receive limit (4 MiB: the emulator, many
proxies) refuse less, so each request's batch is cut to `MAX_REQUEST_BYTES`.
https://cloud.google.com/bigquery/docs/write-api#limitations
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

# Under gRPC's default 4 MiB receive limit with room for the request's other fields; also far
# under BigQuery's own 10 MB per AppendRows request.
MAX_REQUEST_BYTES = 3_500_000


@dataclass(frozen=True)
class Payload:
    """One AppendRows request's rows: a serialized Arrow record batch and its row count."""

    rows: int
    data: bytes


def serialized_schema(schema: pa.Schema) -> bytes:
    """The Arrow IPC schema message that `arrow_rows.writer_schema` carries."""
    return bytes(schema.serialize().to_pybytes())


def payloads(table: pa.Table, max_bytes: int = MAX_REQUEST_BYTES) -> list[Payload]:
    """`table`'s rows as consecutive record batches of at most `max_bytes` serialized each, in
    order. A single row larger than that is still one payload (BigQuery names it when it
    refuses the request)."""
    if table.num_rows == 0:
        return []
    batch = table.combine_chunks().to_batches()[0]
    # Arrow's buffer size is close to its IPC size; aim under the limit, then check.
    rows_per = max(1, int(batch.num_rows * max_bytes * 0.8 / max(batch.nbytes, 1)))
    found: list[Payload] = []
    for start in range(0, batch.num_rows, rows_per):
        found.extend(_within(batch.slice(start, rows_per), max_bytes))
    return found


def _within(batch: pa.RecordBatch, max_bytes: int) -> list[Payload]:
    data = bytes(batch.serialize().to_pybytes())
    if len(data) <= max_bytes or batch.num_rows == 1:
        return [Payload(batch.num_rows, data)]
    half = batch.num_rows // 2
    return [*_within(batch.slice(0, half), max_bytes), *_within(batch.slice(half), max_bytes)]


def _contents(table: pa.Table) -> list[tuple[Any, ...]]:
    """Each row's values but its write time: what makes two writes of a row the same row."""
    return [tuple(row.values()) for row in table.drop_columns(["ingested_at"]).to_pylist()]


class LandedRows:
    """Rows in the table whose writers were told their write failed (an append whose every
    retry failed, then sent again and acknowledged). When a writer sends such a row again, the
    same in every column but `ingested_at`, it is left out of the append, once per landed row:
    its writer's retry finds it stored instead of storing it twice."""

    def __init__(self) -> None:
        self._rows: Counter[tuple[Any, ...]] = Counter()

    def hold(self, table: pa.Table) -> None:
        self._rows.update(_contents(table))

    def without(self, table: pa.Table) -> pa.Table:
        """`table` less the rows held (each taken once)."""
        if not self._rows:
            return table
        keep = []
        for index, row in enumerate(_contents(table)):
            if self._rows[row] > 0:
                self._rows[row] -= 1
            else:
                keep.append(index)
        self._rows = +self._rows  # drop the rows used up
        return table if len(keep) == table.num_rows else table.take(pa.array(keep, pa.int64()))
