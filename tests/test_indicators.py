"""Indicators vs TA-Lib, and continuity of the incremental computation across chunks/restarts."""

import numpy as np
import pytest

from tda_collector.indicators import (
    IndicatorSpec,
    IndicatorState,
    compute,
    decay_filter,
    initial_state,
    provisional,
)

talib = pytest.importorskip("talib", reason="TA-Lib (pip install ta-lib) is the reference")

RTOL = 1e-9
# talib.MACD seeds its fast EMA at the slow EMA's first index instead of the first close; the
# difference decays by 11/13 per candle and is below 1e-12 of the price after ~200 candles.
TALIB_MACD_WARMUP = 300
DEFAULT = IndicatorSpec()


def random_walk(n: int, seed: int = 20240601) -> np.ndarray:
    """Geometric random walk, BTC-like level and 1% per-candle volatility."""
    rng = np.random.default_rng(seed)
    return 30_000.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, n)))


@pytest.fixture(scope="module")
def closes() -> np.ndarray:
    return random_walk(20_000)


@pytest.fixture(scope="module")
def whole(closes: np.ndarray) -> dict[str, np.ndarray]:
    columns, _ = compute(closes, initial_state(DEFAULT), DEFAULT)
    return columns


def assert_close(actual: np.ndarray, expected: np.ndarray, scale: np.ndarray | None = None):
    """NaN exactly where expected is NaN, elsewhere |actual - expected| <= RTOL * scale.

    `scale` defaults to |expected|. MACD values are differences of price-level EMAs, so their
    rounding error is relative to the price, not to the (possibly near-zero) difference.
    """
    actual = np.asarray(actual)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    defined = ~np.isnan(expected)
    scale = np.abs(expected) if scale is None else scale
    error = np.abs(actual[defined] - expected[defined])
    assert np.all(error <= RTOL * scale[defined]), f"max error {error.max()}"


def assert_same_columns(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], closes):
    assert list(actual) == list(expected)
    for name, values in expected.items():
        scale = np.abs(closes) if name.startswith("macd") else None
        assert_close(actual[name], values, scale)


def test_column_names():
    assert DEFAULT.column_names() == [
        "rsi_6", "rsi_14", "rsi_24", "ema_12", "ema_26", "macd", "macd_signal", "macd_hist",
    ]  # fmt: skip


@pytest.mark.parametrize("period", [6, 14, 24])
def test_rsi_matches_talib(closes, whole, period):
    assert_close(whole[f"rsi_{period}"], talib.RSI(closes, period))


@pytest.mark.parametrize("period", [12, 26])
def test_ema_matches_talib(closes, whole, period):
    assert_close(whole[f"ema_{period}"], talib.EMA(closes, period))


def test_macd_matches_talib_ema_composition(closes, whole):
    macd = talib.EMA(closes, 12) - talib.EMA(closes, 26)
    signal = talib.EMA(macd, 9)  # talib skips the leading NaNs of its input
    assert_close(whole["macd"], macd, np.abs(closes))
    assert_close(whole["macd_signal"], signal, np.abs(closes))
    assert_close(whole["macd_hist"], macd - signal, np.abs(closes))
    assert np.flatnonzero(~np.isnan(whole["macd_signal"]))[0] == 25 + 8


def test_macd_matches_talib_macd_after_warmup(closes, whole):
    expected = talib.MACD(closes, 12, 26, 9)
    for name, values in zip(["macd", "macd_signal", "macd_hist"], expected, strict=True):
        tail = slice(TALIB_MACD_WARMUP, None)
        assert_close(whole[name][tail], values[tail], np.abs(closes[tail]))


def test_random_chunks_with_json_restarts_equal_whole(closes, whole):
    rng = np.random.default_rng(7)
    state = initial_state(DEFAULT)
    parts = []
    start = 0
    while start < len(closes):
        size = int(rng.integers(1, 2001))
        columns, state = compute(closes[start : start + size], state, DEFAULT)
        parts.append(columns)
        state = IndicatorState.from_json(state.to_json())  # a process restart
        start += size
    assert len(parts) > 10
    joined = {name: np.concatenate([p[name] for p in parts]) for name in whole}
    assert_same_columns(joined, whole, closes)


def test_one_candle_at_a_time_equals_whole(closes, whole):
    closes = closes[:3000]
    state = initial_state(DEFAULT)
    parts = []
    for close in closes:
        columns, state = compute(np.array([close]), state, DEFAULT)
        parts.append(columns)
    joined = {name: np.concatenate([p[name] for p in parts]) for name in whole}
    assert_same_columns(joined, {n: v[:3000] for n, v in whole.items()}, closes)


def test_short_warmup_pieces_equal_whole(closes):
    """3 candles then 20 more: warm-up sums must carry over in the state."""
    closes = closes[:23]
    expected, _ = compute(closes, initial_state(DEFAULT), DEFAULT)
    first, state = compute(closes[:3], initial_state(DEFAULT), DEFAULT)
    second, _ = compute(closes[3:], IndicatorState.from_json(state.to_json()), DEFAULT)
    joined = {name: np.concatenate([first[name], second[name]]) for name in expected}
    assert_same_columns(joined, expected, closes)
    assert_close(joined["rsi_6"], talib.RSI(closes, 6))
    assert_close(joined["ema_12"], talib.EMA(closes, 12))


@pytest.mark.parametrize(
    "series",
    [
        pytest.param(np.full(100, 42.5), id="flat"),
        pytest.param(np.linspace(10.0, 60.0, 100), id="only-gains"),
        pytest.param(np.linspace(60.0, 10.0, 100), id="only-losses"),
        pytest.param(np.r_[np.full(40, 7.0), np.linspace(7, 9, 20), np.full(40, 9.0)], id="steps"),
    ],
)
def test_degenerate_series_match_talib(series):
    columns, _ = compute(series, initial_state(DEFAULT), DEFAULT)
    for period in DEFAULT.rsi_periods:
        assert_close(columns[f"rsi_{period}"], talib.RSI(series, period), np.full(100, 100.0))
    for period in DEFAULT.ema_periods:
        assert_close(columns[f"ema_{period}"], talib.EMA(series, period))


def test_tiny_prices_match_talib():
    """Meme-coin price levels: averages of ~1e-10 are not mistaken for zero."""
    series = random_walk(2000) * 1e-12
    columns, _ = compute(series, initial_state(DEFAULT), DEFAULT)
    for period in DEFAULT.rsi_periods:
        assert_close(columns[f"rsi_{period}"], talib.RSI(series, period))
    assert_close(columns["macd"], talib.EMA(series, 12) - talib.EMA(series, 26), series)


def test_rsi_conventions_for_zero_averages():
    flat, _ = compute(np.full(30, 5.0), initial_state(DEFAULT), DEFAULT)
    rising, _ = compute(np.arange(30.0), initial_state(DEFAULT), DEFAULT)
    assert np.all(flat["rsi_14"][14:] == 0.0)  # both averages zero: TA-Lib gives 0
    assert np.all(rising["rsi_14"][14:] == 100.0)  # no losses: 100


def test_custom_spec_names_and_values(closes):
    spec = IndicatorSpec(rsi_periods=(7,), ema_periods=(5,), macd=None)
    columns, state = compute(closes[:500], initial_state(spec), spec)
    assert spec.column_names() == ["rsi_7", "ema_5"]
    assert list(columns) == ["rsi_7", "ema_5"]
    assert_close(columns["rsi_7"], talib.RSI(closes[:500], 7))
    assert_close(columns["ema_5"], talib.EMA(closes[:500], 5))
    assert IndicatorState.from_json(state.to_json()) == state


def test_provisional_equals_compute_and_keeps_state(closes):
    _, state = compute(closes[:1000], initial_state(DEFAULT), DEFAULT)
    saved = state.to_json()
    values = provisional(float(closes[1000]), state, DEFAULT)
    appended, _ = compute(closes[1000:1001], state, DEFAULT)
    assert values == {name: float(column[0]) for name, column in appended.items()}
    full, _ = compute(closes[:1001], initial_state(DEFAULT), DEFAULT)
    assert values["rsi_14"] == pytest.approx(full["rsi_14"][-1], rel=RTOL)
    assert state.to_json() == saved


def test_provisional_during_warmup_is_nan():
    values = provisional(1.0, initial_state(DEFAULT), DEFAULT)
    assert all(np.isnan(v) for v in values.values())


def test_json_round_trip_is_exact(closes):
    _, state = compute(closes[:777], initial_state(DEFAULT), DEFAULT)
    assert IndicatorState.from_json(state.to_json()) == state


def test_state_for_another_spec_is_rejected(closes):
    other = IndicatorSpec(rsi_periods=(14,))
    with pytest.raises(ValueError, match="state was built for"):
        compute(closes[:10], initial_state(other), DEFAULT)


def test_list_periods_from_config_equal_tuples():
    assert IndicatorSpec(rsi_periods=[6, 14, 24], macd=[12, 26, 9]) == DEFAULT


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rsi_periods": (1,)},
        {"ema_periods": (12, 12)},
        {"macd": (26, 12, 9)},
        {"rsi_periods": (6.0,)},
    ],
)
def test_invalid_spec_is_rejected(kwargs):
    with pytest.raises(ValueError):
        IndicatorSpec(**kwargs)


@pytest.mark.parametrize("bad", [np.array([1.0, np.nan]), np.array([[1.0]]), np.array([np.inf])])
def test_non_finite_or_non_1d_closes_are_rejected(bad):
    with pytest.raises(ValueError, match="finite"):
        compute(bad, initial_state(DEFAULT), DEFAULT)


def test_empty_chunk_keeps_state(closes):
    _, state = compute(closes[:50], initial_state(DEFAULT), DEFAULT)
    columns, after = compute(np.empty(0), state, DEFAULT)
    assert after == state
    assert all(len(v) == 0 for v in columns.values())


def recursion(x: np.ndarray, alpha: float, start: list[float]) -> np.ndarray:
    """The definition, one step at a time."""
    out = np.empty_like(x)
    for row, previous in enumerate(start):
        for t, value in enumerate(x[row]):
            previous = (1.0 - alpha) * previous + alpha * value
            out[row, t] = previous
    return out


@pytest.mark.parametrize("alpha", [2 / 3, 0.2, 2 / 13, 1 / 14, 2 / 27, 1 / 24, 2 / 201])
@pytest.mark.parametrize("length", [0, 1, 2, 5, 40, 41, 42, 999, 5_000])
def test_decay_filter_is_the_recursion(alpha, length):
    """Block lengths differ per alpha; lengths around them cover partial and exact blocks."""
    rng = np.random.default_rng(length)
    x = np.vstack([rng.normal(0, 1, length), 30_000 * np.exp(rng.normal(0, 0.01, length))])
    start = [-0.25, 30_100.0]
    expected = recursion(x, alpha, start)
    # Where row 0 (values ~1) crosses zero, rounding is absolute: ~1e-16 of the inputs.
    np.testing.assert_allclose(decay_filter(x, alpha, start), expected, rtol=1e-12, atol=1e-14)
