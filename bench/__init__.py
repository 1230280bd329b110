"""Benchmarks: run with `make bench` (python -m bench). No timing thresholds live in tests."""
