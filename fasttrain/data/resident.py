"""The resident backend: the whole data set decoded once and kept on the device (airbench style).

For data sets that fit in device memory (CIFAR-10: 150 MB of uint8; the built-in digits): no
worker processes, no host-to-device copies per step. Training augmentation runs on whole batches
as tensor ops on the device: RandomResizedCrop as one `torchvision.ops.roi_align` call (every
sample its own box, bilinear with adaptive sampling, so downscaling averages like an antialiased
resize), zero-pad + random crop as one gather, flip as one `where`, TrivialAugmentWide with one
vectorised call per operation (`batch_augment`).

Order and sharding come from the same `EpochSampler` as the torch backend (identical per-epoch
sample order, exact resume inside an epoch). The random crop/flip parameters are drawn per batch
from a generator seeded by (seed, epoch, rank, position in the epoch): a pure function of those,
so a resumed run sees the same batches; they follow the torch backend's distributions (tested),
not its per-sample values.
"""
from __future__ import annotations

import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align

from ..config import AugConfig, DataConfig
from ..measure.env import usable_cores
from .batch_augment import to_device, trivial_augment_wide
from .datasets import (DatasetError, ImageFolderDataset, SkippedSample, TensorImageDataset,
                       read_encoded)
from .loader import EpochSampler, Loaders, ShardSampler, _datasets, rank_batches, sample_seed
from .transforms import Normalize, ValTransform, progressive_resolution

# At most this share of the free device memory (or of available RAM on CPU) may hold the set:
# stacking the decoded images briefly needs the set twice.
MEMORY_SHARE = 0.5


def random_resized_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float],
                              ratio: tuple[float, float], generator: torch.Generator
                              ) -> torch.Tensor:
    """(n, 4) int64 boxes (top, left, h, w) drawn by torchvision's RandomResizedCrop rule, batched:
    area uniform in `scale`, log aspect uniform in `ratio`, the first of 10 tries that fits, else
    a central crop clamped to `ratio` (the same rule as `transforms.random_resized_crop_params`)."""
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, 10, generator=generator,
                                                                   dtype=torch.float64))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, 10, generator=generator,
                                                               dtype=torch.float64))
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = int(round(height * ratio[1])), height
    else:
        fallback_w, fallback_h = width, height
    found = fits.any(dim=1)
    w = torch.where(found, w, fallback_w)
    h = torch.where(found, h, fallback_h)
    top_u, left_u = torch.rand(2, n, generator=generator, dtype=torch.float64)
    top = torch.where(found, (top_u * (height - h + 1)).floor().long(), (height - h) // 2)
    left = torch.where(found, (left_u * (width - w + 1)).floor().long(), (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


class BatchAugment:
    """Crop + flip (+ TrivialAugmentWide with `aug.auto_augment=trivialaugment`) of a uint8
    (B, C, H, W) batch on its device → float (B, C, S, S) in 0..255."""

    def __init__(self, data: DataConfig, aug: AugConfig) -> None:
        self.data, self.aug = data, aug

    def __call__(self, images: torch.Tensor, epoch: int, generator: torch.Generator
                 ) -> torch.Tensor:
        n, _, height, width = images.shape
        size = progressive_resolution(self.data, epoch)
        device = images.device
        # Every random draw first, on the host and in a fixed order, then one transfer that does
        # not wait for the GPU; the device work follows.
        if self.aug.train_crop == "random_resized":
            boxes = random_resized_crop_boxes(n, height, width, self.aug.scale, self.aug.ratio,
                                              generator)
            top, left, h, w = boxes.to(torch.float32).unbind(1)
            crop = [torch.stack([torch.arange(n, dtype=torch.float32), left, top, left + w,
                                 top + h], dim=1)]
        else:
            # Pad at least enough for a `size` crop, like the torch backend.
            pad_h = max(self.aug.padding, (size - height + 1) // 2)
            pad_w = max(self.aug.padding, (size - width + 1) // 2)
            tops = torch.randint(0, height + 2 * pad_h - size + 1, (n,), generator=generator)
            lefts = torch.randint(0, width + 2 * pad_w - size + 1, (n,), generator=generator)
            span = torch.arange(size)
            crop = [tops[:, None] + span, lefts[:, None] + span]
        flip = [torch.rand(n, generator=generator) < self.aug.hflip] if self.aug.hflip > 0 else []
        params = to_device(crop + flip, device)
        if self.aug.train_crop == "random_resized":
            out = roi_align(images.float(), params[0], output_size=(size, size),
                            spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        else:
            padded = F.pad(images, (pad_w, pad_w, pad_h, pad_h))
            rows, cols = params[0][:, None, :, None], params[1][:, None, None, :]
            batch = torch.arange(n, device=device)[:, None, None, None]
            chans = torch.arange(padded.shape[1], device=device)[None, :, None, None]
            out = padded[batch, chans, rows, cols].float()
        if flip:
            out = torch.where(params[-1][:, None, None, None], out.flip(3), out)
        if self.aug.auto_augment == "trivialaugment":
            out = trivial_augment_wide(out, generator, self.aug.auto_augment_interpolation)
        return out


class ResidentLoader:
    """Batches of a device-resident uint8 set: (images normalised in `dtype`, labels int64).

    Training (`augment` given) follows `EpochSampler` (seeded permutation, this rank's share,
    partial last batch dropped); validation (`augment` None) walks `ShardSampler` in order.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 normalize: Normalize, channels_last: bool, *, rank: int, world_size: int,
                 seed: int, augment: BatchAugment | None = None, reps: int = 1,
                 accum: int = 1) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.normalize, self.augment, self.seed, self.rank = normalize, augment, seed, rank
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.skipped: dict[str, str] = {}  # filled by the builder: unreadable files left out
        self.epoch, self.start_batch = 0, 0
        if augment is not None:
            self.sampler = EpochSampler(len(labels), rank, world_size, seed, reps, accum,
                                        batch_size)
        else:
            self.sampler = ShardSampler(len(labels), rank, world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch and skip its first `start_batch` batches (resume inside an epoch)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        if self.augment is not None:
            return self.sampler.epoch_length // self.batch_size - self.start_batch
        return math.ceil(len(self.sampler) / self.batch_size)

    def _order(self) -> torch.Tensor:
        if self.augment is None:
            return torch.as_tensor(self.sampler.indices)
        self.sampler.set_epoch(self.epoch)
        indices, _ = self.sampler.share_tensors()
        usable = self.sampler.epoch_length // self.batch_size * self.batch_size
        return indices[:usable].clone()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order().to(self.images.device)
        first = self.start_batch * self.batch_size if self.augment is not None else 0
        for start in range(first, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            images = self.images.index_select(0, index)
            if self.augment is not None:
                # Batch parameters from (seed, epoch, rank, position): resumable, worker-free.
                # Under accumulation micro-batch k of a step is (virtual) rank rank * accum + k
                # at that step's position, as the sampler deals it: the crops of a run on that
                # many ranks.
                micro, virtual = start // self.batch_size, self.sampler.virtual
                g = torch.Generator().manual_seed(sample_seed(
                    self.seed, self.epoch, micro // virtual * self.batch_size,
                    repeat=-2 - (self.rank * virtual + micro % virtual)))
                images = self.augment(images, self.epoch, g)
            yield (self.normalize(images).contiguous(memory_format=self.memory_format),
                   self.labels.index_select(0, index))


def _available_ram() -> int:
    """Bytes of RAM available without swapping: the kernel's MemAvailable, which counts the
    page cache it can drop (reading the data set fills it), where MemFree does not."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB
    except (OSError, ValueError):
        pass
    try:  # no /proc: the free pages
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # macOS names no free pages: all of RAM, an upper bound
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _local_ranks() -> int:
    """The ranks torchrun started on this host (LOCAL_WORLD_SIZE), 1 outside torchrun."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} bytes"


def _check_fits(nbytes: int, device: torch.device, what: str, ram: bool = True) -> None:
    """Refuse a set of `nbytes` decoded (`what` says which and where) that would take more than
    MEMORY_SHARE of the available RAM (with `ram`: the set is decoded on the host) or of the
    free memory of a CUDA `device`.

    Raises:
        DatasetError: one line naming `what`, the size and the memory available.
    """
    # Every rank on this host decodes its own copy at the same time (torchrun's
    # LOCAL_WORLD_SIZE): 3 CPU ranks each passing alone at 40 % of the RAM needed 120 %.
    local = _local_ranks()
    places = [(_available_ram(), nbytes * local, "available RAM")] if ram else []
    if device.type == "cuda":
        places.append((torch.cuda.mem_get_info(device)[0], nbytes, f"free memory on {device}"))
    for free, needed, where in places:
        if needed > MEMORY_SHARE * free:
            each = f" on each of the {local} ranks on this host" if needed > nbytes else ""
            raise DatasetError(f"{what} would take {_bytes(nbytes)} decoded{each}, more than "
                               f"{MEMORY_SHARE:.0%} of the {_bytes(free)} {where}; "
                               f"data.backend=resident is for small sets: use torch, ffcv or "
                               f"dali")


def _header_size(dataset: ImageFolderDataset) -> tuple[int, int] | None:
    """(height, width) of the first image the decode will keep, read from its header (no pixels
    are decoded), or None when there is none. Files the decode skips are passed over: paths
    that are no regular file (opening a FIFO waited for a writer for good), empty, truncated
    and unreadable files, and images above PIL's `MAX_IMAGE_PIXELS` (one such image sorting
    first refused the whole set as too large for memory)."""
    # The limit is applied here, not by PIL: above it PIL warns, at twice it raises.
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        for path, _ in dataset.samples:
            try:
                # the decode's own reading: a FIFO is never opened, a truncated JPEG refused
                with Image.open(io.BytesIO(read_encoded(path))) as image:
                    height, width = image.height, image.width
            except Exception:  # noqa: BLE001  unreadable files are the decode's to report
                continue
            if limit is None or height * width <= limit:
                return height, width
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return None


def _decoded_bytes(dataset, size: int | None) -> int | None:
    """Bytes of uint8 pixels `dataset` will take decoded, estimated before decoding: every image
    `size` x `size` (validation, after its resize and crop), else the size of the first image
    (resident sets have images of one size; unreadable files count too), or None when no image
    header can be read."""
    if size is not None:
        return len(dataset) * 3 * size * size
    if isinstance(dataset, TensorImageDataset):
        return dataset.images.numel()
    hw = _header_size(dataset)
    return None if hw is None else len(dataset) * 3 * hw[0] * hw[1]


def _decode_folder(dataset: ImageFolderDataset, transform, workers: int
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """Decode every file once through the dataset (threads: torchvision's decoder releases the
    GIL), check equal sizes, stack. Unreadable files are left out and returned as
    path -> reason."""
    dataset.transform = transform
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        samples = list(pool.map(dataset.__getitem__, range(len(dataset))))
    skipped = {s.path: s.reason for s in samples if isinstance(s, SkippedSample)}
    kept = [(path, sample) for (path, _), sample in zip(dataset.samples, samples)
            if not isinstance(sample, SkippedSample)]
    if not kept:
        raise DatasetError(f"{Path(dataset.samples[0][0]).parent.parent}: no readable image")
    shape = kept[0][1][0].shape
    for path, (image, _) in kept:
        if image.shape != shape:
            raise DatasetError(f"{path}: image is {tuple(image.shape[1:])} but the first is "
                               f"{tuple(shape[1:])}; data.backend=resident stores equal-size "
                               f"images: use torch, ffcv or dali")
    images = torch.stack([image for _, (image, _) in kept])
    labels = torch.tensor([target for _, (_, target) in kept], dtype=torch.int64)
    return images, labels, skipped


def _materialise(dataset, transform, workers: int
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    if isinstance(dataset, TensorImageDataset):
        images = dataset.images
        if transform is not None:
            images = torch.stack([transform(img) for img in images])
        return (images.contiguous(), torch.tensor(dataset.targets, dtype=torch.int64), {})
    return _decode_folder(dataset, transform, workers)


def build_resident_loaders(data: DataConfig, aug: AugConfig, *, rank: int, world_size: int,
                           device: torch.device, channels_last: bool, seed: int,
                           grad_accum_steps: int, dtype: torch.dtype) -> Loaders:
    """`build_loaders` for data.backend=resident (see its contract). Validation images are
    resized/cropped once (the torch backend's ValTransform) and stored at val_res.

    Raises:
        DatasetError: missing data, unequal image sizes, or a set too large for the device.
        ConfigError: a batch size does not split evenly across ranks.
    """
    train_set, val_set, classes, root = _datasets(data)
    # Before decoding: a set that does not fit would be killed for memory before any message.
    estimates = [_decoded_bytes(train_set, None), _decoded_bytes(val_set, data.val_res)]
    if None not in estimates:
        _check_fits(sum(estimates), device, f"{root}: {len(train_set) + len(val_set)} images")
    # Every rank on this host decodes at the same time: share the cores, as training's threads do.
    workers = data.num_workers or max(1, usable_cores() // _local_ranks())
    train_images, train_labels, train_skipped = _materialise(train_set, None, workers)
    val_images, val_labels, val_skipped = _materialise(val_set, ValTransform(data), workers)
    if device.type == "cuda":  # the exact size, against what the device has free now
        _check_fits(train_images.numel() + val_images.numel(), device,
                    f"{root}: {len(train_labels) + len(val_labels)} images", ram=False)
    batch, val_batch = rank_batches(data, world_size, grad_accum_steps, len(train_labels), root)
    normalize = Normalize(data.mean, data.std, dtype).to(device)
    common = dict(rank=rank, world_size=world_size, seed=seed)
    train = ResidentLoader(train_images.to(device), train_labels.to(device), batch, normalize,
                           channels_last, augment=BatchAugment(data, aug), reps=data.ra_reps,
                           accum=grad_accum_steps, **common)
    val = ResidentLoader(val_images.to(device), val_labels.to(device), val_batch, normalize,
                         channels_last, **common)
    train.skipped, val.skipped = train_skipped, val_skipped
    return Loaders(train, val, len(classes), list(classes), root, len(train_labels),
                   len(val_labels))
