"""Leases in a real Postgres: claimed once, taken over when they run out, stopped before that."""

from __future__ import annotations

import asyncio
import time

import pytest
from event_support import recording_events
from postgres_support import (
    fresh_database,
    postgres_server_fixture,  # noqa: F401 (registers the fixture)
)

from tda_collector.jobs.leases import LeaseKeeper, LeaseLost
from tda_collector.jobs.model import COMPLETED, FAILED
from tda_collector.jobs.postgres_fleet import PostgresFleet
from tda_collector.jobs.postgres_state import PostgresState
from tda_collector.models import JobKey

RUN = "history:0:60000"
JOBS = [f"binance:S{i}-USDT:1m:history" for i in range(20)]


@pytest.fixture
async def fleets(postgres_server):
    """Three instances' views of one fresh database."""
    url = fresh_database()
    events, _ = recording_events()
    states = [PostgresState(url, events) for _ in range(3)]
    for state in states:
        await state.open()
    yield [PostgresFleet(state) for state in states]
    for state in states:
        await state.close()


async def test_every_job_is_claimed_once_by_concurrent_claimers(fleets):
    await fleets[0].offer_jobs(RUN, JOBS, done=[])
    await fleets[1].offer_jobs(RUN, JOBS, done=[])  # a second offer changes nothing

    async def claim_all(fleet, owner):
        got = []
        while (job := await fleet.claim_job(RUN, owner, 30, JOBS)) is not None:
            got.append(job)
        return got

    claimed = await asyncio.gather(*(claim_all(fleets[i % 3], f"i{i}") for i in range(6)))
    flat = [job for got in claimed for job in got]
    assert sorted(flat) == sorted(JOBS)  # each once, none twice
    owners = await fleets[0].owners(RUN)
    assert {owners[job] for job in claimed[0]} <= {"i0"}
    totals = await fleets[0].run_totals(RUN)
    assert totals == {"jobs": 20, "completed": 0, "failed": 0, "running": 20, "waiting": 0}


async def test_an_expired_lease_is_taken_over_and_a_finished_job_never_again(fleets):
    a, b, _ = fleets
    await a.offer_jobs(RUN, JOBS[:2], done=[])
    first = await a.claim_job(RUN, "a", 0.5, JOBS[:2])
    second = await a.claim_job(RUN, "a", 30, JOBS[:2])
    assert await b.claim_job(RUN, "b", 30, JOBS[:2]) is None  # both held
    await asyncio.sleep(0.6)  # a's first lease runs out (a died)
    assert await b.claim_job(RUN, "b", 30, JOBS[:2]) == first
    assert await a.renew("a", "history", 0, 30) == {second}  # a no longer holds the first
    await a.finish_job(RUN, second, "a", FAILED, "boom")
    await b.finish_job(RUN, first, "b", COMPLETED, None)
    assert await b.claim_job(RUN, "b", 30, JOBS[:2]) is None
    assert await a.job_outcomes(RUN, JOBS[:2]) == {
        first: (COMPLETED, None),
        second: (FAILED, "boom"),
    }


async def test_release_all_frees_every_lease_of_an_instance(fleets):
    a, b, _ = fleets
    await a.offer_jobs(RUN, JOBS[:3], done=[JOBS[2]])
    held = {await a.claim_job(RUN, "a", 30, JOBS[:3]) for _ in range(2)}
    assert held == set(JOBS[:2])  # the done one is not claimable
    await a.release_all("a")
    assert await b.claim_job(RUN, "b", 30, JOBS[:3]) in held


async def test_a_job_stops_before_its_lease_can_be_taken_over(fleets):
    """The gate refuses requests of a job once a third of a lease is left without a renewal,
    so the holder has stopped before the server lets another instance claim it."""
    events, _ = recording_events()
    now = [100.0]
    keeper = LeaseKeeper(fleets[0], "a", "history", 3.0, events, clock=lambda: now[0])
    key = JobKey("binance", "S0/USDT", "1m")
    keeper.held(JOBS[0], since=100.0)
    keeper.check(key)  # held
    now[0] = 101.9
    keeper.check(key)
    now[0] = 102.0  # 3 s lease, renewed at 100: stop by 102, the server frees it at 103
    with pytest.raises(LeaseLost):
        keeper.check(key)
    with pytest.raises(LeaseLost):
        keeper.check(JobKey("binance", "S1/USDT", "1m"))  # never held


async def test_a_renewal_that_finds_the_lease_gone_stops_the_job(fleets):
    a, b, _ = fleets
    events, recorded = recording_events()
    keeper = LeaseKeeper(a, "a", "history", 0.5, events)
    await a.offer_jobs(RUN, JOBS[:1], done=[])
    since = time.monotonic()
    assert await a.claim_job(RUN, "a", 0.5, JOBS[:1]) == JOBS[0]
    keeper.held(JOBS[0], since)
    await asyncio.sleep(0.6)
    assert await b.claim_job(RUN, "b", 30, JOBS[:1]) == JOBS[0]  # a stalled; b took it
    await keeper.renew_once()
    assert not keeper.holds(JOBS[0])
    assert recorded.named("lease_lost")
    assert [i.instance_id for i in await a.instances()] == ["a"]
    assert await a.active_instances("history", 5) == 1


class _HeldBack:
    """The fleet's store, its renewals' answers held back until `answer` is set: a claim can
    land while a renewal is under way."""

    def __init__(self, store: PostgresFleet) -> None:
        self._store = store
        self.answer = asyncio.Event()

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    async def renew(self, *args):
        held = await self._store.renew(*args)
        await self.answer.wait()
        return held


async def test_a_lease_claimed_while_a_renewal_is_under_way_is_not_taken_for_lost(fleets):
    events, recorded = recording_events()
    store = _HeldBack(fleets[0])
    keeper = LeaseKeeper(store, "a", "live", 30.0, events)
    await fleets[0].offer_jobs("live", JOBS[:1], done=[])
    renewal = asyncio.create_task(keeper.renew_once())
    await asyncio.sleep(0.2)  # the renewal has run at the server, without the job
    since = time.monotonic()
    assert await fleets[0].claim_job("live", "a", 30.0, JOBS[:1]) == JOBS[0]
    keeper.held(JOBS[0], since)
    store.answer.set()
    await renewal
    assert keeper.holds(JOBS[0]) and not recorded.named("lease_lost")
    await keeper.renew_once()  # the next renewal finds it
    keeper.check(JobKey("binance", "S0/USDT", "1m"), "history")


async def test_a_clean_stop_leaves_the_instances_at_once(fleets):
    a, b, _ = fleets
    await a.renew("a", "live", 0, 30.0)
    await b.renew("b", "live", 0, 30.0)
    assert await b.active_instances("live", 30.0) == 2
    await a.release_all("a")
    assert await b.active_instances("live", 30.0) == 1
    assert [i.instance_id for i in await b.instances()] == ["b"]
