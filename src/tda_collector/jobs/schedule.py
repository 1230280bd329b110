"""When a live job runs: on each candle close of its timeframe (the default), or on a cron.

A schedule is a small validated value (`Schedule`, the jobs API's `schedule` object). The
instants are pure functions of "now", so they are tested with plain calls and no clock. Cron
expressions are the standard 5 fields (minute hour day-of-month month day-of-week), read in
UTC by `croniter`; a 6th (seconds) field is refused, as are the `@reboot`-style words.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, model_validator


class Schedule(BaseModel):
    """`{"mode": "timeframe"}` (each candle close, plus the open candle's refresh) or
    `{"mode": "cron", "cron": "*/5 * * * *"}` (at those UTC instants, catching up from the
    cursor each time)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["timeframe", "cron"] = Field(
        "timeframe", description="timeframe: on each candle close; cron: at the cron's instants."
    )
    cron: str | None = Field(
        None, max_length=200, description="5-field cron expression in UTC (mode cron only)."
    )

    @model_validator(mode="after")
    def _cron_matches_mode(self) -> Schedule:
        if self.mode == "timeframe":
            if self.cron is not None:
                raise ValueError("cron: only with mode cron")
            return self
        if self.cron is None:
            raise ValueError("cron: required with mode cron")
        if len(self.cron.split()) != 5 or not croniter.is_valid(self.cron):
            raise ValueError("cron: not a 5-field cron expression such as */5 * * * *")
        return self

    def to_json(self) -> dict[str, str]:
        return self.model_dump(exclude_none=True)


EACH_CLOSE = Schedule()


def next_cron_ms(expression: str, after_ms: int) -> int:
    """The first instant of the cron strictly after `after_ms` (epoch ms, UTC)."""
    start = datetime.fromtimestamp(after_ms / 1000, tz=UTC)
    following = croniter(expression, start).get_next(datetime)
    return int(following.timestamp() * 1000)
