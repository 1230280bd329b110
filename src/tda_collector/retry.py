"""Retries for every caller: a small immutable policy (after urllib3's Retry) and one async loop.

Computing a delay is separate from sleeping, so the schedule is tested with plain calls. The loop
(`retry_async`, tenacity underneath) sorts each failure by type: a rate-limited answer waits
(the server's `Retry-After`, however long) without using up the attempts; a permanent error is
raised at once; a transient one is retried with backoff until the policy gives up.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from tenacity import AsyncRetrying, RetryCallState, stop_never

from .errors import PermanentFault, RateLimited, StoreFault

T = TypeVar("T")
Kind = Literal["transient", "rate_limited", "permanent"]

# A rate-limit answer says "wait", not "broken": it does not use up the transient attempts,
# but a server that keeps refusing after this many waits in a row is reported.
MAX_RATE_LIMITED_WAITS = 20


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float = 1.0
    factor: float = 2.0
    cap_s: float = 32.0
    attempts: int = 5
    # A Retry-After up to this long is waited quietly; a longer one is waited too, but loudly.
    retry_after_max_s: float = 600.0

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the delay after failed attempt number `attempt` (1-based)."""
        try:
            return min(self.cap_s, self.base_s * self.factor ** (attempt - 1))
        except OverflowError:  # a loop that retries forever gets there after ~1,000 attempts
            return self.cap_s

    def delay(self, attempt: int, rng: random.Random) -> float:
        """ "Full jitter" (uniform in [ceiling/2, ceiling]): spreads retries of many tasks
        while keeping a floor, so a retry never comes immediately."""
        ceiling = self.ceiling(attempt)
        return rng.uniform(ceiling / 2, ceiling)

    def wait(self, attempt: int, rng: random.Random, retry_after_s: float | None = None) -> float:
        """Seconds before trying again after failed attempt `attempt`: the server's Retry-After
        when it sent one, in full (the server decides; `exceeds_retry_after_max` only decides
        whether the wait is reported as an outage), else the backoff delay."""
        if retry_after_s is not None:
            return max(0.0, retry_after_s)
        return self.delay(attempt, rng)

    def exceeds_retry_after_max(self, wait_s: float) -> bool:
        """True for a wait too long to pass quietly (a Retry-After of hours, a long ban)."""
        return wait_s > self.retry_after_max_s

    def gives_up_after(self, attempt: int) -> bool:
        return attempt >= self.attempts


def is_permanent(exc: BaseException) -> bool:
    """An error that retrying cannot help: a permanent exchange fault or a permanent store one."""
    return isinstance(exc, PermanentFault) or (isinstance(exc, StoreFault) and exc.permanent)


@dataclass(frozen=True)
class Failure:
    """One failed attempt, as `retry_async` reports it before waiting or giving up."""

    error: BaseException
    kind: Kind
    attempt: int  # failures of this kind so far in this call, 1-based
    wait_s: float  # before the next try; 0.0 when giving up
    gives_up: bool  # no next try: the error is raised right after this report


class _Judge:
    """Counts one call's failures by kind and decides, once per failure, what follows."""

    def __init__(
        self,
        policy: RetryPolicy,
        transient: tuple[type[BaseException], ...],
        forever: bool,
        max_rate_limited_waits: int,
        rng: random.Random,
    ) -> None:
        self._policy, self._transient, self._forever = policy, transient, forever
        self._max_waits, self._rng = max_rate_limited_waits, rng
        self._counts: dict[Kind, int] = {"transient": 0, "rate_limited": 0, "permanent": 0}
        self.last: Failure | None = None

    def kind(self, exc: BaseException) -> Kind | None:
        if isinstance(exc, RateLimited):
            return "rate_limited"
        if is_permanent(exc):
            return "permanent"
        return "transient" if isinstance(exc, self._transient) else None

    def judge(self, exc: BaseException) -> Failure | None:
        """The failure as reported, or None for an error that is not the loop's business (a
        cancellation, a paused job): it propagates untouched."""
        kind = self.kind(exc)
        if kind is None:
            return None
        self._counts[kind] += 1
        n = self._counts[kind]
        if kind == "permanent":
            gives_up = True
        elif kind == "rate_limited":
            gives_up = not self._forever and n > self._max_waits
        else:
            gives_up = not self._forever and self._policy.gives_up_after(n)
        retry_after = exc.retry_after_s if isinstance(exc, RateLimited) else None
        wait_s = 0.0 if gives_up else self._policy.wait(n, self._rng, retry_after)
        return Failure(exc, kind, n, wait_s, gives_up)


async def retry_async(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    transient: tuple[type[BaseException], ...] = (Exception,),
    on_failure: Callable[[Failure], None] | None = None,
    pause: Callable[[float], None] | None = None,
    forever: bool = False,
    max_rate_limited_waits: int = MAX_RATE_LIMITED_WAITS,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
) -> T:
    """`await call()` until it returns, retrying as `policy` says; the last error is raised.

    Each failure is sorted: `RateLimited` waits its Retry-After (or the backoff) up to
    `max_rate_limited_waits` times in a row without using up the attempts; a permanent error
    (`is_permanent`) is raised at once; an instance of `transient` is retried with backoff until
    `policy.gives_up_after` (never, with `forever`); anything else propagates untouched.
    `on_failure` hears every sorted failure, the last one included. `pause`, when given, takes
    a rate-limited wait instead of this call's own sleep: it holds every caller that shares it
    (the exchange's limiter), this one included."""
    judge = _Judge(policy, transient, forever, max_rate_limited_waits, rng or random.Random())
    hooks = _Hooks(judge, on_failure, pause)
    retrying = AsyncRetrying(
        retry=hooks.retry, wait=hooks.wait, stop=stop_never, sleep=sleep, reraise=True
    )
    try:
        async for attempt in retrying:
            with attempt:
                return await call()
    finally:
        # tenacity's state refers back to its retrying object: a reference cycle, freed only
        # when the cyclic GC next runs a full collection, which comes rarer as the heap grows.
        # The caller's callbacks (and all they reach: a writer's whole batch) must not wait
        # for that, or memory grows with the rows written (the archive's 44,640-row files).
        hooks.release()
    raise AssertionError("unreachable: tenacity returns or re-raises")


class _Hooks:
    """tenacity's `retry` and `wait` for one `retry_async` call; `release` lets go of the
    caller's callbacks once the call is over."""

    def __init__(
        self,
        judge: _Judge,
        on_failure: Callable[[Failure], None] | None,
        pause: Callable[[float], None] | None,
    ) -> None:
        self._judge: _Judge | None = judge
        self._on_failure, self._pause = on_failure, pause

    def release(self) -> None:
        if self._judge is not None:
            self._judge.last = None  # its error's traceback holds the frames of the call
        self._judge = self._on_failure = self._pause = None

    def retry(self, state: RetryCallState) -> bool:
        judge = self._judge
        assert judge is not None  # tenacity asks only during the call
        exc = state.outcome.exception() if state.outcome else None
        judge.last = judge.judge(exc) if exc is not None else None
        if judge.last is None:
            return False
        if self._on_failure is not None:
            self._on_failure(judge.last)
        return not judge.last.gives_up

    def wait(self, state: RetryCallState) -> float:
        failure = self._judge.last if self._judge is not None else None
        assert failure is not None  # tenacity waits only after `retry` said yes
        if failure.kind == "rate_limited" and self._pause is not None:
            self._pause(failure.wait_s)
            return 0.0
        return failure.wait_s
