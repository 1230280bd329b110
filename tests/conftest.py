"""Fixtures shared by every layer's tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from collector_support import FROZEN_NOW_S, write_config
from fake_exchange import FakeExchange, SymbolSpec


@dataclass
class ExchangeRig:
    """A fake exchange on loopback and the collector configs that point at it."""

    fake: FakeExchange
    specs: list[SymbolSpec]
    tmp_path: Path

    def config(
        self,
        symbols: list[str] | None = None,
        timeframes: list[str] | None = None,
        *,
        workdir: Path | None = None,
        **settings: Any,
    ) -> Path:
        """`write_config` for `symbols` (default: every spec's) on `timeframes` (default 1m),
        in `workdir` (default the test's tmp_path); `settings` are write_config's knobs."""
        return write_config(
            workdir or self.tmp_path,
            self.fake.base_url,
            [s.symbol for s in self.specs] if symbols is None else symbols,
            ["1m"] if timeframes is None else timeframes,
            **settings,
        )


@pytest.fixture
def exchange_rig(tmp_path: Path) -> Iterator[Callable[..., ExchangeRig]]:
    """`exchange_rig(specs, **knobs)` starts a FakeExchange (knobs are its own; the clock is
    frozen at FROZEN_NOW_S unless given, `started=False` leaves it to the test) and stops it
    when the test ends."""
    fakes: list[FakeExchange] = []

    def start(specs: list[SymbolSpec], *, started: bool = True, **knobs: Any) -> ExchangeRig:
        knobs.setdefault("clock", lambda: FROZEN_NOW_S)
        fake = FakeExchange(specs, **knobs)
        fakes.append(fake)
        if started:
            fake.start()
        return ExchangeRig(fake, list(specs), tmp_path)

    yield start
    for fake in fakes:
        fake.stop()
