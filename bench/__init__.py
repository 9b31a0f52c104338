"""Benchmarks that write machine-readable results under var/bench/."""
