"""Configuration: YAML file + `TDA__SECTION__KEY` environment overrides, validated by pydantic.

Built once in `main` and handed down section by section. Every error becomes one readable line
naming the field, e.g. ``storage.backend: must be one of duckdb, bigquery``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yarl import URL

from .errors import UsageError
from .indicators import IndicatorSpec
from .timeframes import timeframe_ms

ENV_PREFIX = "TDA__"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MarketsFilter(_Section):
    quote: list[str] = Field(default_factory=list, description="Quote currencies to include.")
    type: Literal["spot", "swap", "future", "option", "margin"] = Field(
        "spot", description="Market type to include."
    )
    active_only: bool = Field(True, description="Skip markets the exchange marks inactive.")
    limit: int | None = Field(
        None, gt=0, description="Keep the top N by 24h quote volume (listing order if unknown)."
    )


class UsedWeightConfig(_Section):
    """The exchange's count of the weight the IP used in the current window, read from a
    response header; Binance's is known (X-MBX-USED-WEIGHT-1M, 6000 a minute)."""

    enabled: bool = Field(True, description="Slow down when the IP's used weight nears the limit.")
    header: str | None = Field(None, min_length=1, description="Header holding the used weight.")
    limit: int | None = Field(None, gt=0, description="Weight the exchange allows per window.")
    window_seconds: float | None = Field(None, gt=0, description="Window length; default 60.")


class RateLimitConfig(_Section):
    requests_per_second: float | None = Field(
        None, gt=0, description="The exchange's budget for this client; default from ccxt."
    )
    safety: float = Field(0.9, gt=0, le=1, description="Fraction of the budget the collector uses.")
    used_weight: UsedWeightConfig = Field(default_factory=UsedWeightConfig)
    budget_group: str | None = Field(
        None,
        min_length=1,
        description="With state_url: instances naming the same group share one budget (kept "
        "in the state database); default the exchange id. Instances behind different IPs get "
        "a budget each by naming different groups, e.g. binance-ip1.",
    )


class ArchiveConfig(_Section):
    """Bulk archives for deep history (history mode), where the exchange publishes them."""

    enabled: bool | None = Field(
        None,
        description="Fetch history from the exchange's public archives, REST only for the tail "
        "and the holes; default on where the exchange is known to publish them (binance spot, "
        "binanceusdm, binancecoinm).",
    )
    base_url: str | None = Field(
        None,
        description="The archive host's root (paths /data/spot/... hang below it); default the "
        "exchange's public archive host.",
    )
    concurrency: int = Field(
        32, ge=1, description="Archive files in flight per exchange (no REST weight is spent)."
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and value.partition("://")[0] not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        return value


class ExchangeConfig(_Section):
    id: str = Field(description="A ccxt exchange id, e.g. binance.")
    symbols: list[str] = Field(default_factory=list, description="ccxt unified symbols.")
    markets: MarketsFilter | None = Field(None, description="Resolve more symbols from markets.")
    timeframes: list[str] = Field(default_factory=lambda: ["1m"], min_length=1)
    ccxt: dict[str, Any] = Field(
        default_factory=dict, description="Passed verbatim to the ccxt constructor."
    )
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    archive: ArchiveConfig = Field(default_factory=ArchiveConfig)
    credentials_env: dict[str, str] = Field(
        default_factory=dict,
        description="ccxt credential field -> environment variable holding it (or VAR_FILE "
        "naming a file), e.g. {apiKey: BINANCE_API_KEY}. Public candles need none.",
    )

    @field_validator("id")
    @classmethod
    def _lowercase_id(cls, value: str) -> str:
        if not value or not value.replace("_", "").isalnum() or value != value.lower():
            raise ValueError("must be a lowercase ccxt exchange id such as binance")
        return value

    @field_validator("timeframes")
    @classmethod
    def _known_timeframes(cls, values: list[str]) -> list[str]:
        for value in values:
            timeframe_ms(value)
        return list(dict.fromkeys(values))

    @field_validator("ccxt")
    @classmethod
    def _no_inline_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        leaked = sorted(k for k in value if k in {"apiKey", "secret", "password", "privateKey"})
        if leaked:
            raise ValueError(
                f"{', '.join(leaked)} must not be in the config file; set it in the environment"
            )
        return value

    @model_validator(mode="after")
    def _has_symbols(self) -> ExchangeConfig:
        if not self.symbols and self.markets is None:
            raise ValueError("needs symbols or a markets block")
        return self


class IndicatorsConfig(_Section):
    """RSI (Wilder), EMA (SMA-seeded) and MACD on every closed candle; see README."""

    enabled: bool = Field(True, description="Compute and store indicator columns.")
    rsi_periods: list[int] = Field(default_factory=lambda: [6, 14, 24])
    ema_periods: list[int] = Field(default_factory=lambda: [12, 26])
    macd: tuple[int, int, int] | None = Field(
        (12, 26, 9), description="[fast, slow, signal]; null disables."
    )

    @model_validator(mode="after")
    def _valid_spec(self) -> IndicatorsConfig:
        self.spec()
        return self

    def spec(self) -> IndicatorSpec:
        return IndicatorSpec(tuple(self.rsi_periods), tuple(self.ema_periods), self.macd)


class DuckDBConfig(_Section):
    path: str = Field("data/ohlcv.duckdb", description="The DuckDB database file.")
    batch_rows: int = Field(
        262_144,
        gt=0,
        description="Commit once this many written rows wait (group commit). Archive files come "
        "faster than one commit takes: several in one transaction halve DuckDB's CPU per row.",
    )
    batch_seconds: float = Field(
        0.05,
        gt=0,
        description="History: commit at most this long after the first waiting write, long "
        "enough to gather the pages of many jobs, short enough that a job waiting for it stays "
        "busy. Live mode commits without waiting.",
    )
    memory_limit: str = Field(
        "32MB",
        pattern=r"(?i)^\s*\d+(\.\d+)?\s*([KMGT]i?B|B)\s*$",
        description="DuckDB's buffer pool ceiling; without one it caches the blocks written (up "
        "to 80% of RAM) and the process grows with the rows stored. It must hold the rows since "
        "the last checkpoint, uncompressed, plus a batch below a row group (122,880 rows; larger "
        "ones are written to the file directly): 24MB works.",
    )
    threads: int = Field(1, ge=1, description="DuckDB's threads (writes are serialised anyway).")


class BigQueryConfig(_Section):
    project: str | None = Field(None, description="GCP project; else GOOGLE_CLOUD_PROJECT.")
    dataset: str = "market_data"
    table: str = "market_data_ohlcv"
    location: str = "US"
    api_endpoint: str | None = Field(None, description="An emulator URL (anonymous credentials).")
    write_api_endpoint: str | None = Field(
        None,
        description="host:port of the Storage Write API (gRPC); an emulator's, plaintext, when "
        "api_endpoint is set; default Google's.",
    )
    write_path: Literal["storage_write_api", "legacy"] = Field(
        "storage_write_api",
        description="storage_write_api: committed stream (live), pending streams (history); "
        "legacy: insertAll and load jobs, for networks that refuse gRPC.",
    )
    partitioning: Literal["DAY", "MONTH"] = Field(
        "DAY", description="Partition by DATE(timestamp) or by month (decades of 1d candles)."
    )
    load_batch_rows: int = Field(
        100_000, ge=1, description="History: rows per commit (a pending stream or load job)."
    )
    load_batch_seconds: float = Field(
        10.0, gt=0, description="History: commit at most this long after a page."
    )

    @model_validator(mode="after")
    def _write_api_endpoint_with_an_emulator(self) -> BigQueryConfig:
        if self.api_endpoint and not self.write_api_endpoint and self.write_path != "legacy":
            raise ValueError(
                "write_api_endpoint: required with api_endpoint (the emulator's gRPC host:port), "
                "or set write_path: legacy"
            )
        return self


class StorageConfig(_Section):
    backend: Literal["duckdb", "bigquery"] = "duckdb"
    duckdb: DuckDBConfig = Field(default_factory=DuckDBConfig)
    bigquery: BigQueryConfig = Field(default_factory=BigQueryConfig)


class LokiConfig(_Section):
    url: str | None = Field(
        None, description="Loki push URL, e.g. http://loki:3100/loki/api/v1/push; null disables."
    )
    tenant_env: str = Field(
        "LOKI_TENANT_ID", description="Environment variable holding the X-Scope-OrgID tenant."
    )
    username_env: str = Field(
        "LOKI_USERNAME", description="Environment variable holding the basic-auth user."
    )
    password_env: str = Field(
        "LOKI_PASSWORD", description="Environment variable holding the basic-auth password."
    )
    batch_size: int = Field(500, ge=1, description="Entries per push request at most.")
    batch_wait_seconds: float = Field(
        1.0, gt=0, description="Push at least this often while entries wait."
    )
    queue_size: int = Field(
        10_000, ge=1, description="Entries held while Loki is slow or down; the oldest drop."
    )
    timeout_seconds: float = Field(5.0, gt=0, description="Timeout of one push request.")

    @field_validator("url")
    @classmethod
    def _http_url_without_credentials(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme, _, rest = value.partition("://")
        if scheme not in ("http", "https") or not rest:
            raise ValueError("must be an http:// or https:// URL")
        if "@" in rest.split("/", 1)[0]:
            raise ValueError("must not contain credentials; set LOKI_USERNAME and LOKI_PASSWORD")
        return value


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    loki: LokiConfig = Field(default_factory=LokiConfig)


class AdminConfig(_Section):
    host: str = Field(
        "127.0.0.1",
        description="Listen address of /metrics, /healthz, /readyz (0.0.0.0 in a container).",
    )
    port: int = Field(8080, ge=0, le=65535, description="0 disables the admin server.")
    token_env: str = Field(
        "TDA_ADMIN_TOKEN",
        description="Environment variable holding the bearer token that the admin API's "
        "changes (POST, PUT, DELETE) need when host is not loopback (unset: refused there).",
    )
    daemon_url: str | None = Field(
        None,
        description="Where `--mode=history` finds the running daemon to hand its range to, "
        "e.g. http://collector:8080 from another container; default: host and port above "
        "(a wildcard host reached through loopback).",
    )

    @field_validator("daemon_url")
    @classmethod
    def _daemon_url(cls, value: str | None) -> str | None:
        """An http(s) base URL with a host and nothing after the path: no credentials (the
        token goes in a header), no query, no fragment. Stored without a trailing slash."""
        if value is None:
            return None
        try:
            url = URL(value)
            port = url.port  # a malformed port raises here
        except ValueError:
            url, port = URL(), None
        if (
            url.scheme not in ("http", "https")
            or not url.host
            or port is None
            or url.user is not None
            or url.query_string
            or url.fragment
        ):
            raise ValueError("must be an http:// or https:// URL such as http://collector:8080")
        return str(url).rstrip("/")


class RetryConfig(_Section):
    """Exponential backoff with jitter for transient exchange faults, per page."""

    base_seconds: float = Field(1.0, gt=0)
    factor: float = Field(2.0, ge=1)
    cap_seconds: float = Field(32.0, gt=0)
    attempts: int = Field(5, ge=1)
    retry_after_max_seconds: float = Field(
        600.0,
        gt=0,
        description="An exchange's Retry-After (or ban) longer than this is still waited out, "
        "but reported: an exchange_paused error, a metric, a reason on /readyz.",
    )
    exchange_failure_limit: int = Field(
        10, ge=0, description="Stop an exchange's remaining jobs after more failed jobs than this."
    )


class Config(_Section):
    service_name: str = "tda-collector"
    environment: str = "dev"
    exchanges: list[ExchangeConfig] = Field(min_length=1)
    update_interval_seconds: float = Field(
        60, gt=0, description="Live mode: how often the open candle is refreshed."
    )
    live_settle_seconds: float = Field(
        2.0, ge=0, description="Live mode: wait this long after a close for the exchange."
    )
    live_initial_candles: int = Field(
        1000, ge=1, description="Live mode: candles fetched for a series with nothing stored."
    )
    live_page_limit: int = Field(
        1000,
        ge=1,
        description="Live mode: candles per request (catch-up after downtime), "
        "clamped to the exchange's maximum.",
    )
    live_concurrency: int = Field(
        16, ge=1, description="Live mode: syncs in flight per exchange at one due instant."
    )
    history_page_limit: int = Field(
        1000,
        ge=1,
        description="History mode: candles per request, clamped to the exchange's maximum.",
    )
    history_concurrency: int = Field(
        16, ge=1, description="Jobs in flight per exchange; enough to fill the budget at latency."
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)
    state_path: str = Field(
        "data/state.sqlite",
        description="The embedded state (SQLite): jobs, cursors, coverage ledger, indicator "
        "state. Unused when state_url is set.",
    )
    state_url: SecretStr | None = Field(
        None,
        description="postgresql://user:pass@host:5432/db: state shared by several instances "
        "(secret: never logged; set it with TDA__STATE_URL, or leave the password out and let "
        "libpq read PGPASSWORD or PGPASSFILE). Needs storage.backend bigquery.",
    )
    instance_id: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Names this instance in leases, events and /instances; default hostname-pid.",
    )
    lease_seconds: float = Field(
        15.0,
        ge=1,
        description="With state_url: a job's lease lasts this long unless its instance renews "
        "it (every third of it); a dead instance's jobs are taken over after it.",
    )
    lease_chunk_pages: int = Field(
        10,
        ge=1,
        description="With state_url, history mode: pages of a job worked per claim, after "
        "which it is let go for any instance to take on.",
    )
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    indicators: IndicatorsConfig = Field(default_factory=IndicatorsConfig)

    @field_validator("state_url")
    @classmethod
    def _shared_state(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        """A Postgres URL, and a store that several writers can share. The URL itself is never
        echoed in the message: it may hold the password."""
        if value is None:
            return None
        scheme = value.get_secret_value().partition("://")[0]
        if scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// URL")
        storage = info.data.get("storage")
        if isinstance(storage, StorageConfig) and storage.backend == "duckdb":
            raise ValueError(
                "needs storage.backend bigquery: a DuckDB file cannot be shared by instances"
            )
        return value

    @field_validator("exchanges")
    @classmethod
    def _unique_ids(cls, values: list[ExchangeConfig]) -> list[ExchangeConfig]:
        ids = [e.id for e in values]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"exchange listed twice: {', '.join(duplicates)}")
        return values


def resolve_credentials(config: Config, environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Exchange id -> ccxt credential fields, read from the environment (never from the file).

    `VAR` holds the value itself; `VAR_FILE` names a file holding it (Docker/Kubernetes secrets).
    """
    resolved: dict[str, dict[str, str]] = {}
    for index, exchange in enumerate(config.exchanges):
        fields = {}
        for field, variable in exchange.credentials_env.items():
            value = environ.get(variable)
            if value is None and environ.get(variable + "_FILE"):
                try:
                    value = Path(environ[variable + "_FILE"]).read_text(encoding="utf-8").strip()
                except OSError as exc:
                    raise UsageError(
                        f"exchanges[{index}].credentials_env.{field}: cannot read the file named"
                        f" by {variable}_FILE ({exc.strerror})"
                    ) from None
            if not value:
                raise UsageError(
                    f"exchanges[{index}].credentials_env.{field}: {variable} is not set"
                )
            fields[field] = value
        resolved[exchange.id] = fields
    return resolved


def _parse_env_value(text: str) -> Any:
    """Env values are YAML scalars or flow lists, so `[BTC/USDT, ETH/USDT]` and `null` work."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _set_path(tree: Any, path: list[str], value: Any, name: str) -> None:
    node = tree
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UsageError(f"{name}: no list item {part} to override")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise UsageError(f"{name}: {'.'.join(path[:i])} is not a section")


def apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Apply `TDA__SECTION__KEY=value` (list items by index: `TDA__EXCHANGES__0__SYMBOLS`)."""
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
            _set_path(raw, path, _parse_env_value(environ[name]), name)
    return raw


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "config"


def _describe(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "literal_error":
        expected = str(error.get("ctx", {}).get("expected", ""))
        return "must be one of " + expected.replace("'", "").replace(" or ", ", ")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "is required"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def format_validation_error(error: ValidationError) -> str:
    """All problems on one line: `field: problem; field: problem`."""
    parts = []
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function")))
        parts.append(f"{_field_path(loc)}: {_describe(item)}")
    return "; ".join(parts)


def load_config(path: str | Path | None, environ: Mapping[str, str]) -> Config:
    """Read, override from the environment and validate; UsageError with one line on failure."""
    config_path = Path(path or environ.get("CONFIG_PATH") or "config.yaml")
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--config: file not found: {config_path}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"{config_path}: not valid YAML{where}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UsageError(f"{config_path}: the top level must be a mapping of keys")
    raw = apply_env_overrides(raw, environ)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc)) from None
