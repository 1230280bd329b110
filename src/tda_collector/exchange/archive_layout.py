"""Where an exchange publishes its candles as bulk archives, and which files cover a range.

Binance's public archives (data.binance.vision; binance/binance-public-data's README) are kept
here as data, one `ArchiveLayout` per ccxt exchange id, so a new archive host is a new entry,
not a branch: `{base}/{market_path}/{daily|monthly}/klines/{MARKET_ID}/{interval}/
{MARKET_ID}-{interval}-{YYYY-MM-DD|YYYY-MM}.zip`, each with a `.zip.CHECKSUM` beside it. The
symbol is the exchange's market id (`BTCUSDT`), monthly candles are `1mo` (not `1M`), and daily
files exist only for 1s to 1d. A daily file appears the day after; a monthly one around the
first Monday of the following month. Weekly, 3-day and monthly files hold the candles whose open
time falls in the file's day or month.

`plan_files` is pure: which files to ask for over a gap of the ledger, monthly where the whole
month lies in the gap and should be published, daily for the rest; what no file covers (the
partial days at the edges, the unpublished tail) is left to REST.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..intervals import Interval
from ..timeframes import DAY_MS, Grid, grid_of

_FIXED = ("1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d")
BINANCE_INTERVALS: Mapping[str, str] = {
    **{tf: tf for tf in (*_FIXED, "3d", "1w")},
    "1M": "1mo",  # "1mo is used instead of 1M to support non-case sensitive file systems"
}
_MONTHS = grid_of("1M")


@dataclass(frozen=True)
class ArchiveLayout:
    """One exchange's archive: the path below the host of its market type, and its calendar."""

    market_path: str  # e.g. data/spot, data/futures/um
    base_url: str = "https://data.binance.vision"
    intervals: Mapping[str, str] = field(default_factory=lambda: dict(BINANCE_INTERVALS))
    daily_timeframes: frozenset[str] = frozenset(_FIXED)
    # A daily file is asked for once its day has ended (it appears "the next day"; asking a
    # little early costs one 404, and REST then fills that day).
    daily_delay_ms: int = 0
    # Monthly files appear around the first Monday of the next month: at most 7 days, plus one
    # for the upload. Until then the month's days come as daily files.
    monthly_delay_ms: int = 8 * DAY_MS
    # A file is held in memory whole while it is read and stored (one per job in flight): a
    # month of 1s candles (2.7 M rows) comes as daily files (86,400 rows) instead.
    max_monthly_candles: int = 100_000

    def interval(self, timeframe: str) -> str | None:
        """The archive's name of `timeframe`, or None if it publishes none."""
        return self.intervals.get(timeframe)


ARCHIVE_LAYOUTS: Mapping[str, ArchiveLayout] = {
    "binance": ArchiveLayout("data/spot"),
    "binanceusdm": ArchiveLayout("data/futures/um"),
    "binancecoinm": ArchiveLayout("data/futures/cm"),
}


@dataclass(frozen=True)
class ArchiveFile:
    """One archive file: its path below the host, and the open times it holds, on the grid."""

    path: str
    span: Interval
    monthly: bool

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def checksum_path(self) -> str:
        return self.path + ".CHECKSUM"


def file_path(
    layout: ArchiveLayout, market_id: str, interval: str, day_ms: int, monthly: bool
) -> str:
    """`data/spot/daily/klines/BTCUSDT/1m/BTCUSDT-1m-2024-01-05.zip` (or the monthly one)."""
    when = datetime.fromtimestamp(day_ms / 1000, UTC)
    period, stamp = ("monthly", f"{when:%Y-%m}") if monthly else ("daily", f"{when:%Y-%m-%d}")
    return (
        f"{layout.market_path}/{period}/klines/{market_id}/{interval}/"
        f"{market_id}-{interval}-{stamp}.zip"
    )


def _inside(span: Interval, gap: Interval) -> bool:
    return gap[0] <= span[0] < span[1] <= gap[1]


def plan_files(
    layout: ArchiveLayout, market_id: str, grid: Grid, gap: Interval, now_ms: int
) -> list[ArchiveFile]:
    """The files that hold only candles of `gap` (open times, on `grid`), oldest first: the
    monthly file of every whole month of the gap published by `now_ms` (unless a month of the
    timeframe is too big to hold: 1s), daily files for the other whole days (where the
    timeframe has them). The rest of the gap is REST's."""
    interval = layout.interval(grid.timeframe)
    if interval is None or gap[0] >= gap[1]:
        return []
    daily = grid.timeframe in layout.daily_timeframes
    files: list[ArchiveFile] = []
    month = _MONTHS.floor(gap[0])
    while month < gap[1]:
        month_end = _MONTHS.next_open(month)
        span = (grid.ceil(month), grid.ceil(month_end))
        published = month_end + layout.monthly_delay_ms <= now_ms
        small = grid.count(*span) <= layout.max_monthly_candles
        if _inside(span, gap) and published and (small or not daily):
            files.append(
                ArchiveFile(file_path(layout, market_id, interval, month, True), span, True)
            )
        elif daily:
            for day in range(month, month_end, DAY_MS):
                span = (grid.ceil(day), grid.ceil(day + DAY_MS))
                if _inside(span, gap) and day + DAY_MS + layout.daily_delay_ms <= now_ms:
                    path = file_path(layout, market_id, interval, day, False)
                    files.append(ArchiveFile(path, span, False))
        month = month_end
    return files
