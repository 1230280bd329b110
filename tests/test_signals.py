"""A SIGTERM while Arrow parses a page reaches the collector's handler, and nothing else."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pyarrow as pa
import pytest

from tda_collector.app import leave_signals_to_the_loop
from tda_collector.exchange.ccxt_source import klines_matrix

ROW = '[{t},"1.0","2.0","0.5","1.5","10.0",0,"0",0,"0","0","0"]'
PAGE = "[" + ",".join(ROW.format(t=1_700_000_000_000 + i * 60_000) for i in range(1000)) + "]"


async def sigterm_while_parsing(trials: int) -> int:
    """SIGTERMs, each sent while pages are parsed, that reached the loop's handler."""
    loop = asyncio.get_running_loop()
    received = 0
    previous = signal.getsignal(signal.SIGTERM)
    try:
        for n in range(trials):
            arrived = asyncio.Event()
            loop.add_signal_handler(signal.SIGTERM, arrived.set)
            delay = 0.0005 + 0.003 * n / trials
            threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM)).start()
            started = time.monotonic()
            while time.monotonic() - started < 0.01:
                assert klines_matrix(PAGE) is not None
            try:
                await asyncio.wait_for(arrived.wait(), 5.0)
                received += 1
            except TimeoutError:
                pass
            loop.remove_signal_handler(signal.SIGTERM)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a signal come too late: no harm
    finally:
        signal.signal(signal.SIGTERM, previous)
    return received


async def test_every_sigterm_during_a_parse_reaches_the_loop():
    leave_signals_to_the_loop()
    assert await sigterm_while_parsing(40) == 40


async def test_control_with_pyarrows_own_handlers_the_parse_takes_the_signal():
    pa.enable_signal_handlers(True)
    try:
        with pytest.raises(pa.ArrowCancelled):
            await sigterm_while_parsing(40)
    finally:
        leave_signals_to_the_loop()
