"""What one page proves: the span between its first and last candle, never the rest."""

from __future__ import annotations

import numpy as np

from tda_collector.models import JobKey
from tda_collector.modes.pipeline import proven_span, unpublished_from
from tda_collector.normalize import Window, normalize_page
from tda_collector.timeframes import grid_of

MIN = 60_000
T0 = 1_709_251_200_000  # 2024-03-01T00:00:00Z
KEY = JobKey("okx", "BTC/USDT", "1m")
GRID = grid_of("1m")
WINDOW = (T0, T0 + 10 * MIN)


def rows(*opens: int, bad: tuple[int, ...] = ()) -> list[list[object]]:
    """Candles opening at `T0 + n minutes`; those in `bad` have high below low."""
    out: list[list[object]] = []
    for n in opens:
        high, low = (90.0, 110.0) if n in bad else (110.0, 90.0)
        out.append([T0 + n * MIN, 100.0, high, low, 100.0, 1.0])
    return out


def prove(raw: list[list[object]]) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    window = Window(*WINDOW, closed_before_ms=WINDOW[1])
    return proven_span(WINDOW, normalize_page(raw, KEY, GRID, window), GRID)


def test_a_full_answer_settles_and_stores_the_whole_window():
    assert prove(rows(*range(10))) == (WINDOW, [WINDOW])


def test_a_newest_first_page_cut_short_proves_only_what_it_holds():
    # OKX answers the newest candles of a window; a page smaller than asked leaves the
    # older part unproven, to be asked for again.
    settled, stored = prove(rows(*range(7, 10)))
    assert settled == (T0 + 7 * MIN, T0 + 10 * MIN)
    assert stored == [settled]


def test_an_oldest_first_page_cut_short_proves_only_what_it_holds():
    settled, stored = prove(rows(*range(4)))
    assert settled == stored[0] == (T0, T0 + 4 * MIN)


def test_holes_between_the_first_and_last_candle_are_proven_holes():
    settled, stored = prove(rows(0, 1, 5, 9))
    assert settled == WINDOW and stored == [WINDOW]


def test_an_empty_answer_proves_the_window_a_hole():
    assert prove([]) == (WINDOW, [WINDOW])


def test_candles_answered_outside_the_window_prove_nothing_inside_it_beyond_emptiness():
    # Kraken answers the newest candles whatever `since` says: rows newer than the window.
    settled, stored = prove(rows(20, 21))
    assert settled == WINDOW and stored == [WINDOW]


def test_rejected_candles_stay_out_of_the_ledger():
    settled, stored = prove(rows(*range(10), bad=(3, 4)))
    assert settled == WINDOW
    assert stored == [(T0, T0 + 3 * MIN), (T0 + 5 * MIN, T0 + 10 * MIN)]


def test_a_page_whose_every_candle_is_rejected_stores_nothing_in_the_ledger():
    settled, stored = prove(rows(*range(10), bad=tuple(range(10))))
    assert settled == WINDOW
    assert stored == []


def test_rows_without_a_readable_time_leave_only_the_stored_candles_proven():
    raw = [*rows(0, 1), ["garbage", 1, 2, 3, 4, 5], *rows(5)]
    settled, stored = prove(raw)
    assert settled == WINDOW
    assert stored == [(T0, T0 + 2 * MIN), (T0 + 5 * MIN, T0 + 6 * MIN)]


def test_a_later_version_of_a_rejected_candle_is_stored_and_proven():
    raw = [*rows(0, 1, bad=(1,)), *rows(1)]  # the exchange sent 00:01 twice, fixed the second time
    page = normalize_page(raw, KEY, GRID, Window(*WINDOW, closed_before_ms=WINDOW[1]))
    assert np.array_equal(page.batch.timestamps, [T0, T0 + MIN])
    assert proven_span(WINDOW, page, GRID)[1] == [(T0, T0 + 2 * MIN)]


def test_unpublished_candles_are_the_newest_closed_one_or_the_last_minute_of_them():
    now = 1_709_251_230_000  # 30 s into a minute
    assert unpublished_from(now, grid_of("1m")) == now - 30_000 - 60_000
    assert unpublished_from(now, grid_of("1h")) == grid_of("1h").floor(now) - 3_600_000
    assert unpublished_from(now, grid_of("1s")) == now - 60_000
