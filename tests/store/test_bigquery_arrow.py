"""What AppendRows carries, without a server: Arrow record batches cut under the request limit,
rows in order and unchanged; the candle spans a pending stream's commit records; and which rows
of a resend are already in the table."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
from store_support import KEY, MIN, T0, batch

from tda_collector.models import BASE_COLUMNS, CandleBatch, JobKey
from tda_collector.store.bigquery_arrow import LandedRows, payloads, serialized_schema
from tda_collector.store.bigquery_schema import conform, schema_fields
from tda_collector.store.write_streams import candle_spans


def _read(schema: pa.Schema, data: bytes) -> pa.RecordBatch:
    return pa.ipc.read_record_batch(pa.py_buffer(data), schema)


def test_requests_stay_under_the_byte_limit_and_carry_every_row_in_order():
    table = pa.table({"ts": np.arange(50_000, dtype=np.int64), "s": ["BTC/USDT"] * 50_000})
    parts = payloads(table, max_bytes=100_000)
    assert len(parts) > 1
    assert all(len(p.data) <= 100_000 for p in parts)
    assert sum(p.rows for p in parts) == 50_000
    schema = pa.ipc.read_schema(pa.py_buffer(serialized_schema(table.schema)))
    back = pa.Table.from_batches([_read(schema, p.data) for p in parts])
    assert back.equals(table)


def test_a_row_larger_than_the_limit_is_still_sent_alone():
    table = pa.table({"s": ["x" * 1000, "y"]})
    parts = payloads(table, max_bytes=500)
    assert [p.rows for p in parts] == [1, 1]


def test_an_empty_table_needs_no_request():
    assert payloads(pa.table({"a": pa.array([], pa.int64())})) == []


def test_candle_spans_cover_closed_candles_only_and_never_the_holes_between_them():
    page = batch(KEY, T0, 5)
    page.closed[-1] = False  # the candle in progress
    holey = page.select(np.array([0, 1, 3, 4]))
    assert candle_spans(holey) == [(T0, T0 + 2 * MIN), (T0 + 3 * MIN, T0 + 4 * MIN)]


def test_candle_spans_of_months_follow_the_calendar():
    jan, feb, mar = 1_704_067_200_000, 1_706_745_600_000, 1_709_251_200_000
    ts = np.array([jan, feb], dtype=np.int64)
    z = np.zeros(2)
    months = CandleBatch(JobKey("binance", "BTC/USDT", "1M"), ts, z, z, z, z, z, np.ones(2, bool))
    assert candle_spans(months) == [(jan, mar)]


def _rows(page: CandleBatch, written_at: datetime) -> pa.Table:
    return conform(page.to_arrow(written_at), schema_fields(BASE_COLUMNS))


def test_landed_rows_leave_out_each_resent_row_once_whatever_its_write_time():
    landed = LandedRows()
    landed.hold(_rows(batch(KEY, T0, 3), datetime(2024, 1, 1, tzinfo=UTC)))
    resent = _rows(batch(KEY, T0, 4), datetime(2024, 1, 2, tzinfo=UTC))  # 3 landed, 1 new
    left = landed.without(resent)
    assert left.column("timestamp").to_pylist() == resent.column("timestamp").to_pylist()[3:]
    assert landed.without(resent).num_rows == 4  # used up: a second resend is appended


def test_landed_rows_keep_a_different_version_of_a_landed_candle():
    landed = LandedRows()
    landed.hold(_rows(batch(KEY, T0, 2), datetime(2024, 1, 1, tzinfo=UTC)))
    newer = _rows(batch(KEY, T0, 2, price=300.0), datetime(2024, 1, 2, tzinfo=UTC))
    assert landed.without(newer).num_rows == 2


def test_landed_rows_can_leave_nothing_to_append():
    landed = LandedRows()
    landed.hold(_rows(batch(KEY, T0, 2), datetime(2024, 1, 1, tzinfo=UTC)))
    assert landed.without(_rows(batch(KEY, T0, 2), datetime(2024, 1, 2, tzinfo=UTC))).num_rows == 0
