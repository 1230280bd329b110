import asyncio
import gc
import random
import weakref
from collections.abc import Callable

import pytest

from tda_collector.errors import (
    PermanentFault,
    PermanentStoreError,
    RateLimited,
    StoreFault,
    TransientFault,
    TransientStoreError,
)
from tda_collector.retry import Failure, RetryPolicy, is_permanent, retry_async


def test_backoff_doubles_from_the_base_up_to_the_cap():
    policy = RetryPolicy(base_s=1, factor=2, cap_s=32, attempts=5)
    assert [policy.ceiling(a) for a in range(1, 9)] == [1, 2, 4, 8, 16, 32, 32, 32]


def test_jitter_stays_between_half_and_the_ceiling_and_varies():
    policy = RetryPolicy()
    rng = random.Random(7)
    delays = [policy.delay(3, rng) for _ in range(200)]
    assert all(2.0 <= d <= 4.0 for d in delays)
    assert len(set(delays)) > 100


def test_gives_up_after_the_configured_attempts():
    policy = RetryPolicy(attempts=3)
    assert [policy.gives_up_after(a) for a in (1, 2, 3)] == [False, False, True]


def test_a_retry_after_is_the_wait_in_full_whatever_the_ceiling():
    policy = RetryPolicy(cap_s=32, retry_after_max_s=600)
    rng = random.Random(1)
    assert policy.wait(1, rng, retry_after_s=120) == 120
    assert policy.wait(1, rng, retry_after_s=86_400) == 86_400  # waited, not cut to the ceiling
    assert policy.wait(1, rng, retry_after_s=-5) == 0.0
    assert 0.5 <= policy.wait(1, rng) <= 1.0  # no Retry-After: the backoff


def test_only_a_wait_past_the_retry_after_ceiling_is_loud():
    policy = RetryPolicy(retry_after_max_s=600)
    assert [policy.exceeds_retry_after_max(s) for s in (0, 599.9, 600, 600.1, 86_400)] == [
        False,
        False,
        False,
        True,
        True,
    ]


def test_backoff_of_a_loop_that_never_gives_up_stays_at_the_cap():
    assert RetryPolicy(cap_s=32).ceiling(5_000) == 32


def test_permanent_means_a_permanent_exchange_fault_or_a_permanent_store_error():
    assert is_permanent(PermanentFault("bad symbol"))
    assert is_permanent(PermanentStoreError("unknown column"))
    assert is_permanent(StoreFault("refused", permanent=True))
    assert not is_permanent(StoreFault("gave up after 5 attempts"))
    assert not is_permanent(TransientStoreError("timeout"))
    assert not is_permanent(TransientFault("503"))


class Script:
    """A call that raises the given errors in turn, then returns "ok"; sleeps are recorded."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.slept: list[float] = []
        self.failures: list[Failure] = []

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def run(self, policy: RetryPolicy, **options) -> str:
        return asyncio.run(
            retry_async(
                self,
                policy,
                on_failure=self.failures.append,
                sleep=self.sleep,
                rng=random.Random(3),
                **options,
            )
        )


POLICY = RetryPolicy(base_s=1, factor=2, cap_s=32, attempts=3)


def test_transient_errors_are_retried_with_backoff_until_the_call_succeeds():
    script = Script(TransientFault("503"), OSError("reset"))
    assert script.run(POLICY) == "ok"
    assert script.calls == 3
    assert [(f.kind, f.attempt, f.gives_up) for f in script.failures] == [
        ("transient", 1, False),
        ("transient", 2, False),
    ]
    assert 0.5 <= script.slept[0] <= 1 and 1 <= script.slept[1] <= 2
    assert [f.wait_s for f in script.failures] == script.slept


def test_the_last_transient_error_is_raised_after_the_policys_attempts():
    script = Script(*(TransientFault(f"503 #{i}") for i in range(5)))
    with pytest.raises(TransientFault, match="#2"):
        script.run(POLICY)
    assert script.calls == 3
    assert [(f.attempt, f.gives_up, f.wait_s) for f in script.failures][-1] == (3, True, 0.0)
    assert len(script.slept) == 2


def test_forever_keeps_retrying_past_the_attempts():
    script = Script(*(TransientFault("down") for _ in range(10)))
    assert script.run(POLICY, forever=True) == "ok"
    assert script.calls == 11 and not any(f.gives_up for f in script.failures)


def test_rate_limited_answers_wait_their_retry_after_without_using_up_attempts():
    limited = [RateLimited("429", status=429, retry_after_s=7) for _ in range(4)]
    script = Script(TransientFault("503"), *limited, TransientFault("503"))
    assert script.run(POLICY) == "ok"  # 2 transient failures < 3 attempts, 4 waits besides
    kinds = [(f.kind, f.attempt) for f in script.failures]
    assert kinds[1:5] == [("rate_limited", n) for n in range(1, 5)]
    assert kinds[5] == ("transient", 2)
    assert script.slept[1:5] == [7, 7, 7, 7]


def test_a_server_that_keeps_refusing_is_reported_after_the_waits_run_out():
    script = Script(*(RateLimited("429", status=429) for _ in range(4)))
    with pytest.raises(RateLimited):
        script.run(POLICY, max_rate_limited_waits=2)
    assert script.calls == 3 and script.failures[-1].gives_up


def test_a_rate_limited_wait_goes_to_the_shared_pause_instead_of_this_calls_sleep():
    paused: list[float] = []
    script = Script(RateLimited("418", status=418, retry_after_s=90), TransientFault("503"))
    assert script.run(POLICY, pause=paused.append) == "ok"
    assert paused == [90]
    assert script.slept[0] == 0 and 0.5 <= script.slept[1] <= 1  # transient: own backoff


def test_a_permanent_error_is_raised_at_once_and_reported_once():
    script = Script(PermanentStoreError("unknown column rsi_99"))
    with pytest.raises(PermanentStoreError):
        script.run(POLICY)
    assert script.calls == 1 and script.slept == []
    assert [(f.kind, f.attempt, f.gives_up) for f in script.failures] == [("permanent", 1, True)]


def test_an_error_outside_the_transient_types_propagates_unreported():
    script = Script(KeyError("a bug"))
    with pytest.raises(KeyError):
        script.run(POLICY, transient=(TransientFault,))
    assert script.calls == 1 and script.failures == []


class Held:
    """Stands for what a caller's callbacks reach (a writer's whole batch)."""


def callbacks_reaching(
    held: Held, kinds: list[str]
) -> tuple[Callable[[Failure], None], Callable[[float], None]]:
    def report(failure: Failure) -> None:
        kinds.append(failure.kind)
        assert held is not None

    def pause(wait_s: float) -> None:
        assert held is not None

    return report, pause


async def _callbacks_of_one_call(script: Script, kinds: list[str]) -> weakref.ref[Held]:
    held = Held()
    freed = weakref.ref(held)
    report, pause = callbacks_reaching(held, kinds)
    del held
    await retry_async(script, POLICY, on_failure=report, pause=pause, sleep=script.sleep)
    return freed


@pytest.mark.parametrize(
    "errors, kinds",
    [
        (tuple, []),
        (
            # made per run: a raised error's traceback holds the frames it passed through
            lambda: (TransientFault("503"), RateLimited("429", status=429)),
            ["transient", "rate_limited"],
        ),
    ],
    ids=["at once", "retried"],
)
def test_the_callers_callbacks_are_let_go_when_the_call_returns(errors, kinds):
    # tenacity's retrying object is a reference cycle; what the caller's callbacks reach must
    # not live on in it until the cyclic GC's next full collection: the archive's memory grew
    # with the rows written, each file's batch held by its write's retry loop.
    reported: list[str] = []
    gc.disable()
    try:
        freed = asyncio.run(_callbacks_of_one_call(Script(*errors()), reported))
        assert freed() is None
    finally:
        gc.enable()
    assert reported == kinds
