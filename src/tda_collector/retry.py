"""Retry schedule for transient faults as a small immutable value (after urllib3's Retry).

Computing a delay is separate from sleeping, so the schedule is tested with plain calls.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float = 1.0
    factor: float = 2.0
    cap_s: float = 32.0
    attempts: int = 5

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the delay after failed attempt number `attempt` (1-based)."""
        return min(self.cap_s, self.base_s * self.factor ** (attempt - 1))

    def delay(self, attempt: int, rng: random.Random) -> float:
        """ "Full jitter" (uniform in [ceiling/2, ceiling]): spreads retries of many tasks
        while keeping a floor, so a retry never comes immediately."""
        ceiling = self.ceiling(attempt)
        return rng.uniform(ceiling / 2, ceiling)

    def gives_up_after(self, attempt: int) -> bool:
        return attempt >= self.attempts
