"""The local-stack supervisor: backing services, `make run` and `make demo`. It may start and
import anything; nothing imports it (but the benchmarks, which run on top of it)."""
