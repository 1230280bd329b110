"""fake_exchange.py run in its own process, for tests and benchmarks.

In-process, the fake's server thread competes with the collector for the GIL, so under
CPU load it stamps requests' arrival late and in bunches, and its CPU counts as ours.
In its own process neither happens.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

FAKE_EXCHANGE = Path(__file__).resolve().with_name("fake_exchange.py")


def _flags(options: dict[str, Any]) -> list[str]:
    """``rps=10`` -> ``--rps 10``; True -> a bare flag; None and False are left out;
    a list or tuple repeats the flag once per item."""
    argv: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list | tuple):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


class FakeExchangeProcess:
    """``with FakeExchangeProcess(rps=10, symbol=["BTC/USDT"]) as fake:`` serves at
    ``fake.base_url``; the keywords are fake_exchange.py's command-line options. After the
    block, ``fake.counters`` holds its totals (requests, '429', '418', 'faults')."""

    def __init__(self, **options: Any) -> None:
        self.argv = [sys.executable, str(FAKE_EXCHANGE), *_flags(options)]
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = ""
        self.counters: dict[str, Any] = {}

    def __enter__(self) -> FakeExchangeProcess:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().strip()
        if not self.base_url:
            self.proc.wait(timeout=10)
            raise RuntimeError(f"fake exchange exited with {self.proc.returncode}: {self.argv}")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        self.counters = json.loads(lines[-1]) if lines else {}
