#!/usr/bin/env python
"""Images/s of every data backend on one ImageNet-like JPEG set, same cores, same run.

    bash tools/env.sh python benchmarks/bench_loaders.py            # all backends, 2 workers
    bash tools/env.sh python benchmarks/bench_loaders.py --backends decode,torch --rounds 5

The set (generated once, cached under $FASTTRAIN_DATA/bench_jpeg-<n>): `--images` JPEG files in 10
class folders, sizes drawn around 500x375 like ImageNet's, content with a natural image's 1/f
amplitude spectrum so that quality-90 files weigh ~100 KB (what ImageNet's do) and the decoder
works as hard as on real photographs.

Every backend runs the same training transform (RandomResizedCrop 224 with scale (0.08, 1) and
the standard ratio, horizontal flip) with the model replaced by nothing: we time only the loop
over its batches on the CPU, after one warm-up epoch (worker start-up, FFCV's JIT), over
`--epochs` epochs. Rows:
- decode limit: `torchvision.io.decode_jpeg` of every file once, one process per worker, no
  augmentation: what a JPEG-decoding loader cannot beat on these cores;
- PIL DataLoader: torchvision's ImageFolder + RandomResizedCrop + flip + PILToTensor, the
  textbook loader (uint8 output);
- fasttrain backends through `build_loaders(..., dtype=torch.uint8)`, channels-last as training
  asks for them, the raw crops (training
  normalises them on the GPU; on this CPU-only bench that pass would only add a constant cost):
  torch (DataLoader workers decoding only each crop box: region decoding, the default),
  torch-whole (`data.region_decode=false`: whole images decoded by torchvision, then cropped),
  dali (CPU pipeline: region decoding in DALI, resize in the main process), torch-ops and
  dali-ops (the same with fasttrain's C resize+flip switched off, as in a build without it:
  torch's ops per sample, then a copy into the batch), ffcv at full JPEG fidelity
  (every image stored as JPEG, max side 512: nothing resized away; region decoding) and
  ffcv-jpeg512-whole (FFCV's own whole-image decoder), and ffcv stored as ffcv-imagenet stores
  it for ResNet-18 (max side 400, 10 % JPEG / 90 % raw pixels).

Each round measures every backend once, in turn, with the decode limit measured before the
first and after every backend: a backend's ratio to the limit is taken against the mean of the
two limits that bracket it (the VM's speed drifts by tens of percent within minutes), and the
table gives medians over `--rounds` rounds.

Writes `benchmarks/results/loaders-cpu-<workers>w.json` (conditions + rows) and prints a table.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _args import (check_out, fail, items, partial_out, settings_suffix,  # noqa: E402
                   subset_suffix, whole_rounds_kept, write_json)
from fasttrain.cli import ArgumentParser, int_at_least, sigterm_as_interrupt  # noqa: E402
from fasttrain.config import MAX_WORKERS, Config, load  # noqa: E402
from fasttrain.data import build_loaders, jpeg, resize  # noqa: E402
from fasttrain.data.datasets import _publish_dir, default_root  # noqa: E402
from fasttrain.measure.env import conditions, usable_cores  # noqa: E402

RESOLUTION = 224
CLASSES = 10
ALPHA = 1.1  # amplitude ~ 1/f^ALPHA: ~100 KB at quality 90 for 500x375 (natural photos: ~1)
FFCV_STORAGE = {
    # name: (write_mode, max_resolution, compress_probability, jpeg_quality)
    "ffcv-jpeg512": ("jpg", 512, 1.0, 90),
    "ffcv-rn18": ("proportion", 400, 0.10, 90),
}
BACKENDS = ("decode", "decode-libjpeg", "pil", "torch", "torch-ops", "torch-whole", "dali",
            "dali-ops", *FFCV_STORAGE, *(f"{n}-whole" for n in FFCV_STORAGE))
DEFAULT_BACKENDS = ("decode,decode-libjpeg,pil,torch,torch-ops,torch-whole,dali,dali-ops,"
                    "ffcv-jpeg512,ffcv-jpeg512-whole,ffcv-rn18")
_positive = int_at_least(1)


def natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(3, H, W) uint8 with a 1/f^ALPHA amplitude spectrum and correlated colour channels."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    freq = np.sqrt(fx ** 2 + fy ** 2)
    freq[0, 0] = 1.0
    amplitude = freq ** -ALPHA
    channels = [np.fft.irfft2(amplitude * np.exp(2j * np.pi * rng.random(amplitude.shape)),
                              s=(height, width)) for _ in range(3)]
    mix = rng.normal(size=(3, 3)) * 0.3 + np.eye(3)
    image = np.tensordot(mix, np.stack(channels), 1)
    image = (image - image.mean()) / image.std() * 50 + rng.uniform(90, 160, size=(3, 1, 1))
    return np.clip(image, 0, 255).astype(np.uint8)


def make_bench_set(root: Path, images: int, seed: int = 0) -> Path:
    """ImageFolder `root/{train,val}/<class>/*.jpg` (val: 1 image per class, the loaders need
    one), built once and published atomically."""
    from torchvision.io import encode_jpeg

    def build(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        for split, count in (("train", images), ("val", CLASSES)):
            for i in range(count):
                folder = tmp / split / f"class{i % CLASSES:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                long_side = int(rng.integers(420, 581))
                short_side = int(round(long_side * rng.uniform(0.66, 0.8)))
                h, w = (short_side, long_side) if rng.random() < 0.75 else (long_side, short_side)
                data = encode_jpeg(torch.from_numpy(natural_image(rng, h, w)), quality=90)
                (folder / f"{i:05d}.jpg").write_bytes(data.numpy().tobytes())

    return _publish_dir(build, root)


def _decode_share(args: tuple[list[str], str]) -> int:
    files, decoder = args
    torch.set_num_threads(1)
    if decoder == "torchvision":
        from torchvision.io import decode_jpeg
        for f in files:
            decode_jpeg(torch.frombuffer(bytearray(Path(f).read_bytes()), dtype=torch.uint8))
    else:
        from fasttrain.data import jpeg
        for f in files:
            raw = Path(f).read_bytes()
            info = jpeg.jpeg_info(raw)
            jpeg.decode_region(raw, (0, 0, info.height, info.width), info=info)
    return len(files)


def decode_limit(files: list[str], workers: int, epochs: int, decoder: str) -> float:
    """Images/s of plain whole-image JPEG decoding, one process per worker."""
    shares = [(files[i::workers], decoder) for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_decode_share, shares)  # warm-up: page cache, process start
        start = time.perf_counter()
        for _ in range(epochs):
            pool.map(_decode_share, shares)
        return epochs * len(files) / (time.perf_counter() - start)


def pil_loader(root: Path, workers: int, batch: int, epochs: int) -> float:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    transform = T.Compose([T.RandomResizedCrop(RESOLUTION), T.RandomHorizontalFlip(),
                           T.PILToTensor()])
    loader = torch.utils.data.DataLoader(ImageFolder(str(root / "train"), transform),
                                         batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=True)
    return _time_epochs(lambda epoch: loader, epochs, batch)


def _time_epochs(epoch_iter, epochs: int, batch: int) -> float:
    for _ in epoch_iter(0):  # warm-up epoch
        pass
    seen, start = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        for images, _ in epoch_iter(epoch):
            seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def backend_cfg(root: Path, backend: str, workers: int, batch: int,
                ffcv_dir: Path | None = None, region_decode: bool = True) -> Config:
    overrides = {"data.dataset": "imagefolder", "data.path": root, "data.backend": backend,
                 "data.region_decode": str(region_decode).lower(),
                 "data.batch_size": batch, "data.num_workers": workers,
                 "data.train_res": RESOLUTION, "data.val_res": RESOLUTION,
                 "data.val_resize": 256, "data.ffcv_dir": ffcv_dir or "",
                 "aug.train_crop": "random_resized", "aug.hflip": 0.5,
                 "train.device": "cpu"}
    return load(None, [f"--{k}={v}" for k, v in overrides.items()])


def train_loader(cfg: Config):
    """`cfg`'s training loader: uint8 channels-last batches (the layout training asks for, the
    batches the model would get). Its DataLoader workers (torch backend) keep the C resize+flip
    as `native_resize` sets it now, whatever the start method (`resize.pin_in_workers`)."""
    train = build_loaders(cfg.data, cfg.aug, channels_last=True, dtype=torch.uint8).train
    if isinstance(getattr(train, "loader", None), torch.utils.data.DataLoader):
        resize.pin_in_workers(train.loader)
    return train


def fasttrain_loader(cfg: Config, epochs: int) -> float:
    train = train_loader(cfg)

    def epoch_iter(epoch: int):
        train.set_epoch(epoch)
        return train

    return _time_epochs(epoch_iter, epochs, cfg.data.batch_size)


@contextmanager
def native_resize(on: bool) -> Iterator[None]:
    """fasttrain's C resize+flip (`resize.AVAILABLE`) left on, or off as in a build without it,
    in this process (where DALI's batches are resized) and in the workers of loaders that
    `train_loader` builds inside the block."""
    kept = resize.AVAILABLE
    resize.AVAILABLE = kept and on
    try:
        yield
    finally:
        resize.AVAILABLE = kept


def write_ffcv_files(root: Path, name: str, workers: int) -> Path:
    from fasttrain.data.ffcv_loader import write_beton
    mode, max_res, compress, quality = FFCV_STORAGE[name]
    out = root / name
    if not (out / "train.beton").exists():
        write_beton(backend_cfg(root, "ffcv", workers, 64).data, out, write_mode=mode,
                    max_resolution=max_res, compress_probability=compress,
                    jpeg_quality=quality, num_workers=workers)
    return out


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    # Every class folder needs an image: the validation set has one of each.
    p.add_argument("--images", type=int_at_least(CLASSES), default=1280,
                   help=f"training images in the set (at least {CLASSES} and --batch-size)")
    p.add_argument("--workers", type=int_at_least(1, MAX_WORKERS), default=usable_cores(),
                   help="loader workers/threads per backend (default: every core it may use)")
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--epochs", type=_positive, default=2, help="timed epochs after one warm-up")
    p.add_argument("--rounds", type=_positive, default=3,
                   help="measure every backend this many times, in turn (median reported)")
    p.add_argument("--backends", default=DEFAULT_BACKENDS,
                   help="default: %(default)s; another set is written to a result file named "
                   "after it")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    names = items("--backends", args.backends, BACKENDS)
    # Without the region decoder these backends silently decode whole images: their rows would
    # time what "torch-whole" (or the torchvision decode) times under another name.
    from fasttrain.data import jpeg
    needs_region = [n for n in names if n in ("decode-libjpeg", "torch", "torch-ops")
                    or (n.startswith("ffcv-") and not n.endswith("-whole"))]
    if needs_region and not jpeg.AVAILABLE:
        fail(f"--backends {','.join(needs_region)}: fasttrain's region JPEG decoder is not built "
             f"({jpeg.LOAD_ERROR or 'no library'}); build it with libjpeg-turbo "
             f"(FASTTRAIN_JPEG=1) or leave these backends out")
    if args.images < args.batch_size:  # the loaders drop the last partial batch: no batch at all
        fail(f"--images {args.images}: fewer than one batch (--batch-size {args.batch_size})")
    out = check_out(args.out, ROOT / "benchmarks" / "results" / f"loaders-cpu-{args.workers}w"
                    f"{subset_suffix(names, DEFAULT_BACKENDS.split(','))}"
                    f"{settings_suffix(args, p, ['images', 'batch_size', 'epochs', 'rounds'])}"
                    f".json")
    torch.set_num_threads(args.workers)

    root = make_bench_set(default_root(f"bench_jpeg-{args.images}"), args.images)
    files = sorted(str(f) for f in (root / "train").rglob("*.jpg"))
    mean_kb = sum(os.path.getsize(f) for f in files) / len(files) / 1e3

    def measure(name: str) -> float:
        if name == "decode":
            return decode_limit(files, args.workers, args.epochs, "torchvision")
        if name == "decode-libjpeg":
            return decode_limit(files, args.workers, args.epochs, "fasttrain")
        if name == "pil":
            return pil_loader(root, args.workers, args.batch_size, args.epochs)
        if name in ("torch", "torch-ops", "torch-whole", "dali", "dali-ops"):
            backend = name.split("-")[0]
            cfg = backend_cfg(root, backend, args.workers, args.batch_size,
                              region_decode=name != "torch-whole")
            with native_resize(not name.endswith("-ops")):
                return fasttrain_loader(cfg, args.epochs)
        storage = name.removesuffix("-whole")
        if storage in FFCV_STORAGE:
            ffcv_dir = write_ffcv_files(root, storage, args.workers)
            return fasttrain_loader(backend_cfg(root, "ffcv", args.workers, args.batch_size,
                                                ffcv_dir, region_decode=name == storage),
                                    args.epochs)
        raise AssertionError(name)

    # The VM's speed drifts by tens of percent within minutes, so a backend is compared with
    # the decode limit measured right before and right after it (bracketing), not with one
    # limit per round.
    # Complete rounds only: a round cut by Ctrl-C or SIGTERM is dropped.
    rates: dict[str, list[float]] = {name: [] for name in names}
    limits: dict[str, list[float]] = {name: [] for name in names}  # the bracketing limits' mean

    def timed(round_: int, name: str) -> float:
        rate = measure(name)
        print(f"round {round_ + 1}/{args.rounds}  {name:20s} {rate:8.1f} img/s", flush=True)
        return rate

    bracket = "decode" in names
    rounds = 0
    try:
        for round_ in range(args.rounds):
            round_rates: dict[str, list[float]] = {name: [] for name in names}
            round_limits: dict[str, float] = {}
            before = timed(round_, "decode") if bracket else None
            if bracket:
                round_rates["decode"].append(before)
            for name in names:
                if name == "decode":
                    continue
                round_rates[name].append(timed(round_, name))
                if bracket:
                    after = timed(round_, "decode")
                    round_rates["decode"].append(after)
                    round_limits[name] = (before + after) / 2
                    before = after
            for name in names:
                rates[name] += round_rates[name]
                if name in round_limits:
                    limits[name].append(round_limits[name])
            rounds += 1
    except KeyboardInterrupt:
        whole_rounds_kept(rounds, args.rounds)
    interrupted = rounds < args.rounds

    def per_round(name: str, partner: str) -> list[float]:
        # The decode limit's value for a round of `partner`: the mean of its bracket.
        return limits[partner] if name == "decode" and bracket else rates[name]

    def ratio(name: str, base: str) -> float | None:
        if base not in rates:
            return None
        if name == base:
            return 1.0
        pairs = zip(per_round(name, base), per_round(base, name))
        return round(statistics.median(a / b for a, b in pairs), 3)

    rows = []
    for name in names:
        rows.append({"backend": name, "images_per_s": round(statistics.median(rates[name]), 1),
                     "images_per_s_min": round(min(rates[name]), 1),
                     "images_per_s_max": round(max(rates[name]), 1),
                     "images_per_s_rounds": [round(r, 1) for r in rates[name]],
                     "decode_limit_bracketing": [round(r, 1) for r in limits[name]],
                     "vs_decode_limit": ratio(name, "decode"), "vs_pil": ratio(name, "pil")})
    result = {"benchmark": "bench_loaders", "date": datetime.now(timezone.utc).isoformat(),
              **conditions("cpu"),
              "set": {"images": len(files), "mean_file_kb": round(mean_kb, 1),
                      "classes": CLASSES, "size": "long side 420-580, aspect 0.66-0.8"},
              "transform": f"RandomResizedCrop {RESOLUTION} scale (0.08, 1) + flip",
              "workers": args.workers, "batch_size": args.batch_size,
              "timed_epochs": args.epochs, "rounds": rounds, "interrupted": interrupted,
              "libjpeg_turbo": jpeg.lib_version(), "rows": rows}
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"{len(files)} JPEGs (~{mean_kb:.0f} KB), {args.workers} workers")
    for col in ("backend", "img/s (median)", "min-max", "vs decode limit", "vs PIL"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["backend"], f"{r['images_per_s']:.0f}",
                      f"{r['images_per_s_min']:.0f}-{r['images_per_s_max']:.0f}",
                      "-" if r["vs_decode_limit"] is None else f"{r['vs_decode_limit']:.2f}",
                      "-" if r["vs_pil"] is None else f"{r['vs_pil']:.2f}")
    Console().print(table)
    if interrupted:
        out = partial_out(out)
    write_json(out, result)
    print(f"wrote {out}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sigterm_as_interrupt()  # a time limit keeps the complete rounds
    raise SystemExit(main())
