"""What a BigQuery load job takes: Parquet bytes, and pages touching at most 4,000 partitions.

BigQuery allows 1,500 load jobs per table per day and 4,000 partitions touched per job, so
history writes are gathered into few jobs (a `WriteBuffer` with this partition limit).
https://cloud.google.com/bigquery/quotas#load_jobs
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

MAX_PARTITIONS_PER_JOB = 4_000


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="snappy")
    return sink.getvalue()
