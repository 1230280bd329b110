"""Command line: parse, load the config, run the mode; usage errors exit 2 with one line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import NoReturn

from .app import run
from .config import load_config, resolve_credentials
from .errors import EXIT_USAGE, UsageError
from .exchange.runtime import RunRequest, ccxt_source_factory
from .observability.events import EventLog, build_logger
from .observability.loki import build_loki_handler
from .observability.metrics import Metrics
from .timeframes import timeframe_ms

PROG = "tda-collector"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Collect exchange OHLCV candles into a store.")
    parser.add_argument("--config", help="config file (default $CONFIG_PATH, else ./config.yaml)")
    parser.add_argument("--mode", required=True, choices=["live", "history"])
    parser.add_argument("--start", help="history: first candle open time, ISO 8601 (UTC default)")
    parser.add_argument("--end", help="history: end of the half-open range (default now)")
    parser.add_argument("--exchange", action="append", default=[], help="only this exchange")
    parser.add_argument("--symbol", action="append", default=[], help="only this symbol")
    parser.add_argument("--timeframe", action="append", default=[], help="only this timeframe")
    return parser


def parse_instant(text: str, option: str) -> int:
    """ISO 8601 date or date-time to epoch ms; no zone means UTC."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{option}: not an ISO 8601 date or date-time: {text!r}") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


def parse_request(argv: Sequence[str], now_ms: int) -> tuple[str | None, RunRequest]:
    args = build_parser().parse_args(list(argv))
    for tf in args.timeframe:
        try:
            timeframe_ms(tf)
        except ValueError as exc:
            raise UsageError(f"--timeframe: {exc}") from None
    if args.mode == "live":
        if args.start or args.end:
            raise UsageError(f"{'--start' if args.start else '--end'}: not allowed in live mode")
        start = end = None
    else:
        if not args.start:
            raise UsageError("--start: required in history mode")
        start = parse_instant(args.start, "--start")
        end = parse_instant(args.end, "--end") if args.end else now_ms
        if start >= end:
            raise UsageError("--start: must be before --end")
    request = RunRequest(
        mode=args.mode,
        start_ms=start,
        end_ms=end,
        exchanges=tuple(dict.fromkeys(args.exchange)),
        symbols=tuple(dict.fromkeys(args.symbol)),
        timeframes=tuple(dict.fromkeys(args.timeframe)),
    )
    return args.config, request


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    try:
        config_path, request = parse_request(sys.argv[1:] if argv is None else argv, now_ms)
        config = load_config(config_path, environ)
        logger = build_logger(f"{PROG}.{os.getpid()}", config.logging.level)
        events = EventLog(
            logger,
            {
                "service_name": config.service_name,
                "environment": config.environment,
                "mode": request.mode,
            },
        )
        metrics = Metrics()
        loki = build_loki_handler(config.logging.loki, environ, metrics, events)
        if loki is not None:
            logger.addHandler(loki)
        try:
            events.info(
                "config_loaded",
                f"{len(config.exchanges)} exchange(s), storage {config.storage.backend}",
                exchanges=[e.id for e in config.exchanges],
                backend=config.storage.backend,
                state="postgres" if config.state_url is not None else "sqlite",
                loki=loki is not None,
            )
            factory = ccxt_source_factory(resolve_credentials(config, environ))
            token = environ.get(config.admin.token_env) or None
            return asyncio.run(run(config, request, events, metrics, factory, token, environ))
        finally:
            if loki is not None:
                logger.removeHandler(loki)
                loki.close()
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
