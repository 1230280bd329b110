"""`exchanges[].markets`: symbols resolved from the exchange's markets (quote, type, active
only, the top N by 24h quote volume), against the fake Binance over real ccxt; the tickers
request pays its weight to the exchange's limiter; a resolution that finds nothing is a usage
error naming the exchange, not a run of zero jobs."""

from __future__ import annotations

import random

import pytest
import yaml
from collector_support import ccxt_options, parse_events
from event_support import recording_events
from fake_exchange import SymbolSpec

from tda_collector.cli import main
from tda_collector.config import ExchangeConfig, MarketsFilter
from tda_collector.errors import UsageError
from tda_collector.exchange.fetcher import Fetcher
from tda_collector.exchange.ratelimit import RateLimiter
from tda_collector.exchange.runtime import RunRequest, ccxt_source_factory, open_exchange
from tda_collector.exchange.source import Capabilities
from tda_collector.observability.metrics import Metrics
from tda_collector.retry import RetryPolicy

SPECS = [
    SymbolSpec("BTC/USDT", quote_volume=5e9),
    SymbolSpec("ETH/USDT", quote_volume=9e9),
    SymbolSpec("SOL/USDT", quote_volume=7e9),
    SymbolSpec("XRP/USDT", quote_volume=8e9, status="BREAK"),  # inactive
    SymbolSpec("ETH/BTC", quote_volume=1e12),
    SymbolSpec("ADA/USDT", quote_volume=1e6),
]
POLICY = RetryPolicy(base_s=0.01, cap_s=0.02, attempts=2)


async def resolve(fake, markets: dict | None, symbols: list[str] | None = None) -> list[str]:
    config = ExchangeConfig(
        id="binance",
        symbols=symbols or [],
        markets=MarketsFilter(**markets) if markets is not None else None,
        timeframes=["1m"],
        ccxt=ccxt_options(fake.base_url),
        rate_limit={"requests_per_second": 1000},
    )
    events, _ = recording_events()
    runtime = await open_exchange(
        config,
        RunRequest("history", 0, 1),
        events,
        POLICY,
        ccxt_source_factory({}),
        Metrics(),
        position=0,
    )
    await runtime.source.close()
    return [key.symbol for key in runtime.keys]


def ticker_requests(fake) -> int:
    return sum(1 for r in fake.request_log() if r.path.endswith("/ticker/24hr"))


async def test_quote_and_active_only_pick_the_markets_in_listing_order(exchange_rig):
    rig = exchange_rig(SPECS)
    resolved = await resolve(rig.fake, {"quote": ["usdt"]})
    assert resolved == ["BTC/USDT", "ETH/USDT", "SOL/USDT", "ADA/USDT"]
    assert ticker_requests(rig.fake) == 0  # no limit: no volumes needed


async def test_inactive_markets_are_kept_when_active_only_is_off(exchange_rig):
    rig = exchange_rig(SPECS)
    resolved = await resolve(rig.fake, {"quote": ["USDT"], "active_only": False})
    assert "XRP/USDT" in resolved


async def test_limit_keeps_the_top_n_by_24h_quote_volume(exchange_rig):
    rig = exchange_rig(SPECS)
    resolved = await resolve(rig.fake, {"quote": ["USDT"], "limit": 2})
    assert resolved == ["ETH/USDT", "SOL/USDT"]  # XRP is busier but inactive
    assert ticker_requests(rig.fake) == 1


async def test_explicit_symbols_come_first_and_are_not_repeated(exchange_rig):
    rig = exchange_rig(SPECS)
    resolved = await resolve(rig.fake, {"quote": ["BTC"]}, symbols=["SOL/USDT", "ETH/BTC"])
    assert resolved == ["SOL/USDT", "ETH/BTC"]


async def test_a_resolution_that_finds_nothing_is_a_usage_error_naming_the_exchange(
    exchange_rig,
):
    rig = exchange_rig(SPECS)
    with pytest.raises(UsageError) as raised:
        await resolve(rig.fake, {"quote": ["EUR"], "limit": 10})
    message = str(raised.value)
    assert message.startswith("exchanges[0].markets: No symbols found matching criteria")
    assert "binance" in message and "EUR" in message and "\n" not in message


def test_an_empty_resolution_exits_2_with_one_line_and_no_jobs(exchange_rig, capsys):
    rig = exchange_rig(SPECS)
    config = rig.config()
    loaded = yaml.safe_load(config.read_text())
    loaded["exchanges"][0]["symbols"] = []
    loaded["exchanges"][0]["markets"] = {"quote": ["EUR"]}
    config.write_text(yaml.safe_dump(loaded))
    capsys.readouterr()
    code = main(["--config", str(config), "--mode=history", "--start=2024-02-01"], environ={})
    out, err = capsys.readouterr()
    assert code == 2
    assert [e["event"] for e in parse_events(out) if e["event"].startswith("history")] == []
    assert err.count("\n") == 1 and "No symbols found matching criteria on binance" in err


class RecordingLimiter(RateLimiter):
    def __init__(self) -> None:
        super().__init__(1000, 1000)
        self.costs: list[float] = []

    async def acquire(self, cost: float = 1.0) -> None:
        self.costs.append(cost)
        await super().acquire(cost)


class TickerSource:
    id = "binance"

    def __init__(self, cost: float) -> None:
        self.capabilities = Capabilities(tickers_request_cost=cost)

    async def quote_volumes(self, symbols: list[str]) -> dict[str, float]:
        return {s: 1.0 for s in symbols}


async def test_the_tickers_request_takes_its_cost_from_the_exchanges_limiter():
    limiter = RecordingLimiter()
    events, _ = recording_events()
    fetcher = Fetcher(TickerSource(16.0), limiter, POLICY, events, rng=random.Random(1))
    assert await fetcher.quote_volumes(["BTC/USDT"]) == {"BTC/USDT": 1.0}
    assert limiter.costs == [16.0]


async def test_binances_tickers_cost_is_read_from_ccxts_declared_weights():
    from tda_collector.exchange.ccxt_source import CcxtExchange

    spot, futures, other = CcxtExchange("binance", {}), CcxtExchange("binanceusdm", {}), None
    try:
        # ccxt: public GET ticker/24hr {'cost': 0.4, 'noSymbol': 16} (weight 80 × 0.2);
        # fapiPublic {'cost': 1, 'noSymbol': 40}
        assert spot.capabilities.tickers_request_cost == 16.0
        assert futures.capabilities.tickers_request_cost == 40.0
        other = CcxtExchange("okx", {})
        assert other.capabilities.tickers_request_cost == Capabilities().tickers_request_cost
    finally:
        for source in (spot, futures, other):
            if source is not None:
                await source.close()
