#!/usr/bin/env python
"""Images/s of the CIFAR recipes' augmentation on the torch and resident backends, same cores.

    bash tools/env.sh python benchmarks/bench_cifar_aug.py            # 20,000 images, 3 rounds
    python benchmarks/bench_cifar_aug.py --device cuda                # on a GPU host

The CIFAR recipes train with pad 4 + random 32 px crop, flip and TrivialAugmentWide. The torch
backend runs it per image in `--workers` DataLoader processes (torchvision's operations); the
resident backend keeps the set on the device and runs it on whole batches (one vectorised call
per operation, fasttrain.data.batch_augment). The set is CIFAR-10's format and size per image
(32x32 RGB), content with a natural image's 1/f spectrum, generated once under
$FASTTRAIN_DATA/bench_cifar-<n> (no download). Each backend: one warm-up epoch, then `--epochs`
timed epochs of the training loader with the model replaced by nothing (batches normalised to
float32 on `--device`, as training there would get them; on CUDA the clock stops after a
synchronize), measured `--rounds` times in turn; the table gives the median and the range.
Writes `benchmarks/results/cifar-aug-<device>-<workers>w.json`.
"""
from __future__ import annotations

import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _args import (check_out, device as device_arg, fail, partial_out,  # noqa: E402
                   settings_suffix, whole_rounds_kept, write_json)
from bench_loaders import natural_image  # noqa: E402
from fasttrain.cli import ArgumentParser, int_at_least, sigterm_as_interrupt  # noqa: E402
from fasttrain.config import MAX_WORKERS, load  # noqa: E402
from fasttrain.data import build_loaders, write_cifar10  # noqa: E402
from fasttrain.data.datasets import _publish_dir, default_root  # noqa: E402
from fasttrain.measure.env import conditions, usable_cores  # noqa: E402

RECIPE = ROOT / "recipes" / "cifar_r20_w0.5.yaml"
_positive = int_at_least(1)


def make_set(root: Path, images: int) -> Path:
    """CIFAR-10's python format: 5 train batches and a test batch of images // 5 each."""
    per_batch = images // 5

    def build(tmp: Path) -> None:
        rng = np.random.default_rng(0)
        pixels = np.stack([natural_image(rng, 32, 32).transpose(1, 2, 0)
                           for _ in range(6 * per_batch)])
        write_cifar10(tmp, pixels, rng.integers(0, 10, len(pixels)).tolist(), per_batch)

    return _publish_dir(build, root)


def measure(root: Path, backend: str, workers: int, batch: int, epochs: int,
            device: torch.device) -> float:
    cfg = load(RECIPE, [f"--data.path={root}", "--data.download=false",
                        f"--data.backend={backend}", f"--data.num_workers={workers}",
                        f"--data.batch_size={batch}"])
    loaders = build_loaders(cfg.data, cfg.aug, channels_last=True, seed=0, device=device)
    train = loaders.train
    train.set_epoch(0)
    for _ in train:
        pass
    seen, start = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        train.set_epoch(epoch)
        for images, _ in train:
            seen += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=_positive, default=20000, help="training images in the set")
    p.add_argument("--workers", type=int_at_least(1, MAX_WORKERS), default=usable_cores(),
                   help="torch backend's DataLoader workers (default: every core it may use)")
    p.add_argument("--batch-size", type=_positive, default=128, help="the recipes' batch")
    p.add_argument("--epochs", type=_positive, default=1, help="timed epochs after one warm-up")
    p.add_argument("--rounds", type=_positive, default=3)
    p.add_argument("--device", type=device_arg, default="cpu",
                   help="training device the batches go to (cpu or cuda[:N])")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = args.device
    train_images = args.images // 5 * 5  # make_set's 5 equal training batches
    if train_images < args.batch_size:  # the loader would refuse it after the set is built
        fail(f"--images {args.images}: {train_images} training images, fewer than one batch "
             f"(--batch-size {args.batch_size})")
    out = check_out(args.out, ROOT / "benchmarks" / "results"
                    / f"cifar-aug-{device.type}-{args.workers}w"
                      f"{settings_suffix(args, p, ['images', 'batch_size', 'epochs', 'rounds'])}"
                      f".json")
    torch.set_num_threads(args.workers)
    root = make_set(default_root(f"bench_cifar-{args.images}"), args.images)
    names = ["torch", "resident"]
    rates: dict[str, list[float]] = {n: [] for n in names}  # complete rounds only
    try:
        for r in range(args.rounds):
            this_round = {}
            for name in names:
                this_round[name] = measure(root, name, args.workers, args.batch_size,
                                           args.epochs, device)
                print(f"round {r + 1}/{args.rounds}  {name:9s} {this_round[name]:9.0f} img/s",
                      flush=True)
            for name in names:
                rates[name].append(this_round[name])
    except KeyboardInterrupt:
        whole_rounds_kept(len(rates[names[0]]), args.rounds)
    rounds = len(rates[names[0]])
    interrupted = rounds < args.rounds
    rows = [{"backend": n, "images_per_s": round(statistics.median(v), 1),
             "images_per_s_min": round(min(v), 1), "images_per_s_max": round(max(v), 1),
             "images_per_s_rounds": [round(x, 1) for x in v]} for n, v in rates.items()]
    speedup = statistics.median(a / b for a, b in zip(rates["resident"], rates["torch"]))
    aug = load(RECIPE, [f"--data.path={root}"]).aug  # what the rounds ran
    result = {"benchmark": "bench_cifar_aug", "date": datetime.now(timezone.utc).isoformat(),
              **conditions(device.type), "recipe": str(RECIPE.relative_to(ROOT)),
              "augmentation": f"pad 4 + random crop 32, flip 0.5, TrivialAugmentWide "
                              f"({aug.auto_augment_interpolation} resampling)",
              "images": train_images, "workers": args.workers, "batch_size": args.batch_size,
              "timed_epochs": args.epochs, "rounds": rounds, "interrupted": interrupted,
              "resident_vs_torch": round(speedup, 2), "rows": rows}
    for row in rows:
        print(f"{row['backend']:9s} {row['images_per_s']:9.0f} img/s "
              f"({row['images_per_s_min']:.0f}-{row['images_per_s_max']:.0f})")
    print(f"resident / torch: {speedup:.2f}x")
    if interrupted:
        out = partial_out(out)
    write_json(out, result)
    print(f"wrote {out}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sigterm_as_interrupt()  # a time limit keeps the complete rounds
    raise SystemExit(main())
