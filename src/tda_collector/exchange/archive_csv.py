"""One archive file's candles: zip → CSV → Arrow → an (n, 6) float64 matrix (pure).

The CSV has Binance's 12 kline columns (open time, open, high, low, close, volume, close time,
quote volume, trades, taker buy base, taker buy quote, ignore); only the first six are read.
Spot files have no header; futures files have one in newer files only, so the first line is
sniffed. Spot open times are in microseconds from 2025-01-01 on and milliseconds before
(futures: always milliseconds), so the unit is decided per file by magnitude: a wrong guess
would give 1970 dates or rows silently shifted. The matrix is the shape REST pages normalise
from, so both go through the one `normalize.normalize_page`. Arrow's float parsing is correctly
rounded, as the REST path's is: an archived price is the same float as the REST one.
"""

from __future__ import annotations

import io
import struct
import zipfile
from typing import cast

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
from zlib_ng import zlib_ng

_FIELDS = [f"f{i}" for i in range(6)]
_CONVERT = pa_csv.ConvertOptions(
    column_types={"f0": pa.int64(), **dict.fromkeys(_FIELDS[1:], pa.float64())},
    include_columns=_FIELDS,
)
# Open times at or above this are microseconds: 10**14 ms is the year 5138, 10**14 µs is 1973.
MICROSECONDS_FROM = 10**14


# zlib-ng's stub declares `error` as an instance of Exception; at run time it is the class.
_INFLATE_ERROR = cast(type[Exception], zlib_ng.error)


class ArchiveFormatError(ValueError):
    """A file that is not one CSV of klines in a zip, or whose times mix units."""


def _inflate(data: bytes, member: zipfile.ZipInfo) -> bytes | None:
    """A deflated member inflated by zlib-ng (half the CPU of the zlib `zipfile` uses), or
    None for any other compression. Its CRC is not checked again: the whole zip has passed
    its sha256 already."""
    if member.compress_type != zipfile.ZIP_DEFLATED:
        return None
    at = member.header_offset
    if data[at : at + 4] != b"PK\x03\x04":
        raise ArchiveFormatError("a zip member without its local header")
    name_length, extra_length = struct.unpack("<HH", data[at + 26 : at + 30])
    start = at + 30 + name_length + extra_length
    text: bytes = zlib_ng.decompress(data[start : start + member.compress_size], wbits=-15)
    if len(text) != member.file_size:
        raise ArchiveFormatError("a zip member shorter than its directory says")
    return text


def csv_of_zip(data: bytes) -> bytes:
    """The one CSV member of an archive zip."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [m for m in archive.infolist() if m.filename.lower().endswith(".csv")]
            if len(members) != 1:
                raise ArchiveFormatError(f"expected one CSV in the zip, found {len(members)}")
            text = _inflate(data, members[0])
            return text if text is not None else archive.read(members[0])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, _INFLATE_ERROR) as exc:
        raise ArchiveFormatError(f"not a readable zip: {exc}") from None


def _has_header(text: bytes) -> bool:
    first = text.lstrip()[:1]
    return bool(first) and not first.isdigit()


def klines_of_csv(text: bytes) -> np.ndarray:
    """The file's candles as (open time in ms, open, high, low, close, volume) rows."""
    if not text.strip():
        return np.empty((0, 6))
    read = pa_csv.ReadOptions(
        autogenerate_column_names=True, skip_rows=int(_has_header(text)), use_threads=False
    )
    try:
        table = pa_csv.read_csv(pa.py_buffer(text), read_options=read, convert_options=_CONVERT)
    except (pa.ArrowInvalid, pa.ArrowKeyError) as exc:
        raise ArchiveFormatError(f"not kline CSV: {str(exc).splitlines()[0]}") from None
    if any(column.null_count for column in table.columns):
        raise ArchiveFormatError("kline CSV with empty fields")
    times = table.column(0).to_numpy()
    if len(times) and times.max() >= MICROSECONDS_FROM:
        if times.min() < MICROSECONDS_FROM:
            raise ArchiveFormatError("open times mix milliseconds and microseconds")
        times = times // 1000
    matrix = np.empty((table.num_rows, 6))
    matrix[:, 0] = times
    for i in range(1, 6):
        matrix[:, i] = table.column(i).to_numpy()
    return matrix


def klines_of_zip(data: bytes) -> np.ndarray:
    """`klines_of_csv` of the zip's one CSV; ArchiveFormatError when it is not that."""
    return klines_of_csv(csv_of_zip(data))
