"""The archive's layout, its CSV files and the download client, against the fake archive host."""

from __future__ import annotations

import asyncio
import io
import zipfile

import numpy as np
import pytest
from collector_support import free_port
from fake_archive import SPOT_MICROSECONDS_FROM_MS, FakeArchive, zip_of
from fake_exchange import SymbolSpec, expected_candles

from tda_collector.config import ExchangeConfig
from tda_collector.errors import UsageError
from tda_collector.exchange.archive import ArchiveClient, ArchiveUnavailable, expected_sha256
from tda_collector.exchange.archive_csv import ArchiveFormatError, klines_of_csv, klines_of_zip
from tda_collector.exchange.archive_layout import ARCHIVE_LAYOUTS, plan_files
from tda_collector.exchange.runtime import archive_tools
from tda_collector.exchange.source import MarketInfo
from tda_collector.retry import RetryPolicy
from tda_collector.timeframes import DAY_MS, grid_of

SPOT, UM = ARCHIVE_LAYOUTS["binance"], ARCHIVE_LAYOUTS["binanceusdm"]
JAN_2025 = SPOT_MICROSECONDS_FROM_MS
DEC_2024 = JAN_2025 - 31 * DAY_MS
FEB_2025 = JAN_2025 + 31 * DAY_MS
NOW_MS = FEB_2025 + 19 * DAY_MS + DAY_MS // 2  # 2025-02-20T12:00Z
BTC = SymbolSpec("BTC/USDT")
POLICY = RetryPolicy(base_s=0.01, cap_s=0.02, attempts=3)


def names(files):
    return [f.name for f in files]


def test_whole_published_months_are_monthly_files_the_other_whole_days_daily():
    gap = (DEC_2024 + 10 * DAY_MS + 3_600_000, NOW_MS)  # from 2024-12-11T01:00Z
    files = plan_files(SPOT, "BTCUSDT", grid_of("1m"), gap, NOW_MS)
    assert names(files) == [
        *(f"BTCUSDT-1m-2024-12-{day:02d}.zip" for day in range(12, 32)),
        "BTCUSDT-1m-2025-01.zip",  # ended 20 days ago: published
        *(f"BTCUSDT-1m-2025-02-{day:02d}.zip" for day in range(1, 20)),  # Feb: not yet
    ]
    assert files[0].path == "data/spot/daily/klines/BTCUSDT/1m/BTCUSDT-1m-2024-12-12.zip"
    assert files[20].path == "data/spot/monthly/klines/BTCUSDT/1m/BTCUSDT-1m-2025-01.zip"
    assert files[20].span == (JAN_2025, FEB_2025)
    # The partial first day and today are left to REST.
    assert files[0].span[0] == DEC_2024 + 11 * DAY_MS and files[-1].span[1] == NOW_MS - DAY_MS // 2


def test_a_month_ended_a_few_days_ago_comes_as_daily_files():
    now = FEB_2025 + 3 * DAY_MS  # before the first Monday's upload of January's file
    files = plan_files(UM, "BTCUSDT", grid_of("1h"), (JAN_2025, now), now)
    assert len(files) == 31 + 3 and not any(f.monthly for f in files)
    assert files[0].path == "data/futures/um/daily/klines/BTCUSDT/1h/BTCUSDT-1h-2025-01-01.zip"


def test_a_month_of_1s_candles_comes_as_daily_files_which_hold_a_bounded_number():
    files = plan_files(SPOT, "BTCUSDT", grid_of("1s"), (DEC_2024, JAN_2025), NOW_MS)
    assert len(files) == 31 and files[0].name == "BTCUSDT-1s-2024-12-01.zip"


def test_weekly_and_monthly_candles_have_only_monthly_files_named_as_the_archive_names_them():
    weeks = plan_files(SPOT, "BTCUSDT", grid_of("1w"), (DEC_2024 - 6 * DAY_MS, NOW_MS), NOW_MS)
    # The weeks opening in December 2024 (Mondays 2, 9, 16, 23, 30), then January 2025's.
    assert names(weeks) == ["BTCUSDT-1w-2024-12.zip", "BTCUSDT-1w-2025-01.zip"]
    assert weeks[0].span == (DEC_2024 + DAY_MS, JAN_2025 + 5 * DAY_MS)
    months = plan_files(SPOT, "BTCUSDT", grid_of("1M"), (DEC_2024, NOW_MS), NOW_MS)
    assert months[0].path == "data/spot/monthly/klines/BTCUSDT/1mo/BTCUSDT-1mo-2024-12.zip"
    assert plan_files(SPOT, "BTCUSDT", grid_of("1w"), (JAN_2025, JAN_2025 + DAY_MS), NOW_MS) == []


def test_spot_files_switch_to_microseconds_and_read_back_in_milliseconds():
    archive = FakeArchive([BTC], clock=lambda: NOW_MS / 1000)
    before = archive.csv_of("BTCUSDT-1m-2024-12-31.zip")
    after = archive.csv_of("BTCUSDT-1m-2025-01-01.zip")
    assert before.split(b",")[0] == str(JAN_2025 - DAY_MS).encode()
    assert after.split(b",")[0] == str(JAN_2025 * 1000).encode()  # microseconds
    for text, day in ((before, JAN_2025 - DAY_MS), (after, JAN_2025)):
        matrix = klines_of_csv(text)
        expected = expected_candles(BTC, "1m", day, day + DAY_MS, NOW_MS)
        assert [tuple(row) for row in matrix.tolist()] == expected


def test_futures_files_with_and_without_a_header_read_the_same():
    archive = FakeArchive(
        [BTC], clock=lambda: NOW_MS / 1000, microseconds_from_ms=None, header_from_ms=JAN_2025
    )
    old, new = archive.csv_of("BTCUSDT-1h-2024-12.zip"), archive.csv_of("BTCUSDT-1h-2025-01.zip")
    assert old[:1].isdigit() and new.startswith(b"open_time,open,")
    assert klines_of_csv(new)[0, 0] == JAN_2025  # futures stay in milliseconds
    assert len(klines_of_csv(old)) == 31 * 24 and len(klines_of_csv(new)) == 31 * 24


def test_files_that_are_not_kline_zips_are_refused_loudly():
    with pytest.raises(ArchiveFormatError):
        klines_of_zip(b"not a zip")
    with pytest.raises(ArchiveFormatError):
        klines_of_zip(zip_of("x.zip", b"1,2,3\n"))
    mixed = b"1735689540000,1,1,1,1,1,0,0,0,0,0,0\n1735689600000000,1,1,1,1,1,0,0,0,0,0,0\n"
    with pytest.raises(ArchiveFormatError, match="mix"):
        klines_of_csv(mixed)
    assert klines_of_csv(b"").shape == (0, 6)
    row = b"1704067200000,1.5,2,1,1.25,10,1704067259999,0,1,0,0,0\n"
    good = zip_of("x.zip", row * 2000)
    damaged = good[:60] + bytes(b ^ 0xFF for b in good[60:90]) + good[90:]
    with pytest.raises(ArchiveFormatError):
        klines_of_zip(damaged)


def test_a_stored_zip_member_reads_as_well_as_a_deflated_one():
    row = b"1704067200000,1.5,2,1,1.25,10,1704067259999,0,1,0,0,0\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("x.csv", row)
    assert klines_of_zip(buffer.getvalue()).tolist() == [[1704067200000, 1.5, 2, 1, 1.25, 10]]
    assert klines_of_zip(zip_of("x.zip", row)).tolist() == [[1704067200000, 1.5, 2, 1, 1.25, 10]]


def test_checksum_files_name_their_digest():
    digest = "ab" * 32
    assert expected_sha256(f"{digest.upper()}  BTCUSDT-1m-2025-01.zip\n".encode()) == digest
    assert expected_sha256(b"garbage") is None


def fetch(archive: FakeArchive, file, base_url: str | None = None):
    async def go():
        client = ArchiveClient(base_url or archive.base_url, 2, POLICY)
        try:
            return await client.fetch(file)
        finally:
            await client.close()

    return asyncio.run(go())


def test_the_client_verifies_refetches_once_and_reports_404s():
    two_days = (JAN_2025, JAN_2025 + 2 * DAY_MS)
    good, absent = plan_files(SPOT, "BTCUSDT", grid_of("1m"), two_days, NOW_MS)
    bad = plan_files(SPOT, "ETHUSDT", grid_of("1m"), two_days, NOW_MS)[0]
    with FakeArchive(
        [BTC, SymbolSpec("ETH/USDT")],
        clock=lambda: NOW_MS / 1000,
        bad_checksum=[bad.name],
        missing=[absent.name],
    ) as archive:
        missing = fetch(archive, absent)
        assert (missing.outcome, missing.data) == ("missing", b"")
        ok = fetch(archive, good)
        assert ok.outcome == "ok" and ok.size > len(ok.data) > 0
        rows = klines_of_zip(ok.data)
        assert np.array_equal(rows[:, 0], np.arange(*good.span, 60_000))
        corrupt = fetch(archive, bad)
        assert corrupt.outcome == "corrupt" and "sha256" in corrupt.error
        assert len([r for r in archive.archive_requests() if r.path.endswith(bad.name)]) == 2


def test_server_errors_are_retried_then_the_file_is_reported_failed():
    file = plan_files(SPOT, "BTCUSDT", grid_of("1m"), (JAN_2025, JAN_2025 + DAY_MS), NOW_MS)[0]
    with FakeArchive([BTC], clock=lambda: NOW_MS / 1000) as archive:
        archive.fail_next = 2
        assert fetch(archive, file).outcome == "ok"
        archive.fail_next = 3  # POLICY's three attempts
        failed = fetch(archive, file)
        assert failed.outcome == "failed" and "503" in failed.error


def test_a_host_that_cannot_be_reached_is_unavailable_at_once():
    file = plan_files(SPOT, "BTCUSDT", grid_of("1m"), (JAN_2025, FEB_2025), NOW_MS)[0]
    archive = FakeArchive([BTC])
    with pytest.raises(ArchiveUnavailable):
        fetch(archive, file, base_url=f"http://127.0.0.1:{free_port()}")


class _Markets:
    def markets(self):
        return [MarketInfo("BTC/USDT", "USDT", "spot", True, id="BTCUSDT")]


def test_archives_are_on_by_default_where_one_is_known_and_asking_elsewhere_names_the_field():
    spot = ExchangeConfig(id="binance", symbols=["BTC/USDT"])
    tools = archive_tools(spot, _Markets(), "x", POLICY)
    assert tools is not None and tools.base_url == "https://data.binance.vision"
    assert tools.layout.market_path == "data/spot" and tools.market_ids == {"BTC/USDT": "BTCUSDT"}
    local = ExchangeConfig(id="binanceusdm", symbols=["X"], archive={"base_url": "http://h:1"})
    assert archive_tools(local, _Markets(), "x", POLICY).base_url == "http://h:1"
    off = ExchangeConfig(id="binance", symbols=["BTC/USDT"], archive={"enabled": False})
    assert archive_tools(off, _Markets(), "x", POLICY) is None
    okx = ExchangeConfig(id="okx", symbols=["BTC/USDT"])
    assert archive_tools(okx, _Markets(), "x", POLICY) is None
    asked = ExchangeConfig(id="okx", symbols=["BTC/USDT"], archive={"enabled": True})
    with pytest.raises(UsageError, match=r"^exchanges\[0\]\.archive\.enabled: no known archive"):
        archive_tools(asked, _Markets(), "exchanges[0].archive", POLICY)
