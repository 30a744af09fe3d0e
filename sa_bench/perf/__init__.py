"""Benchmark scripts that print measured figures (python -m sa_bench.perf.<name>)."""
