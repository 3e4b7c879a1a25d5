"""Latency statistics: time `n` calls after a warm-up and summarise them.

How a call is timed (DESIGN.md §5, airbench, torch.utils.benchmark's advice):
- warm-up calls run first and are never timed (torch.compile / cuDNN autotuning / CUDA-graph
  capture / allocator growth happen there);
- on CUDA each call sits between two CUDA events; the host never waits between calls, and the
  elapsed times are read once after a final synchronize, so timing adds no sync of its own;
- elsewhere (CPU, or when a clock is injected) a monotonic clock is read around each call, with
  the device synchronised before each reading when it is a CUDA device;
- `clock` can be injected, so tests check the statistics exactly with a fake clock.

Percentiles use linear interpolation between closest ranks (numpy's default, "type 7").
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) of `values`, linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class LatencyStats:
    """Summary of per-call times of a batch of `batch_size` images (milliseconds).

    `std_ms` is the sample standard deviation (n - 1; 0 for one call). `images_per_s` is
    `batch_size / mean`: the throughput of back-to-back calls.
    """

    n: int
    batch_size: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    images_per_s: float

    def as_row(self, prefix: str = "latency") -> dict[str, float | int]:
        """Flat row fields: `{prefix}_n`, `{prefix}_ms_mean`, ..., `images_per_s`."""
        d = asdict(self)
        row: dict[str, float | int] = {f"{prefix}_n": d.pop("n")}
        d.pop("batch_size")
        row["images_per_s"] = d.pop("images_per_s")
        for k, v in d.items():
            row[f"{prefix}_ms_{k.removesuffix('_ms')}"] = v
        return row


def summarize(times_s: Sequence[float], batch_size: int) -> LatencyStats:
    """Statistics of per-call durations `times_s` (seconds) for batches of `batch_size` images."""
    if not times_s:
        raise ValueError("no timed calls")
    ms = [t * 1e3 for t in times_s]
    n = len(ms)
    mean = sum(ms) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in ms) / (n - 1)) if n > 1 else 0.0
    return LatencyStats(n=n, batch_size=batch_size, mean_ms=mean, std_ms=std, min_ms=min(ms),
                        p50_ms=percentile(ms, 50), p90_ms=percentile(ms, 90),
                        p99_ms=percentile(ms, 99), max_ms=max(ms),
                        images_per_s=batch_size / (mean / 1e3) if mean > 0 else math.inf)


class ClockTimer:
    """Times calls with `clock()` (seconds), calling `sync()` before each reading."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 sync: Callable[[], None] | None = None) -> None:
        self.clock, self.sync = clock, sync
        self._times: list[float] = []
        self._t0 = 0.0

    def start(self) -> None:
        if self.sync is not None:
            self.sync()
        self._t0 = self.clock()

    def stop(self) -> None:
        if self.sync is not None:
            self.sync()
        self._times.append(self.clock() - self._t0)

    def times(self) -> list[float]:
        return list(self._times)


class CudaEventTimer:
    """Times calls with pairs of CUDA events on the current stream; reads them once at the end."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    # Recorded on `device`'s stream, not the current device's: timing work on cuda:1 from a
    # process whose current device is cuda:0 measured an empty interval.
    def start(self) -> None:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        self._events.append((ev, torch.cuda.Event(enable_timing=True)))

    def stop(self) -> None:
        self._events[-1][1].record(torch.cuda.current_stream(self.device))

    def times(self) -> list[float]:
        torch.cuda.synchronize(self.device)  # sync point: once, after all timed calls
        return [a.elapsed_time(b) / 1e3 for a, b in self._events]


def cuda_graph_replay(fn: Callable[[], object], device: torch.device | str | None = None,
                      warmup: int = 3) -> Callable[[], None]:
    """`fn` captured once in a CUDA graph; returns the graph's replay. `fn` first runs `warmup`
    times on a side stream, so lazy allocations, cuDNN algorithm choices and compilation happen
    outside the graph (PyTorch's CUDA-graphs notes). Tensors `fn` allocates during capture come
    from the graph's private pool and are rewritten by every replay; `fn` must not synchronise
    with the host."""
    # On `device` (torch.cuda.graph captures on a stream of the current device: work on
    # another device would not be in the graph)
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    return graph.replay


def make_timer(device: torch.device | str, clock: Callable[[], float] | None = None):
    """CUDA events on a CUDA device, else a synchronised clock; an injected `clock` always wins."""
    device = torch.device(device)
    if device.type == "cuda":
        if clock is None:
            return CudaEventTimer(device)
        return ClockTimer(clock, sync=lambda: torch.cuda.synchronize(device))
    return ClockTimer(clock or time.perf_counter)


def time_calls(fn: Callable[[], object], *, iters: int, warmup: int,
               device: torch.device | str = "cpu",
               clock: Callable[[], float] | None = None) -> list[float]:
    """Call `fn` `warmup` times untimed, then `iters` times timed; per-call seconds.

    Raises:
        ValueError: `iters` < 1 or `warmup` < 0.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync point: warm-up work must not leak into the timing
    timer = make_timer(device, clock)
    for _ in range(iters):
        timer.start()
        fn()
        timer.stop()
    return timer.times()


def measure_latency(fn: Callable[[], object], batch_size: int, *, iters: int, warmup: int,
                    device: torch.device | str = "cpu",
                    clock: Callable[[], float] | None = None) -> LatencyStats:
    """Inference latency of `fn` (one forward pass of a `batch_size` batch) under
    `torch.inference_mode()`, warm-up excluded. See `time_calls` for the timing rules."""
    with torch.inference_mode():
        times = time_calls(fn, iters=iters, warmup=warmup, device=device, clock=clock)
    return summarize(times, batch_size)
