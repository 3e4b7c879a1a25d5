"""Measurement: parameter and MAC counts (latency and throughput come with the benchmark tools)."""
from .macs import MacCount, count_macs, count_params

__all__ = ["MacCount", "count_macs", "count_params"]
