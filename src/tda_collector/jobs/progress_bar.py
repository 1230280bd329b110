"""The terminal progress bar of an interactive history run (tqdm, on stderr).

Shown only when stderr is a terminal; otherwise the JSON events are the only output. While the
bar is up and stdout is the same terminal, events are written through tqdm so that they scroll
above the bar instead of breaking it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .progress import Summary

_SCALE = 10_000  # the bar counts hundredths of a percent of the range covered


def _format(summary: Summary) -> str:
    """tqdm draws the percentage and the bar; our own line carries jobs, rate and ETA."""
    line = summary.line().replace("{", "{{").replace("}", "}}")
    return "{desc} {percentage:5.1f}%|{bar}| " + line


class ProgressBar:
    def __init__(self, logger: logging.Logger, stream: TextIO) -> None:
        self._logger = logger
        self._stream = stream
        self._bar: tqdm | None = None
        self._redirect = contextlib.ExitStack()

    def open(self, summary: Summary) -> None:
        self._bar = tqdm(
            total=_SCALE,
            initial=round((summary.covered or 0.0) * _SCALE),
            bar_format=_format(summary),
            file=self._stream,
            desc="history",
            dynamic_ncols=True,
            leave=True,
        )
        if sys.stdout.isatty():
            self._redirect.enter_context(logging_redirect_tqdm([self._logger]))

    def update(self, summary: Summary) -> None:
        if self._bar is None:
            return
        self._bar.n = round((summary.covered or 0.0) * _SCALE)
        self._bar.bar_format = _format(summary)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._redirect.close()


def terminal_bar(
    mode: str, logger: logging.Logger, stream: TextIO | None = None
) -> ProgressBar | None:
    """A bar for a history run whose stderr is a terminal, else None."""
    stream = stream or sys.stderr
    if mode != "history" or not stream.isatty():
        return None
    return ProgressBar(logger, stream)
