"""Training throughput: images/s of full training steps on device-resident synthetic data.

One step is what the engine's hot loop does: zero the gradients, forward under the precision's
autocast, cross-entropy, backward (through a GradScaler for fp16), SGD-with-momentum step. The
batch is random data created once on the device, so the number is the model's and the
optimizer's, not the data loader's (DESIGN.md §5). Steps are timed one by one with the rules of
`fasttrain.measure.timing` (warm-up, compile and CUDA-graph capture excluded).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .timing import LatencyStats, cuda_graph_replay, summarize, time_calls

TRAIN_MODES = ("eager", "compile", "cudagraphs", "compile-cudagraphs")
"""eager; compile: torch.compile(model, dynamic=False) after torch.compiler.reset();
cudagraphs: the whole step (forward, backward and optimizer) captured once in a CUDA graph and
replayed (CUDA only; not with fp16's GradScaler); compile-cudagraphs: torch.compile's
"reduce-overhead" mode (the compiled forward and backward replayed as CUDA graphs, the fused
optimizer step outside them; CUDA only). Thin networks take so little GPU time per kernel that
launching the kernels from the CPU can cost more than running them: the graph modes show how
much."""

CUDA_ONLY_MODES = ("cudagraphs", "compile-cudagraphs")
COMPILE_MODES = {"compile": None, "compile-cudagraphs": "reduce-overhead"}
"""Benchmark mode -> torch.compile mode, for the modes that compile."""


def compile_fresh(model: nn.Module, mode: str) -> nn.Module:
    """`model` compiled for benchmark `mode` (one of COMPILE_MODES) with static shapes, after
    torch.compiler.reset(): each batch size gets its own graph, as the engine's fixed-size batches
    do; a shared cache would turn the second size into a slower dynamic-shape graph and count
    towards the recompile limit."""
    torch.compiler.reset()
    return torch.compile(model, dynamic=False, mode=COMPILE_MODES[mode])


def autocast_context(device: torch.device, precision: str, cache_enabled: bool = True
                     ) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context for `precision` ("fp32": a no-op context)."""
    # Imported here: fasttrain.engine imports fasttrain.measure, so a module-level import would
    # make the two packages' import order matter. One precision table for the whole project.
    from ..engine.precision import resolve_precision

    dtype = resolve_precision(precision).autocast_dtype
    if dtype is None:
        return contextlib.nullcontext
    # CUDA graphs need the autocast weight-cast cache off (it would hold tensors from capture).
    return lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)


def build_train_step(model: nn.Module, *, batch_size: int, resolution: int, num_classes: int,
                     device: torch.device | str, precision: str = "fp32",
                     channels_last: bool = True, mode: str = "eager", in_chans: int = 3,
                     lr: float = 1e-3) -> Callable[[], None]:
    """A zero-argument function running one training step of `model` (trained in place).

    Args:
        model: the network; moved to `device` (and channels-last) and put in train mode.
        batch_size, resolution, in_chans: the synthetic batch, created once on the device.
        num_classes: range of the random labels.
        precision: "fp32" | "bf16" | "fp16" (autocast; fp16 adds a GradScaler).
        mode: one of TRAIN_MODES.
        lr: SGD learning rate; small, so weights stay finite over long measurements.

    Raises:
        ValueError: unknown mode or precision, a batch_size < 1, CUDA graphs off CUDA or with
            fp16.
    """
    device = torch.device(device)
    if mode not in TRAIN_MODES:
        raise ValueError(f"training mode must be one of {', '.join(TRAIN_MODES)}, got {mode!r}")
    from ..engine.precision import PRECISIONS

    if precision not in PRECISIONS:  # a bare KeyError: 'fp8' from the autocast table
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mode in CUDA_ONLY_MODES and device.type != "cuda":
        raise ValueError(f"{mode} mode needs a CUDA device")
    if mode == "cudagraphs" and precision == "fp16":
        raise ValueError("cudagraphs training does not support fp16's GradScaler; use bf16")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train()
    x = torch.randn(batch_size, in_chans, resolution, resolution, device=device
                    ).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    # Fused SGD on CUDA as the engine uses; foreach where a graph captures the step.
    fused = device.type == "cuda" and mode != "cudagraphs"
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, fused=fused or None)
    autocast = autocast_context(device, precision, cache_enabled=mode != "cudagraphs")
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    net = model
    graph_trees = mode == "compile-cudagraphs"
    if mode in COMPILE_MODES:
        net = compile_fresh(model, mode)

    def step() -> None:
        if graph_trees:  # one training iteration: the graphs' previous outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(net(x), y)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    if mode != "cudagraphs":
        return step

    # Whole-step capture (PyTorch CUDA-graphs docs, "whole network capture"): the step's
    # zero_grad(set_to_none) inside the capture lets backward allocate the gradients from the
    # graph's pool, where every replay rewrites them.
    return cuda_graph_replay(step, device)


def measure_throughput(model: nn.Module, *, batch_size: int, resolution: int, num_classes: int,
                       iters: int, warmup: int, device: torch.device | str,
                       precision: str = "fp32", channels_last: bool = True, mode: str = "eager",
                       in_chans: int = 3, clock: Callable[[], float] | None = None
                       ) -> LatencyStats:
    """Per-step time statistics and images/s (`batch_size / mean step time`) of `iters` training
    steps after `warmup` untimed ones; see `build_train_step` for the step and its arguments."""
    step = build_train_step(model, batch_size=batch_size, resolution=resolution,
                            num_classes=num_classes, device=device, precision=precision,
                            channels_last=channels_last, mode=mode, in_chans=in_chans)
    times = time_calls(step, iters=iters, warmup=warmup, device=device, clock=clock)
    return summarize(times, batch_size)
