#!/usr/bin/env python
"""Where a fused BN+ReLU training step's time goes, next to eager BatchNorm2d + ReLU (CUDA).

    python benchmarks/profile_bn_relu.py --shapes 256,512,7,7 256,64,112,112

For each (N, C, H, W) shape, bf16 channels-last as in bench_bn_relu.py: the wall time of a step
(forward, running-stat update, torch.autograd.grad of x/weight/bias) when steps run back to back,
the GPU time its kernels take (torch.profiler, CUDA activity), and a table of the kernels by GPU
time per step. A step whose wall time far exceeds its kernels' time is bound by the host (Python,
dispatch, launches), not by the kernels. Prints only, the conditions (GPU, driver, torch, CUDA,
commit, date) first, so that a saved copy of the output says what it measured; nothing is
asserted or written.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _args import fail  # noqa: E402
from fasttrain.cli import ArgumentParser, int_at_least  # noqa: E402
from fasttrain.measure.env import conditions  # noqa: E402
from fasttrain.ops.bn_relu import BatchNormReLU2d  # noqa: E402

_positive = int_at_least(1)


def shape_arg(text: str) -> tuple[int, ...]:
    """argparse type: "N,C,H,W" of positive integers."""
    dims = text.split(",")
    if len(dims) != 4:
        raise argparse.ArgumentTypeError(f"expected N,C,H,W, got {text!r}")
    try:
        return tuple(_positive(d) for d in dims)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def step_fn(impl: str, shape: tuple[int, ...], device: torch.device):
    C = shape[1]
    m = (BatchNormReLU2d(C) if impl == "fused"
         else nn.Sequential(nn.BatchNorm2d(C), nn.ReLU(inplace=True))).to(device).train()
    x = torch.randn(shape, device=device).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn_like(x)
    params = list(m.parameters())
    return lambda: torch.autograd.grad(m(x), [x, *params], grad)


def wall_ms(fn, iters: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / iters


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=shape_arg, nargs="+", metavar="N,C,H,W",
                   default=[(256, 512, 7, 7), (256, 256, 14, 14), (256, 64, 56, 56),
                            (256, 64, 112, 112)])
    p.add_argument("--iters", type=_positive, default=50)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        fail("profile_bn_relu.py needs a CUDA device (torch.cuda.is_available() is False)")
    device = torch.device("cuda")
    cond = conditions(device)
    print("# " + ", ".join(f"{key} {cond[key]}" for key in (
        "device_name", "driver", "torch_version", "cuda_version", "commit", "date")))
    for shape in args.shapes:
        for impl in ("fused", "eager"):
            fn = step_fn(impl, shape, device)
            for _ in range(10):
                fn()
            wall = wall_ms(fn, args.iters)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(args.iters):
                    fn()
                torch.cuda.synchronize()
            events = prof.key_averages()
            kernels = [e for e in events if e.device_time_total > 0
                       and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
            if not kernels:  # a profiler without per-kernel device types: its own table
                print(events.table(sort_by="device_time_total", row_limit=12))
                continue
            gpu_ms = sum(e.device_time_total for e in kernels) / 1e3 / args.iters
            print(f"{impl:5s} {shape}: wall {wall:.3f} ms/step, kernels {gpu_ms:.3f} ms/step")
            for e in sorted(kernels, key=lambda e: -e.device_time_total)[:8]:
                print(f"    {e.device_time_total / args.iters:8.1f} us  x{e.count // args.iters:<2d}"
                      f" {e.key[:90]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
