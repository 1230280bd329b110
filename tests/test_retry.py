import random

from tda_collector.retry import RetryPolicy


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
