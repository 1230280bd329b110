"""The terminal: a bar with rate and ETA when stderr is a terminal, nothing extra otherwise."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from collector_support import events_named, run_in_process
from fake_exchange import SymbolSpec

SPECS = [SymbolSpec("BTC/USDT"), SymbolSpec("ETH/USDT"), SymbolSpec("SOL/USDT")]
ARGS = ("--mode=history", "--start=2024-02-28", "--end=2024-03-01")


def read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_an_interactive_run_shows_a_bar_with_rate_and_eta(exchange_rig):
    rig = exchange_rig(SPECS, latency_s=0.03)
    config = rig.config(page_limit=100)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, cols
    env = {k: v for k, v in os.environ.items() if not k.startswith("TDA__")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tda_collector", "--config", str(config), *ARGS],
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
        env=env,
    )
    os.close(slave)
    out, _ = proc.communicate(timeout=120)
    screen = read_all(master).decode(errors="replace")
    os.close(master)
    assert proc.returncode == 0
    frames = [f for f in re.split(r"[\r\n]", screen) if f.strip()]
    assert len(frames) >= 2, screen  # drawn at the start, each second, and at the end
    assert all(re.match(r"history\s+[\d.]+%\|", frame) for frame in frames), frames
    assert re.search(
        r"history\s+100\.0%\|█+\| 3/3 jobs done, 100\.0% covered, 8,640 candles, "
        r"[1-9][\d,]* candles/s, ETA 0:00:00",
        frames[-1],
    ), frames[-1]
    assert out.startswith("{")  # the events still go to stdout, untouched
    assert "%|" not in out


def test_without_a_terminal_only_the_events_appear(exchange_rig, capsys):
    config = exchange_rig(SPECS).config()
    code, events = run_in_process(capsys, config, *ARGS)
    assert code == 0 and events_named(events, "history_complete")
    assert capsys.readouterr().err == ""
