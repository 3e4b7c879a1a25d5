"""Measurement: parameter and MAC counts, latency and training throughput, run conditions.

`macs` counts (fvcore), `timing` turns timed calls into latency statistics, `throughput` times
full training steps, `env` records the conditions, `sources` finds what to measure and `bench`
runs sweeps and writes result files (tools/benchmark.py is its command line).
"""
from .env import conditions, git_commit
from .macs import MacCount, count_macs, count_params
from .throughput import build_train_step, measure_throughput
from .timing import LatencyStats, measure_latency, percentile, summarize, time_calls

__all__ = ["LatencyStats", "MacCount", "build_train_step", "conditions", "count_macs",
           "count_params", "git_commit", "measure_latency", "measure_throughput", "percentile",
           "summarize", "time_calls"]
