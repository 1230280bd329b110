"""tda-collector: exchange OHLCV candles into DuckDB or BigQuery, live and history."""

__version__ = "0.1.0"
