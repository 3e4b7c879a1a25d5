"""The torch data path: seeded per-sample augmentation, sharded samplers, device-side normalise.

Augmentation randomness is a pure function of (seed, epoch, sample index), not of worker count,
worker start-up order or process history, so a run gives the same batches with 0 or 8 workers,
on 1 or N ranks (per sample), and after a resume.
"""
from __future__ import annotations

from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass
import math
import os
import random
import signal
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from ..config import AugConfig, ConfigError, DataConfig, load_mapping
from .datasets import (DatasetError, ImageFolderDataset, SkippedSample, build_digits,
                       dataset_root, load_cifar10)
from .transforms import (Normalize, PendingCrop, TrainAugment, ValTransform,
                         progressive_resolution)


@contextmanager
def torch_threads(count: int | None = None) -> Iterator[None]:
    """torch's intra-op thread count set to `count` inside the block (None: left as it is) and
    the caller's restored after it, whatever the block changed it to."""
    kept = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(kept)


def sample_seed(seed: int, epoch: int, index: int, repeat: int = 0) -> int:
    """A well-mixed 63-bit seed for one draw of one sample in one epoch (splitmix64 finaliser);
    `repeat` tells apart the copies of repeated augmentation."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + repeat * 0x94D049BB133111EB
         + index) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) >> 1


class SeededAugment(Dataset):
    """`transform(dataset[index], rng)` with `rng` seeded from (seed, epoch, index).

    Indexed by `(epoch, index, repeat)` keys from `EpochSampler`: workers keep no epoch state,
    so persistent workers stay correct across epochs (and see the epoch's resolution).

    When the crop box depends only on the image size (`transform.crops_at_decode`) and the
    dataset reads files (`read_box`), the box is drawn from the header's size and only it is
    decoded (`region_decode`: libjpeg-turbo region decoding; else whole-image decode + slice):
    the same draws from `rng` in the same order either way.

    `pending_crops`: such crops may come back as `PendingCrop`s, resized into the batch by
    `RecyclingCollate` (`TrainAugment.after_crop`); only for a DataLoader with that collate.
    """

    def __init__(self, dataset: Dataset, transform: Callable, seed: int,
                 region_decode: bool = False, pending_crops: bool = False) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed
        self.region_decode, self.pending_crops = region_decode, pending_crops
        self.crop_at_decode = (getattr(transform, "crops_at_decode", False)
                               and hasattr(dataset, "read_box"))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]
                    ) -> tuple[torch.Tensor | PendingCrop, int] | SkippedSample:
        epoch, index, repeat = key
        rng = random.Random(sample_seed(self.seed, epoch, index, repeat))
        if self.crop_at_decode:
            size = progressive_resolution(self.transform.data, epoch)
            sample = self.dataset.read_box(index, lambda h, w: self.transform.crop_box(h, w, rng),
                                           (size, size), self.region_decode)
            if isinstance(sample, SkippedSample):
                return sample
            crop, target = sample
            return self.transform.after_crop(crop, rng, size, self.pending_crops), target
        sample = self.dataset[index]
        if isinstance(sample, SkippedSample):
            return sample
        image, target = sample
        return self.transform(image, rng, epoch), target


class EpochSampler(Sampler):
    """This rank's share of a seeded per-epoch permutation, yielded as (epoch, index, repeat).

    Every rank gets `len(dataset) // world_size` samples (the remainder is dropped, differently
    each epoch), so all ranks run the same number of steps.

    With `reps` > 1 this is repeated augmentation (Hoffer et al. 2020; torchvision's RASampler):
    the permutation lists every image `reps` times in a row, is dealt round-robin to the ranks
    (so copies of one image land on different ranks and get different augmentations), and each
    rank still takes `len(dataset) // world_size` of its share: an epoch keeps its length and
    sees about len(dataset) / reps distinct images, each `reps` times.

    With `accum` micro-batches of `batch` samples per optimizer step, the stream is dealt to
    world_size x accum virtual ranks instead, and micro-batch k of each step is virtual rank
    `rank * accum + k`'s batch: the micro-batches are exactly the batches of a run on
    world_size x accum ranks (`len(dataset) // (world_size * accum)` samples each), so each
    normalises the same images in BatchNorm. Dealt to the real ranks only, a micro-batch would
    be a slice of the rank's share instead, and with repeated augmentation the copies of an
    image would sit side by side in it, where mixup/cutmix (which pairs each sample with its
    neighbour) would mix most of them with another view of themselves: 75 % of the samples at
    ra_reps 4 on one rank.
    """

    def __init__(self, size: int, rank: int, world_size: int, seed: int, reps: int = 1,
                 accum: int = 1, batch: int = 0) -> None:
        self.size, self.rank, self.world_size, self.seed = size, rank, world_size, seed
        self.reps, self.epoch, self.start = reps, 0, 0
        self.virtual = accum
        if accum > 1 and batch < 1:
            raise ValueError("EpochSampler: accum > 1 needs the micro-batch size")
        self.batch = batch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch; skip its first `start` samples (a resume inside the epoch)."""
        self.epoch, self.start = epoch, start

    @property
    def epoch_length(self) -> int:
        return self.size // (self.world_size * self.virtual) * self.virtual

    def __len__(self) -> int:
        return self.epoch_length - self.start

    def share(self) -> tuple[list[int], list[int]]:
        """This rank's share of the epoch's (index, repeat) stream, in the order its batches
        take it, at least `epoch_length` long (`len(self)` counts from `start`). The stream
        lists every index `reps` times; over all ranks the shares hold all of it without
        accumulation, and each virtual rank's first `len(dataset) // (world_size * accum)`
        with it."""
        indices, repeats = self.share_tensors()
        return indices.tolist(), repeats.tolist()

    def share_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`share()` as int64 tensors: callers slice before making Python lists (one rank of
        ImageNet at ra_reps 4 holds a 5.1 M-long share, of which an epoch takes 1.28 M)."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        order = torch.randperm(self.size, generator=g).repeat_interleave(self.reps)
        repeats = torch.arange(self.reps).repeat(self.size)
        if self.virtual == 1:
            mine = slice(self.rank, None, self.world_size)
            return order[mine], repeats[mine]
        ranks = self.world_size * self.virtual
        length, first = self.size // ranks, self.rank * self.virtual
        # Virtual rank first + k's share, and where each of its samples goes in this rank's
        # stream: its chunk s of `batch` samples is micro-batch k of step s. (A last chunk
        # shorter than a batch, never a full micro-batch, keeps its place after the others.)
        shares = torch.stack([torch.arange(first + k, ranks * length, ranks)
                              for k in range(self.virtual)])
        position = torch.arange(length)
        chunk, offset = position // self.batch, position % self.batch
        place = torch.stack([(chunk * self.virtual + k) * self.batch + offset
                             for k in range(self.virtual)])
        mine = shares.flatten()[place.flatten().argsort()]
        return order[mine], repeats[mine]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        indices, repeats = self.share_tensors()
        n = self.epoch_length
        return ((self.epoch, i, r) for i, r in zip(indices[self.start:n].tolist(),
                                                   repeats[self.start:n].tolist()))


class ShardSampler(Sampler):
    """Indices rank, rank + world, ...: every sample exactly once over all ranks (no padding, so
    validation counts each image once)."""

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, size, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class DeviceLoader:
    """Iterates (images, labels) on `device`: images normalised float (N, C, H, W), channels-last
    when asked; the uint8 → float conversion happens on the device.

    Raw uint8 batches on the CPU (`Normalize` with dtype uint8, in the asked layout already) are
    views of a worker's reused shared buffer, valid until the next batch is requested (as FFCV's
    and DALI's): `.clone()` one to keep it. Every other batch is the consumer's own memory."""

    def __init__(self, loader: DataLoader, device: torch.device, normalize: Normalize,
                 channels_last: bool) -> None:
        self.loader, self.device, self.channels_last = loader, device, channels_last
        self.normalize = normalize.to(device)
        self.non_blocking = device.type == "cuda"
        self.skipped: dict[str, str] = {}  # unreadable files seen so far: path -> reason

    @property
    def sampler(self) -> Sampler:
        return self.loader.sampler if self.loader.batch_sampler is None else \
            self.loader.batch_sampler.sampler

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch and skip its first `start_batch` batches (resume inside an epoch)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch, start_batch * self.loader.batch_size)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        recycling = self.loader.collate_fn  # a RecyclingCollate (_build_torch_loaders)
        recycling.reset()  # batches of an abandoned iteration are discarded by iter() below
        lent = None  # token of the yielded batch that is a view of a worker's buffer
        try:
            for images, labels, skipped, token in self.loader:
                if lent is not None:  # the consumer has asked for the next batch
                    recycling.release(lent)
                    lent = None
                for path, reason in skipped:
                    self.skipped.setdefault(path, reason)
                if not len(labels):
                    continue
                buffer = images.untyped_storage().data_ptr()
                images = images.to(self.device, non_blocking=self.non_blocking)
                labels = labels.to(self.device, non_blocking=self.non_blocking)
                images = self.normalize(images).contiguous(memory_format=fmt)
                if token is not None:
                    if images.untyped_storage().data_ptr() == buffer:
                        lent = token
                    else:
                        recycling.release(token)
                yield images, labels
        finally:
            if lent is not None:
                recycling.release(lent)


class RecyclingCollate:
    """The loaders' collate_fn: (images, labels, skipped, token). Unreadable samples
    (`SkippedSample`) are dropped from the batch and reported as (path, reason), so one bad file
    never stops an epoch. Samples in (H, W, C) memory (training crops) are stacked as
    (N, H, W, C), the channels-last (N, C, H, W) batch with no transposing copy, and inside a
    worker into shared-memory buffers reused from batch to batch (`token` names the buffer);
    `PendingCrop`s are resized and flipped straight into their row of it.

    Why: a batch leaves a worker through shared memory, and a fresh shared buffer per batch (what
    default_collate does) is a new shm file whose every 4 KiB page faults and is zeroed on first
    write: 7 ms for a 64x224x224x3 batch on a 2-core machine against 1 ms for the stack itself,
    ~6 % of a worker's time per batch.

    Protocol: `flags[worker, slot]` (shared memory) is 1 from the moment a worker hands out a
    slot's buffer until the main process calls `release(token)` with the batch's token, which it
    must do only once nothing it keeps reads that memory (`DeviceLoader` releases after
    normalising or pinning, or when the next batch is asked for if it handed out the buffer
    itself). A worker with no free slot allocates a fresh buffer (token None): slower, never
    wrong. `reset()` frees every slot: call it before a new DataLoader iteration, which discards
    the previous one's batches.
    """

    def __init__(self, workers: int, slots: int = 4) -> None:
        self.flags = torch.zeros((max(workers, 1), slots), dtype=torch.uint8).share_memory_()
        self._buffers: dict[int, torch.Tensor] = {}  # this worker's: slot -> 1-D shared tensor

    def __call__(self, batch: list) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]],
                                              tuple[int, int] | None]:
        good = [s for s in batch if not isinstance(s, SkippedSample)]
        skipped = [(s.path, s.reason) for s in batch if isinstance(s, SkippedSample)]
        labels = torch.tensor([label for _, label in good], dtype=torch.int64)
        images = [image for image, _ in good]
        if not images:
            return torch.empty(0, dtype=torch.uint8), labels, skipped, None
        pending = [image for image in images if isinstance(image, PendingCrop)]
        if pending:
            shape = (len(images), pending[0].size, pending[0].size, 3)
        elif all(image.permute(1, 2, 0).is_contiguous() for image in images):
            first = images[0]
            shape = (len(images), first.shape[1], first.shape[2], first.shape[0])
        else:
            return default_collate(images), labels, skipped, None
        info = get_worker_info()
        like = torch.empty(0, dtype=torch.uint8) if pending else images[0]
        token, out = self._buffer(info.id, like, shape) if info is not None else (None, None)
        if not pending:
            stacked = torch.stack([image.permute(1, 2, 0) for image in images], out=out)
            return stacked.permute(0, 3, 1, 2), labels, skipped, token
        out = torch.empty(shape, dtype=torch.uint8) if out is None else out
        for row, image in zip(out, images):
            if isinstance(image, PendingCrop):
                image.write(row)
            else:
                row.copy_(image.permute(1, 2, 0))
        return out.permute(0, 3, 1, 2), labels, skipped, token

    def _buffer(self, worker: int, like: torch.Tensor, shape: tuple[int, ...]
                ) -> tuple[tuple[int, int] | None, torch.Tensor]:
        numel = math.prod(shape)
        free = [int(s) for s in torch.nonzero(self.flags[worker] == 0).flatten()]
        if not free:
            return None, self._new_shared(like, numel).view(shape)
        # A free slot whose buffer is large enough, else the first free one, (re)allocated.
        fits = [s for s in free if s in self._buffers and self._buffers[s].numel() >= numel
                and self._buffers[s].dtype == like.dtype]
        slot = fits[0] if fits else free[0]
        if not fits:
            self._buffers[slot] = self._new_shared(like, numel)
        self.flags[worker, slot] = 1
        return (worker, slot), self._buffers[slot][:numel].view(shape)

    @staticmethod
    def _new_shared(like: torch.Tensor, numel: int) -> torch.Tensor:
        storage = like.untyped_storage()._new_shared(numel * like.element_size(),
                                                      device=like.device)
        return like.new(storage)

    def release(self, token: tuple[int, int] | list[int] | None) -> None:
        if token is not None:
            # Unpacked: the pin-memory thread of older torch (2.11 among them) hands a tuple
            # back as a list, and `flags[[w, s]]` would free every slot of rows w and s.
            worker, slot = token
            self.flags[worker, slot] = 0

    def reset(self) -> None:
        self.flags.zero_()


@dataclass
class Loaders:
    train: DeviceLoader
    val: DeviceLoader
    num_classes: int
    classes: list[str]
    root: Path
    train_images: int  # the whole set's, over all ranks (files found; resident, ffcv: readable)
    val_images: int


def _datasets(data: DataConfig) -> tuple[Dataset, Dataset, list[str], Path]:
    root = dataset_root(data)
    if data.dataset == "cifar10":
        train = load_cifar10(root, train=True, download=data.download)
        val = load_cifar10(root, train=False, download=False)
        return train, val, train.classes, root
    if data.dataset == "digits":
        build_digits(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DatasetError(f"{root / split}: directory not found (data.path must hold "
                               f"train/ and val/ class folders: see README, 'Preparing "
                               f"ImageNet')")
    train = ImageFolderDataset(root / "train")
    extra = sorted(set(_class_folders(root / "val")) - set(train.classes))
    if extra:
        raise DatasetError(f"{root / 'val'}: classes not in train/: {', '.join(extra[:5])}")
    val = ImageFolderDataset(root / "val", class_to_idx=train.class_to_idx)
    return train, val, train.classes, root


def build_val_loader(data: DataConfig, *, classes: list[str] | None = None,
                     device: torch.device = torch.device("cpu"), channels_last: bool = True,
                     dtype: torch.dtype = torch.float32) -> tuple[DeviceLoader, list[str], Path]:
    """The validation set alone, through the torch backend's validation pipeline (shorter side
    resized to `data.val_resize`, center crop `data.val_res`, normalised), one process, every
    image once: `(loader, classes, root)`.

    The torch backend's validation is the resident and dali backends' too, so a checkpoint they
    trained is measured as training measured it (not ffcv's: its files may hold re-encoded or
    shrunk images, and `data.ffcv_resize=opencv` crops inside the resized image). Nothing of the
    training split is read but its class folder names.

    Args:
        classes: the label order the model was trained with (a checkpoint's `classes`); None =
            the order training would give: cifar10's own, else the sorted class folders of
            `train/` (torchvision's ImageFolder order), or of `val/` when there is no `train/`.

    Raises:
        DatasetError: the validation split is missing or malformed, holds a class not in
            `classes`, or CIFAR-10's classes are not `classes`.
    """
    root = dataset_root(data)
    if data.dataset == "cifar10":
        val_set = load_cifar10(root, train=False, download=data.download)
        if classes is not None and list(classes) != list(val_set.classes):
            raise DatasetError(f"{root}: CIFAR-10's classes {val_set.classes} are not the "
                               f"model's {list(classes)}")
        classes = list(val_set.classes)
    else:
        if data.dataset == "digits":
            build_digits(root)
        val_dir = root / "val"
        if not val_dir.is_dir():
            raise DatasetError(f"{val_dir}: directory not found (data.path must hold val/ class "
                               f"folders: see README, 'Preparing ImageNet')")
        if classes is None:
            classes = _class_folders(root / "train" if (root / "train").is_dir() else val_dir)
        extra = sorted(set(_class_folders(val_dir)) - set(classes))
        if extra:
            raise DatasetError(f"{val_dir}: classes the model was not trained on: "
                               f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        val_set = ImageFolderDataset(val_dir, class_to_idx={c: i for i, c in enumerate(classes)})
    val_set.transform = ValTransform(data)
    workers = dict(num_workers=data.num_workers, persistent_workers=False,
                   pin_memory=device.type == "cuda",
                   worker_init_fn=_ignore_ctrl_c if data.num_workers > 0 else None)
    loader = DataLoader(val_set, batch_size=data.val_batch_size or data.batch_size,
                        sampler=ShardSampler(len(val_set), 0, 1),
                        collate_fn=RecyclingCollate(data.num_workers), **workers)
    return (DeviceLoader(loader, device, Normalize(data.mean, data.std, dtype), channels_last),
            list(classes), root)


def _class_folders(folder: Path) -> list[str]:
    """Sorted names of the folders (or links to folders) in `folder`, as torchvision's
    find_classes lists them."""
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir())
    except OSError as e:
        raise DatasetError(f"{folder}: cannot list the folder ({e.strerror})") from None


def _ignore_ctrl_c(worker_id: int) -> None:
    """A terminal's Ctrl-C, and a SIGTERM sent to the process group (docker stop, Slurm,
    torchrun tearing a job down), reach every process of the group: workers that die of it
    while the main process still talks to them print a traceback beside the one-line message.
    Ctrl-C is left to the main process, which shuts them down; SIGTERM ends a worker quietly
    (exit status 0, which the main process does not report as a worker killed by a signal).
    Not ignored: multiprocessing stops leftover workers at exit with SIGTERM, and waits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)


def _exit_quietly(signum: int, frame: object) -> None:
    os._exit(0)


def _per_rank(global_batch: int, world_size: int, key: str, accum: int = 1) -> int:
    if global_batch % (world_size * accum):
        split = (f"{world_size} rank{'s' * (world_size > 1)}"
                 + (f" x {accum} accumulation steps" if accum > 1 else ""))
        raise ConfigError(f"{key}={global_batch} is not divisible by the {split}")
    return global_batch // (world_size * accum)


def rank_batches(data: DataConfig, world_size: int, grad_accum_steps: int, train_size: int,
                 where: object) -> tuple[int, int]:
    """(training micro-batch, validation batch) of one rank for the global `data.batch_size`
    and `data.val_batch_size`; every backend uses this so the split rules are the same.

    Raises:
        ConfigError: a batch does not split evenly across ranks (and accumulation steps), or the
            training set (`train_size` images at `where`) is smaller than one rank's share.
    """
    batch = _per_rank(data.batch_size, world_size, "data.batch_size", grad_accum_steps)
    val_batch = _per_rank(data.val_batch_size or data.batch_size, world_size,
                          "data.val_batch_size")
    if train_size // world_size < batch:
        raise ConfigError(f"data.batch_size={data.batch_size} is larger than the training set "
                          f"({train_size} images at {where})")
    return batch, val_batch


def build_loaders(data: DataConfig, aug: AugConfig, *, rank: int = 0, world_size: int = 1,
                  device: torch.device = torch.device("cpu"), channels_last: bool = True,
                  seed: int = 0, grad_accum_steps: int = 1,
                  dtype: torch.dtype = torch.float32) -> Loaders:
    """Train and validation loaders for this rank, from the backend `data.backend` names.

    Every backend yields (images, labels) on `device`: images normalised (x/255 - mean)/std in
    `dtype` (or raw pixels when `dtype` is torch.uint8), shape (N, 3, H, W), channels-last when
    asked; labels int64. `loader.set_epoch(epoch,
    start_batch)` selects the epoch (its order and augmentation follow from `seed` and the epoch)
    and skips its first batches (resume inside an epoch); `len(loader)` is this rank's batch
    count, equal on every rank for training.

    `data.batch_size` is the global batch: each rank's training loader yields micro-batches of
    batch_size / (world_size * grad_accum_steps). Training drops each rank's last partial batch;
    validation covers every sample exactly once across ranks.

    Raises:
        DatasetError: the data set is missing or malformed.
        ConfigError: a batch size does not split evenly across ranks, or the backend cannot
            implement a setting.
        RunError: the backend's library is not installed.
    """
    # Here, not only in config.load: callers may build or change a DataConfig themselves.
    checked = load_mapping({"data": dataclasses.asdict(data), "aug": dataclasses.asdict(aug)},
                           "build_loaders")
    data, aug = checked.data, checked.aug
    kwargs = dict(rank=rank, world_size=world_size, device=device, channels_last=channels_last,
                  seed=seed, grad_accum_steps=grad_accum_steps, dtype=dtype)
    if data.backend == "resident":
        from .resident import build_resident_loaders
        return build_resident_loaders(data, aug, **kwargs)
    if data.backend == "ffcv":
        from .ffcv_loader import build_ffcv_loaders
        return build_ffcv_loaders(data, aug, **kwargs)
    if data.backend == "dali":
        from .dali_loader import build_dali_loaders
        return build_dali_loaders(data, aug, **kwargs)
    return _build_torch_loaders(data, aug, **kwargs)


def _build_torch_loaders(data: DataConfig, aug: AugConfig, *, rank: int, world_size: int,
                         device: torch.device, channels_last: bool, seed: int,
                         grad_accum_steps: int, dtype: torch.dtype) -> Loaders:
    train_set, val_set, classes, root = _datasets(data)
    batch, val_batch = rank_batches(data, world_size, grad_accum_steps, len(train_set), root)
    val_set.transform = ValTransform(data)
    # Each DataLoader iterator draws its workers' base seed from `generator`, by default the
    # global RNG, which dropout and stochastic depth draw from: a resume that starts a train
    # iterator in the middle of an epoch, after a validation pass, would shift their stream.
    # The base seed decides nothing here (samplers and augmentation are seeded explicitly).
    workers = dict(num_workers=data.num_workers, persistent_workers=data.num_workers > 0,
                   pin_memory=device.type == "cuda",
                   worker_init_fn=_ignore_ctrl_c if data.num_workers > 0 else None)
    train_loader = DataLoader(SeededAugment(train_set, TrainAugment(data, aug), seed,
                                            data.region_decode, pending_crops=True),
                              batch_size=batch, drop_last=True,
                              sampler=EpochSampler(len(train_set), rank, world_size, seed,
                                                   data.ra_reps, grad_accum_steps, batch),
                              collate_fn=RecyclingCollate(data.num_workers),
                              generator=torch.Generator().manual_seed(seed), **workers)
    val_loader = DataLoader(val_set, batch_size=val_batch,
                            sampler=ShardSampler(len(val_set), rank, world_size),
                            collate_fn=RecyclingCollate(data.num_workers),
                            generator=torch.Generator().manual_seed(seed), **workers)
    normalize = Normalize(data.mean, data.std, dtype)
    return Loaders(DeviceLoader(train_loader, device, normalize, channels_last),
                   DeviceLoader(val_loader, device, normalize, channels_last),
                   len(classes), list(classes), root, len(train_set), len(val_set))
