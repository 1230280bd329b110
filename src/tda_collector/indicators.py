"""Incremental RSI, EMA and MACD over a series of closed-candle closes.

The collector ingests a series in pieces (backfill pages, live candles, across restarts), so the
computation is incremental: `compute` takes the closes that follow those already seen plus an
explicit `IndicatorState`, and returns the columns for those closes and the next state. Feeding
a series in any split, with the state round-tripped through JSON in between, gives the same
values as one call over the whole series.

Definitions (they match TA-Lib 0.6 with its default unstable period 0):

- EMA(n): alpha = 2/(n+1). Seeded with the simple mean of the first n closes (the value at
  index n-1), then ema_t = ema_{t-1} + alpha * (x_t - ema_{t-1}). NaN before index n-1.
- RSI(n), Wilder: change_t = x_t - x_{t-1}; gain = max(change, 0), loss = max(-change, 0).
  The first average gain/loss is the simple mean of the first n changes (value at index n),
  then avg_t = (avg_{t-1} * (n-1) + value_t) / n. RSI = 100 - 100/(1 + avg_gain/avg_loss),
  computed as 100 * avg_gain / (avg_gain + avg_loss): 100 when avg_loss is 0, and 0 when both
  averages are 0 (a flat series), as TA-Lib does. NaN before index n.
- MACD(fast, slow, signal): macd = EMA(fast) - EMA(slow), both EMAs computed from the first
  close; signal = EMA(signal) of the macd series from its first defined value (so seeded with
  the mean of its first `signal` values); hist = macd - signal. TA-Lib's own `MACD` function
  instead seeds the fast EMA at the slow EMA's first index; that difference decays away
  geometrically, and the composition talib.EMA(fast) - talib.EMA(slow) is matched exactly.

Both recursions (EMA and Wilder smoothing) are y_t = (1 - alpha) * y_{t-1} + alpha * x_t,
continuing from the state's last value; `decay_filter` runs them in numpy, block by block.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np

_STATE_VERSION = 1


@dataclass(frozen=True)
class IndicatorSpec:
    """Which indicators to compute; column names follow the configured periods."""

    rsi_periods: tuple[int, ...] = (6, 14, 24)
    ema_periods: tuple[int, ...] = (12, 26)
    macd: tuple[int, int, int] | None = (12, 26, 9)  # (fast, slow, signal); None disables MACD

    def __post_init__(self) -> None:
        # Coerce lists (e.g. from a config file) to tuples so specs compare equal to stored ones.
        object.__setattr__(self, "rsi_periods", tuple(self.rsi_periods))
        object.__setattr__(self, "ema_periods", tuple(self.ema_periods))
        if self.macd is not None:
            object.__setattr__(self, "macd", tuple(self.macd))
            if len(self.macd) != 3 or self.macd[0] >= self.macd[1]:
                raise ValueError(f"macd must be (fast, slow, signal) with fast < slow: {self.macd}")
        periods = self.rsi_periods + self.ema_periods + (self.macd or ())
        if any(not isinstance(p, int) or isinstance(p, bool) or p < 2 for p in periods):
            raise ValueError(f"indicator periods must be integers >= 2: {self}")
        for name in ("rsi_periods", "ema_periods"):
            if len(set(getattr(self, name))) != len(getattr(self, name)):
                raise ValueError(f"duplicate {name}: {getattr(self, name)}")

    def column_names(self) -> list[str]:
        names = [f"rsi_{p}" for p in self.rsi_periods] + [f"ema_{p}" for p in self.ema_periods]
        if self.macd is not None:
            names += ["macd", "macd_signal", "macd_hist"]
        return names

    def tracked_ema_periods(self) -> tuple[int, ...]:
        """EMA periods to track: the configured ones plus MACD's fast and slow EMAs."""
        extra = self.macd[:2] if self.macd is not None else ()
        return tuple(sorted(set(self.ema_periods) | set(extra)))


@dataclass(frozen=True)
class Smoother:
    """State of one or more parallel seeded smoothings sharing a period (RSI: gain and loss).

    While fewer than `period` inputs have been seen, `sums` accumulates them for the seed mean
    and `values` is None; afterwards `values` holds the last smoothed value of each row.
    """

    period: int
    seen: int = 0
    sums: tuple[float, ...] = ()
    values: tuple[float, ...] | None = None


@dataclass(frozen=True)
class IndicatorState:
    """Everything needed to continue the indicators exactly; JSON-serialisable."""

    spec: IndicatorSpec
    last_close: float | None = None
    rsi: tuple[Smoother, ...] = ()  # one per spec.rsi_periods, rows (gain, loss)
    ema: tuple[Smoother, ...] = ()  # one per spec.tracked_ema_periods()
    macd_signal: Smoother | None = None

    def to_json(self) -> str:
        # json writes floats with repr, which round-trips float64 exactly.
        return json.dumps({"version": _STATE_VERSION, **asdict(self)}, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> IndicatorState:
        data = json.loads(text)
        if data.pop("version", None) != _STATE_VERSION:
            raise ValueError("unsupported indicator state version")
        signal = data["macd_signal"]
        return cls(
            spec=IndicatorSpec(**data["spec"]),
            last_close=data["last_close"],
            rsi=tuple(_smoother_from_dict(d) for d in data["rsi"]),
            ema=tuple(_smoother_from_dict(d) for d in data["ema"]),
            macd_signal=_smoother_from_dict(signal) if signal is not None else None,
        )


def _smoother_from_dict(data: dict[str, Any]) -> Smoother:
    values = data["values"]
    return Smoother(
        period=data["period"],
        seen=data["seen"],
        sums=tuple(data["sums"]),
        values=tuple(values) if values is not None else None,
    )


def initial_state(spec: IndicatorSpec) -> IndicatorState:
    """State before the first close of a series."""
    return IndicatorState(
        spec=spec,
        rsi=tuple(Smoother(p, sums=(0.0, 0.0)) for p in spec.rsi_periods),
        ema=tuple(Smoother(p, sums=(0.0,)) for p in spec.tracked_ema_periods()),
        macd_signal=Smoother(spec.macd[2], sums=(0.0,)) if spec.macd is not None else None,
    )


# Within a block the recursion is a cumulative sum of inputs scaled by (1 - alpha)^-k; keeping
# that factor under this bound keeps the rounding error near 1e-15 of the values.
_BLOCK_GROWTH_LIMIT = 1e3


@lru_cache(maxsize=64)
def _block_weights(alpha: float) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, float]:
    decay = 1.0 - alpha
    block = max(1, int(math.log(_BLOCK_GROWTH_LIMIT) / -math.log(decay)))
    powers = decay ** np.arange(block)
    return block, alpha / powers, powers, powers * decay, decay**block


def decay_filter(x: np.ndarray, alpha: float, start: list[float]) -> np.ndarray:
    """y_t = (1 - alpha) * y_{t-1} + alpha * x_t along each row of `x`, from y_{-1} = `start`.

    What `scipy.signal.lfilter([alpha], [1, alpha - 1], x, zi=...)` computes (to ~1e-15), without
    scipy's 1.9 s of import CPU: each block of the series is one vectorised cumulative sum, and
    only the value carried from block to block is a Python loop (a few dozen steps a page).
    """
    rows, n = x.shape
    if n == 0:
        return np.empty((rows, 0))
    block, inflow, powers, carried, jump = _block_weights(alpha)
    if n < block:
        block, inflow, powers, carried = n, inflow[:n], powers[:n], carried[:n]
    blocks = -(-n // block)
    if blocks * block != n:
        padded = np.zeros((rows, blocks * block))
        padded[:, :n] = x
        x = padded
    y = np.cumsum(x.reshape(rows, blocks, block) * inflow, axis=2)
    y *= powers  # each block's response as if it had started from 0
    entering = []
    for value, block_ends in zip(start, y[:, :, -1].tolist(), strict=True):
        row = []
        for end in block_ends:
            row.append(value)
            value = end + jump * value
        entering.append(row)
    y += np.array(entering)[:, :, None] * carried
    return y.reshape(rows, -1)[:, :n]


def _smooth(x: np.ndarray, state: Smoother, alpha: float) -> tuple[np.ndarray, Smoother]:
    """Seeded smoothing of the rows of `x` (shape rows x m), continuing from `state`.

    Returns the smoothed rows (NaN until seeded) and the state after them.
    """
    out = np.full(x.shape, np.nan)
    start = 0
    values = state.values
    sums = state.sums
    missing = state.period - state.seen
    if missing > 0:
        start = min(missing, x.shape[1])
        # Sequential running sum from the stored partial sum, like TA-Lib's seed loop, so a
        # split series sums in the same order as a whole one.
        sums = tuple(np.cumsum(np.column_stack([sums, x[:, :start]]), axis=1)[:, -1].tolist())
        if start == missing:
            values = tuple(s / state.period for s in sums)
            out[:, start - 1] = values
    if values is not None and start < x.shape[1]:
        out[:, start:] = decay_filter(x[:, start:], alpha, list(values))
        values = tuple(out[:, -1].tolist())
    seen = min(state.period, state.seen + x.shape[1])
    return out, Smoother(state.period, seen, sums, values)


def _ema(x: np.ndarray, state: Smoother) -> tuple[np.ndarray, Smoother]:
    out, new_state = _smooth(x[None, :], state, 2.0 / (state.period + 1))
    return out[0], new_state


def _rsi(moves: np.ndarray, state: Smoother) -> tuple[np.ndarray, Smoother]:
    """RSI from `moves`, the rows (gains, losses) of the close-to-close changes."""
    (gain, loss), new_state = _smooth(moves, state, 1.0 / state.period)
    total = gain + loss
    with np.errstate(invalid="ignore"):  # 0/0 where both averages are 0; replaced by 0
        rsi = np.where(total == 0.0, 0.0, 100.0 * gain / total)
    return rsi, new_state


def compute(
    closes: np.ndarray, state: IndicatorState, spec: IndicatorSpec
) -> tuple[dict[str, np.ndarray], IndicatorState]:
    """Indicator columns for `closes` (the closes following those `state` has seen), and the
    state after them. Pure: `state` is immutable and is not modified.
    """
    if state.spec != spec:
        raise ValueError(f"state was built for {state.spec}, not {spec}; start a new state")
    closes = np.asarray(closes, dtype=np.float64)
    if closes.ndim != 1 or not np.isfinite(closes).all():
        raise ValueError("closes must be a 1-D array of finite numbers")
    if closes.size == 0:
        return {name: np.empty(0) for name in spec.column_names()}, state

    previous = closes[:1] if state.last_close is None else [state.last_close]
    changes = np.diff(closes, prepend=previous)
    first_change = 1 if state.last_close is None else 0
    moves = np.stack([np.maximum(changes, 0.0), np.maximum(-changes, 0.0)])[:, first_change:]
    columns: dict[str, np.ndarray] = {}

    rsi_states = []
    for smoother in state.rsi:
        values, smoother = _rsi(moves, smoother)
        columns[f"rsi_{smoother.period}"] = np.concatenate([np.full(first_change, np.nan), values])
        rsi_states.append(smoother)

    emas: dict[int, np.ndarray] = {}
    ema_states = []
    for smoother in state.ema:
        emas[smoother.period], smoother = _ema(closes, smoother)
        ema_states.append(smoother)
    columns.update({f"ema_{p}": emas[p] for p in spec.ema_periods})

    signal_state = state.macd_signal
    if spec.macd is not None and signal_state is not None:
        macd = emas[spec.macd[0]] - emas[spec.macd[1]]
        signal = np.full(macd.shape, np.nan)
        defined = np.flatnonzero(~np.isnan(macd))
        if defined.size:  # once defined, macd stays defined: a suffix of this chunk
            signal[defined[0] :], signal_state = _ema(macd[defined[0] :], signal_state)
        columns.update(macd=macd, macd_signal=signal, macd_hist=macd - signal)

    new_state = IndicatorState(
        spec=spec,
        last_close=float(closes[-1]),
        rsi=tuple(rsi_states),
        ema=tuple(ema_states),
        macd_signal=signal_state,
    )
    return columns, new_state


def provisional(close: float, state: IndicatorState, spec: IndicatorSpec) -> dict[str, float]:
    """Values for an open candle as if `close` were appended, without advancing `state`.

    Live mode refreshes the open candle with this; its values are replaced when it closes.
    """
    columns, _ = compute(np.array([close], dtype=np.float64), state, spec)
    return {name: float(values[0]) for name, values in columns.items()}
