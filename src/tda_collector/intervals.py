"""Half-open millisecond intervals: the coverage ledger's arithmetic (pure functions)."""

from __future__ import annotations

from collections.abc import Iterable

Interval = tuple[int, int]


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, non-overlapping union; touching intervals are joined, empty ones dropped."""
    merged: list[Interval] = []
    for start, end in sorted(i for i in intervals if i[0] < i[1]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def subtract(window: Interval, covered: Iterable[Interval]) -> list[Interval]:
    """The parts of `window` that no interval in `covered` contains."""
    start, end = window
    missing: list[Interval] = []
    cursor = start
    for c_start, c_end in merge(covered):
        if c_end <= cursor or c_start >= end:
            continue
        if c_start > cursor:
            missing.append((cursor, c_start))
        cursor = max(cursor, c_end)
        if cursor >= end:
            break
    if cursor < end:
        missing.append((cursor, end))
    return missing
