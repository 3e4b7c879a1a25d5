#!/usr/bin/env python
"""What fasttrain's C resize+flip gives the torch and DALI loaders: a paired A/B, same process.

    bash tools/env.sh python benchmarks/bench_native_resize.py                 # torch and dali
    bash tools/env.sh python benchmarks/bench_native_resize.py --backends torch --rounds 20

For each backend, two training loaders over bench_loaders.py's ImageNet-like JPEG set (same
transform: RandomResizedCrop 224 + flip, uint8 channels-last batches, no model): one finishing
crops with `fasttrain_resize_flip_rgb_u8` (the default: straight into the batch), one with
torch's ops per sample and a copy into the batch (what a build without the function does,
`resize.AVAILABLE` switched off). Epochs of the two alternate (ABBA order), so each pair is
measured a few seconds apart: bench_loaders.py compares backends against a bracketing decode
limit, and on this VM that drifts by more than the effect measured here. Per epoch: images/s
and CPU-ms per image of the loader's process and its worker processes (psutil). The table gives
the median ratio (C / torch's ops) over the rounds and its per-round range.

Throughput pairs still scatter by ±20 % here, so the torch backend's per-image work is also
timed where scheduling cannot blur it: in this process, one thread, no workers, the dataset and
the collate function called directly on 5-batch chunks of the epoch, C and torch's ops
alternating (process CPU time per image; the same chunks both ways).

Writes `benchmarks/results/native-resize-cpu-<workers>w.json`.
"""
from __future__ import annotations

import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _args import check_out, fail, items, settings_suffix, subset_suffix, write_json  # noqa: E402
from bench_loaders import backend_cfg, make_bench_set, native_resize, train_loader  # noqa: E402
from fasttrain.cli import ArgumentParser, int_at_least  # noqa: E402
from fasttrain.config import MAX_WORKERS  # noqa: E402
from fasttrain.data import build_loaders, resize  # noqa: E402
from fasttrain.data.datasets import default_root  # noqa: E402
from fasttrain.data.loader import torch_threads  # noqa: E402
from fasttrain.measure.env import conditions, usable_cores  # noqa: E402

BATCH = 64


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of `process` and its live children (the DataLoader workers)."""
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def timed_epoch(loader, epoch: int, native: bool) -> tuple[float, float]:
    """(images/s, CPU-ms per image) of one epoch of `loader`."""
    me = psutil.Process()
    with native_resize(native):
        loader.set_epoch(epoch)
        cpu, start, seen = cpu_seconds(me), time.perf_counter(), 0
        for images, _ in loader:
            seen += images.shape[0]
        wall, cpu = time.perf_counter() - start, cpu_seconds(me) - cpu
    return seen / wall, 1e3 * cpu / seen


def in_process_cpu_us(root: Path, rounds: int) -> dict[str, object]:
    """CPU-us per image of the torch backend's sample + collate work, one thread, no workers,
    C and torch's ops on the same chunks in alternating order."""
    cfg = backend_cfg(root, "torch", 0, BATCH)
    loader = build_loaders(cfg.data, cfg.aug, channels_last=True, dtype=torch.uint8).train
    dataset, collate = loader.loader.dataset, loader.loader.collate_fn
    chunk = min(5, len(dataset) // BATCH) * BATCH
    starts = range(0, max(1, len(dataset) - chunk + 1), chunk)

    def run(native: bool, start: int) -> float:
        keys = [(1, i, 0) for i in range(start, start + chunk)]
        with native_resize(native), torch_threads(1):
            cpu = time.process_time()
            for b in range(0, chunk, BATCH):
                collate([dataset[k] for k in keys[b:b + BATCH]])
            return 1e6 * (time.process_time() - cpu) / chunk

    run(True, 0), run(False, 0)  # warm-up: page cache, allocator
    times: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(rounds):
        start = starts[round_ % len(starts)]
        for native in ((True, False) if round_ % 2 == 0 else (False, True)):
            times[native].append(run(native, start))
    ratios = [a / b for a, b in zip(times[True], times[False])]
    return {"native": round(statistics.median(times[True]), 1),
            "torch_ops": round(statistics.median(times[False]), 1),
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_rounds": [round(r, 3) for r in ratios]}


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="torch,dali",
                   help="default: %(default)s; another set is written to a result file named "
                   "after it")
    p.add_argument("--workers", type=int_at_least(1, MAX_WORKERS), default=usable_cores(),
                   help="loader workers and threads (default: every core it may use)")
    # One batch at least: the loaders drop a partial batch, the in-process timing splits whole
    # batches (and 64 images fill every class folder).
    p.add_argument("--images", type=int_at_least(BATCH), default=1280,
                   help=f"training images in the set (at least one batch, {BATCH})")
    p.add_argument("--rounds", type=int_at_least(1), default=12,
                   help="A/B pairs of epochs per backend")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    names = items("--backends", args.backends, ("torch", "dali"))
    out = check_out(args.out, ROOT / "benchmarks" / "results" / f"native-resize-cpu-"
                    f"{args.workers}w{subset_suffix(names, ['torch', 'dali'])}"
                    f"{settings_suffix(args, p, ['images', 'rounds'])}.json")
    if not resize.AVAILABLE:
        fail(f"fasttrain's resize function is not built: {resize.LOAD_ERROR}")
    torch.set_num_threads(args.workers)
    root = make_bench_set(default_root(f"bench_jpeg-{args.images}"), args.images)

    rows = []
    for name in names:
        cfg = backend_cfg(root, name, args.workers, BATCH)
        loaders = {}
        for native in (True, False):
            with native_resize(native):  # kept by torch's workers, however they start
                loaders[native] = train_loader(cfg)
            timed_epoch(loaders[native], 0, native)  # warm-up: workers, page cache
        runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for round_ in range(args.rounds):
            for native in ((True, False) if round_ % 2 == 0 else (False, True)):
                rate, cpu = timed_epoch(loaders[native], round_ + 1, native)
                runs[native].append((rate, cpu))
                print(f"{name:6s} round {round_ + 1}/{args.rounds}  "
                      f"{'C resize+flip' if native else 'torch ops':14s} {rate:7.1f} img/s "
                      f"{cpu:5.2f} CPU-ms/img", flush=True)
        del loaders
        ratios = [a[0] / b[0] for a, b in zip(runs[True], runs[False])]
        cpu_ratios = [a[1] / b[1] for a, b in zip(runs[True], runs[False])]
        rows.append({
            "backend": name,
            "images_per_s": {"native": round(statistics.median(r for r, _ in runs[True]), 1),
                             "torch_ops": round(statistics.median(r for r, _ in runs[False]), 1)},
            "cpu_ms_per_image": {"native": round(statistics.median(c for _, c in runs[True]), 3),
                                 "torch_ops": round(statistics.median(c for _, c in runs[False]),
                                                    3)},
            "speedup_median": round(statistics.median(ratios), 3),
            "speedup_rounds": [round(r, 3) for r in ratios],
            "cpu_ratio_median": round(statistics.median(cpu_ratios), 3),
            "rounds": {"native": [[round(r, 1), round(c, 3)] for r, c in runs[True]],
                       "torch_ops": [[round(r, 1), round(c, 3)] for r, c in runs[False]]},
        })
        if name == "torch":
            rows[-1]["in_process_cpu_us_per_image"] = in_process_cpu_us(root, args.rounds)
    result = {"benchmark": "bench_native_resize", "date": datetime.now(timezone.utc).isoformat(),
              **conditions("cpu"), "set": {"images": args.images, "root": root.name},
              "transform": "RandomResizedCrop 224 scale (0.08, 1) + flip, uint8 channels-last",
              "workers": args.workers, "batch_size": BATCH, "rounds": args.rounds,
              "rows": rows}
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"C resize+flip vs torch's ops, {args.workers} workers, "
                        f"{args.rounds} A/B rounds")
    for col in ("backend", "img/s C / ops", "speed-up (median)", "per round",
                "CPU-ms/img C / ops", "one process: CPU-us/img C / ops (ratio)"):
        table.add_column(col, justify="right")
    for r in rows:
        one = r.get("in_process_cpu_us_per_image")
        table.add_row(r["backend"],
                      f"{r['images_per_s']['native']:.0f} / {r['images_per_s']['torch_ops']:.0f}",
                      f"{r['speedup_median']:.3f}",
                      f"{min(r['speedup_rounds']):.2f}-{max(r['speedup_rounds']):.2f}",
                      f"{r['cpu_ms_per_image']['native']:.2f} / "
                      f"{r['cpu_ms_per_image']['torch_ops']:.2f}",
                      "-" if one is None else
                      f"{one['native']:.0f} / {one['torch_ops']:.0f} ({one['ratio_median']:.3f})")
    Console().print(table)
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
