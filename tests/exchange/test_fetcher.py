"""The fetcher's retries as the exchange sees them: Retry-After waited by the whole exchange, a
wait past the ceiling reported loudly, a paused job's request never sent."""

from __future__ import annotations

import asyncio
import random

import pytest
from event_support import recording_events
from virtual_time import VirtualTime

from tda_collector.app import Readiness
from tda_collector.errors import PermanentFault, RateLimited, TransientFault
from tda_collector.exchange.fetcher import Fetcher
from tda_collector.exchange.ratelimit import RateLimiter
from tda_collector.exchange.source import Capabilities
from tda_collector.exchange.throttle import Pauses
from tda_collector.models import JobKey
from tda_collector.observability.metrics import Metrics
from tda_collector.retry import RetryPolicy

KEY = JobKey("binance", "BTC/USDT", "1m")
OTHER = JobKey("binance", "ETH/USDT", "1m")
START = 1_704_067_200.0  # 2024-01-01T00:00:00Z, on the virtual clock (wall and monotonic)
ROW = [1_704_067_200_000, 1.0, 2.0, 0.5, 1.5, 10.0]


class ScriptedSource:
    """Answers each candle request with the next scripted error, then with one candle."""

    id = "binance"
    capabilities = Capabilities()

    def __init__(self, vt: VirtualTime, *errors: Exception) -> None:
        self.vt = vt
        self.errors = list(errors)
        self.sent: list[tuple[float, str]] = []  # (time, symbol) of each request that left
        self.opened = 0

    async def open(self) -> None:
        self.opened += 1
        if self.errors:
            raise self.errors.pop(0)

    async def fetch_ohlcv(self, symbol, timeframe, since_ms, until_ms, limit):
        self.sent.append((self.vt.now, symbol))
        if self.errors:
            raise self.errors.pop(0)
        return [ROW]


class Rig:
    def __init__(self, *errors: Exception, gate=None, retry_after_max_s: float = 600) -> None:
        self.vt = VirtualTime(start=START)
        self.source = ScriptedSource(self.vt, *errors)
        self.events, self.recorded = recording_events()
        self.metrics = Metrics(clock=self.vt.clock)
        self.pauses = Pauses(self.vt.clock)
        policy = RetryPolicy(base_s=1, cap_s=4, attempts=3, retry_after_max_s=retry_after_max_s)
        limiter = RateLimiter(100, 10, clock=self.vt.clock, sleep=self.vt.sleep)
        self.fetcher = Fetcher(
            self.source,
            limiter,
            policy,
            self.events,
            rng=random.Random(2),
            clock=self.vt.clock,
            sleep=self.vt.sleep,
            metrics=self.metrics,
            gate=gate,
            pauses=self.pauses,
            wall=self.vt.clock,
        )

    def paused_until(self) -> float | None:
        return self.metrics.registry.get_sample_value(
            "tda_exchange_paused_until_seconds", {"exchange": "binance"}
        )


def ban(seconds: float, status: int = 418) -> RateLimited:
    return RateLimited(f"{status} banned", status=status, retry_after_s=seconds)


async def test_a_short_retry_after_is_waited_quietly_by_the_whole_exchange():
    rig = Rig(ban(30, status=429))
    rows = await rig.vt.run(rig.fetcher.candles(KEY, 0, 1, 10))
    assert rows == [ROW]
    assert [t - START for t, _ in rig.source.sent] == [0, 30]
    limited = rig.recorded.named("rate_limited")
    assert len(limited) == 1 and limited[0]["level"] == "WARNING"
    assert (limited[0]["status"], limited[0]["wait_s"], limited[0]["attempt"]) == (429, 30, 1)
    assert rig.recorded.named("exchange_paused") == []
    assert rig.pauses.reason() is None and rig.paused_until() == 0  # the 30 s are over


async def test_a_retry_after_past_the_ceiling_is_loud_and_still_waited_out():
    rig = Rig(ban(3600))
    readiness = Readiness(rig.pauses)
    readiness.store_ready = True
    fetch = asyncio.ensure_future(rig.vt.run(rig.fetcher.candles(KEY, 0, 1, 10)))
    while not rig.recorded.named("exchange_paused"):
        await asyncio.sleep(0)

    paused = rig.recorded.named("exchange_paused")[0]
    assert paused["level"] == "ERROR" and paused["status"] == 418
    assert paused["resume_at"] == "2024-01-01T01:00:00Z" and paused["wait_s"] == 3600
    assert "binance" in paused["message"]
    assert rig.paused_until() == START + 3600
    assert await readiness() == "binance paused until 2024-01-01T01:00:00Z (HTTP 418)"
    assert [p.to_json() for p in rig.pauses.active()] == [
        {"exchange": "binance", "status": 418, "resume_at": "2024-01-01T01:00:00Z"}
    ]

    assert await fetch == [ROW]
    assert [t - START for t, _ in rig.source.sent] == [0, 3600]  # the exchange's own Retry-After
    assert rig.paused_until() == 0 and rig.pauses.active() == []
    assert await readiness() is None


async def test_during_a_pause_no_task_of_the_exchange_asks_again():
    rig = Rig(ban(900))

    async def other_job_later():
        await rig.vt.sleep(5)
        return await rig.fetcher.candles(OTHER, 0, 1, 10)

    await rig.vt.run(asyncio.gather(rig.fetcher.candles(KEY, 0, 1, 10), other_job_later()))
    assert sorted((t - START, s) for t, s in rig.source.sent) == [
        (0, "BTC/USDT"),
        (900, "BTC/USDT"),
        (900, "ETH/USDT"),
    ]


async def test_rate_limited_answers_do_not_use_up_the_transient_attempts():
    errors = [TransientFault("503"), *(ban(1, status=429) for _ in range(5)), TransientFault("503")]
    rig = Rig(*errors)
    assert await rig.vt.run(rig.fetcher.candles(KEY, 0, 1, 10)) == [ROW]
    assert [e["attempt"] for e in rig.recorded.named("backoff_retry")] == [1, 2]
    assert [e["attempt"] for e in rig.recorded.named("rate_limited")] == [1, 2, 3, 4, 5]


async def test_a_paused_jobs_request_never_leaves():
    paused = {KEY}

    class Paused(Exception):
        pass

    def gate(key: JobKey) -> None:
        if key in paused:
            raise Paused(key.symbol)

    rig = Rig(gate=gate)
    with pytest.raises(Paused):
        await rig.vt.run(rig.fetcher.candles(KEY, 0, 1, 10))
    assert await rig.vt.run(rig.fetcher.candles(OTHER, 0, 1, 10)) == [ROW]
    assert [s for _, s in rig.source.sent] == ["ETH/USDT"]
    assert rig.fetcher.requests == 1


async def test_a_pause_that_comes_while_the_request_waits_for_the_budget_still_holds():
    paused: set[JobKey] = set()

    def gate(key: JobKey) -> None:
        if key in paused:
            raise LookupError(key.symbol)

    rig = Rig(ban(60, status=429), gate=gate)
    first = asyncio.ensure_future(rig.vt.run(rig.fetcher.candles(KEY, 0, 1, 10)))
    while not rig.recorded.named("rate_limited"):
        await asyncio.sleep(0)
    paused.add(KEY)  # the job is paused while its retry waits out the exchange's pause
    with pytest.raises(LookupError):
        await first
    assert len(rig.source.sent) == 1


async def test_opening_retries_like_any_request_and_gives_up_after_the_attempts():
    rig = Rig(ban(10, status=429), TransientFault("down"), TransientFault("down"))
    await rig.vt.run(rig.fetcher.open(forever=False))
    assert rig.source.opened == 4
    assert [e["attempt"] for e in rig.recorded.named("backoff_retry")] == [1, 2]

    rig = Rig(*(TransientFault("down") for _ in range(3)))
    with pytest.raises(TransientFault):
        await rig.vt.run(rig.fetcher.open(forever=False))
    assert rig.source.opened == 3

    rig = Rig(*(TransientFault("down") for _ in range(8)))
    await rig.vt.run(rig.fetcher.open(forever=True))  # live mode: an exchange down at boot
    assert rig.source.opened == 9


async def test_every_failed_candle_request_is_a_fetch_error_the_last_one_at_error_level():
    # Three transient attempts (counted apart from the rate-limited answer): the third ends it.
    rig = Rig(
        TransientFault("503 down", status=503), ban(1, status=429), *(TransientFault("x"),) * 2
    )
    with pytest.raises(TransientFault):
        await rig.vt.run(rig.fetcher.candles(KEY, 0, 1, 10))
    failed = rig.recorded.named("fetch_error")
    assert len(failed) == len(rig.source.sent) == 4  # one per request that left and failed
    assert [(e["level"], e["attempt"], e["retry"]) for e in failed] == [
        ("WARNING", 1, True),
        ("WARNING", 1, True),
        ("WARNING", 2, True),
        ("ERROR", 3, False),
    ]
    assert failed[0]["status"] == 503 and failed[0]["error"] == "503 down"
    assert failed[1]["status"] == 429
    assert all(e["symbol"] == "BTC/USDT" and e["timeframe"] == "1m" for e in failed)
    # What follows a retried failure is told apart: the wait it takes.
    assert [e["attempt"] for e in rig.recorded.named("backoff_retry")] == [1, 2]
    assert [e["attempt"] for e in rig.recorded.named("rate_limited")] == [1]


async def test_a_permanent_fault_is_one_fetch_error_and_no_retry():
    rig = Rig(PermanentFault("400 bad symbol", status=400))
    with pytest.raises(PermanentFault):
        await rig.vt.run(rig.fetcher.candles(KEY, 0, 1, 10))
    [failed] = rig.recorded.named("fetch_error")
    assert (failed["level"], failed["status"], failed["attempt"]) == ("ERROR", 400, 1)
    assert rig.recorded.named("backoff_retry") == []


async def test_loading_markets_is_not_a_candle_request_so_no_fetch_error():
    rig = Rig(TransientFault("down"))
    await rig.vt.run(rig.fetcher.open(forever=False))
    assert rig.recorded.named("fetch_error") == []
    assert len(rig.recorded.named("backoff_retry")) == 1
