"""The DALI data path (`data.backend=dali`): NVIDIA DALI pipelines over the image folders.

One pipeline per epoch and loader: file reader → decode (a random crop decoded as a region of
interest for training, the whole image for validation) → resize → flip + normalise. With a CUDA
`device` all of it runs in DALI: the decoder as `mixed` (nvJPEG: Huffman on the CPU, the rest on
the GPU), then `resize` and one `crop_mirror_normalize` on the GPU. Otherwise (`device_id=None`,
how the tests run) DALI only reads and decodes, and the loader resamples each decoded image in
torch: DALI's CPU `resize` costs ~1.3 ms per image, more than the ROI decode itself (~1.2 ms),
where torch's uint8 antialiased resize takes ~0.4 ms. Training crops are resized to the epoch's
resolution and flipped where DALI's coin says; validation images go through the torch backend's
`ValTransform`, so their pixels are the torch backend's exactly (both decode with libjpeg-turbo).

Order and augmentation are functions of (seed, epoch): the epoch's sample order is the torch
backend's seeded permutation (`EpochSampler`), each rank's share of it as the torch backend deals
it without gradient accumulation (`perm[rank::world_size]`; with accumulation the torch backend
deals to ranks x micro-batches, and DALI's micro-batches stay consecutive slices of the rank's
share), written one share after the other into an explicit file list
whose contiguous DALI shards (`shard_id`/`num_shards`) are exactly those shares, and the
pipeline's seed is derived from (seed, epoch, rank). Building a fresh pipeline each epoch also
gives progressive resizing its epoch's resolution, and releases the pipeline's threads and
buffers at the epoch's end.

DALI cannot skip an unreadable file: the pipeline stops. The loader then finds the file by
decoding the failing batch's files one by one and raises a one-line `DatasetError` naming it
(`skipped` stays empty; the torch backend skips such files instead).
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import tempfile
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..config import AugConfig, DataConfig
from ..errors import ConfigError, DatasetError, RunError, ShardError
from . import resize
from .datasets import not_regular
from .loader import Loaders, _datasets, rank_batches, sample_seed, torch_threads
from .transforms import (Normalize, ValTransform, horizontal_flip, progressive_resolution,
                         resize_square)

MISSING = ("data.backend=dali needs NVIDIA DALI: pip install --no-build-isolation -e .[dali] "
           "(nvidia-dali-cuda130)")
READER = "Reader"
PREFETCH = 2  # batches DALI prepares ahead of the consumer (its default; enough for one GPU)
# nvJPEG scratch buffers preallocated for ImageNet-sized images, the values of NVIDIA's ResNet-50
# example, so the first epochs do not reallocate while the sizes grow.
DEVICE_MEMORY_PADDING = 211025920
HOST_MEMORY_PADDING = 140544512

Batch = tuple[torch.Tensor, torch.Tensor]
# The CPU path's torch half of one sample: (its decoded image as a (3, H, W) uint8 view of DALI's
# (H, W, 3) output, then its other outputs' values) → the finished (3, H, W) uint8 image. It may
# also have a `batch` attribute: None, or a function (images, values, count) that finishes the
# batch's first `count` samples at once from DALI's outputs (images: the TensorListCPU; values:
# the other outputs as arrays) into a channels-last (N, 3, H, W) uint8 batch, used when
# channels-last is asked.
SampleFn = Callable[..., torch.Tensor]
# An epoch's pipeline: (unbuilt pipeline, (path, label) samples in the reader's order before
# sharding, the per-sample torch half or None when the pipeline outputs finished batches).
EpochPipeline = tuple[Any, list[tuple[str, int]], SampleFn | None]
# A pipeline's device-dependent part: (the images output, the per-sample outputs that follow the
# labels, the per-sample torch half or None).
Tail = tuple[Any, list[Any], SampleFn | None]


@functools.cache
def _dali() -> SimpleNamespace:
    """DALI's modules, imported on first use (importing DALI takes ~3 s)."""
    try:
        from nvidia.dali import Pipeline, fn, math, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError:
        raise RunError(MISSING) from None
    return SimpleNamespace(Pipeline=Pipeline, fn=fn, math=math, types=types,
                           DALIGenericIterator=DALIGenericIterator,
                           LastBatchPolicy=LastBatchPolicy)


def _output_dtype(dtype: torch.dtype) -> Any:
    """The DALI type `crop_mirror_normalize` writes for a training input `dtype`.

    bf16 is no DALI type: DALI writes float32 and the device casts it (one elementwise kernel,
    reading 4 and writing 2 bytes per value). That is the fastest exact option: uint8 out of DALI
    plus `Normalize` on the device costs three kernels and ~2x the memory traffic; a float16
    intermediate would save ~0.05 ms per 256x224x224 batch on an H100, but rounds twice and
    overflows for std < ~1/65000.
    """
    types = _dali().types
    table = {torch.float32: types.FLOAT, torch.bfloat16: types.FLOAT,
             torch.float16: types.FLOAT16, torch.uint8: types.UINT8}
    if dtype not in table:
        raise ConfigError(f"data.backend=dali cannot produce {dtype} inputs "
                          f"(float32, float16, bfloat16 or uint8)")
    return table[dtype]


def _check_listable(samples: list[tuple[str, int]]) -> None:
    """DALI's file list holds one file per line: a name with a line break cannot be in it."""
    for path, _ in samples:
        if "\n" in path or "\r" in path:
            raise DatasetError(f"{path!r}: a file name with a line break cannot be listed for "
                               f"DALI; rename it, or use data.backend=torch")


def _check_regular(special: list[str]) -> None:
    """DALI's reader opens every listed path: on a FIFO it waits for a writer for good (the
    run hung, deaf to SIGTERM), and it cannot skip a file, so such paths stop the run first."""
    if special:
        path = special[0]
        try:
            what = not_regular(os.stat(path).st_mode) or "not a regular file"
        except OSError:  # gone since the listing
            what = "not a regular file (a special file)"
        more = f" (and {len(special) - 1} more)" if len(special) > 1 else ""
        raise DatasetError(f"{path}: {what}{more}; data.backend=dali "
                           f"stops at unreadable files, remove it or use data.backend=torch, "
                           f"which skips them")


class _Picked(Sequence[tuple[str, int]]):
    """`base[order[i]]` for each i, made on demand: an epoch's samples are counted, and read
    only around a failure, so no list of 1.28 M (path, label) pairs is built every epoch."""

    def __init__(self, base: Sequence[tuple[str, int]], order: list[int]) -> None:
        self.base, self.order = base, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.base[i] for i in self.order[index]]
        return self.base[self.order[index]]


def _list_lines(samples: Sequence[tuple[str, int]]) -> list[bytes]:
    """DALI `file_list` lines ("path label", the label after the last space) of `samples`.

    Bytes as the OS gave them: a name that is not UTF-8 (surrogate-escaped by Python) stays
    valid, where encoding it as text raised UnicodeEncodeError. Absolute: DALI reads a relative
    entry relative to the list's folder (a temp folder), not the working directory that a
    relative data.path means."""
    return [b"%s %d\n" % (os.fsencode(os.path.abspath(p)), label) for p, label in samples]


def _write_lines(folder: str, name: str, lines: list[bytes]) -> str:
    """Write a DALI `file_list`. A text file rather than the `files`/`labels` arguments: DALI
    parses it in C++, ~10x faster than converting a Python list."""
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(b"".join(lines))
    return path


def _write_file_list(folder: str, name: str, samples: Sequence[tuple[str, int]]) -> str:
    return _write_lines(folder, name, _list_lines(samples))


def _release_freed_memory() -> None:
    """Hand the heap memory that a shut-down pipeline freed back to the OS (glibc's
    malloc_trim). Without it glibc keeps the freed buffers as heap that later pipelines did not
    reuse: RSS grew every epoch for the whole run (~8 MB per quickstart epoch, three pipelines
    with EMA validation; ~0.5 GB per rank over 88 ImageNet epochs, extrapolated)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to ask
        pass


class DaliLoader:
    """Iterates (images, labels) on `device` from a DALI pipeline built for each epoch.

    Args:
        build: `build(epoch, list_dir)` returns the epoch's unbuilt pipeline, its list of
            (path, label) samples in the order the reader visits them (before sharding), and
            None when the pipeline outputs (images, labels) batches ready but for the dtype (the
            GPU path), or the per-sample torch half when it outputs (decoded images, labels,
            *per-sample values) (the CPU path, `SampleFn`).
        num_batches: batches per epoch on this rank.
        partial: keep the shard's last partial batch (validation; the reader's padding is
            removed), else only full batches (training).
        shard: (rank, world_size): this rank's part of the list (DALI's contiguous shard).
        normalize: the uint8 → `dtype` normalisation of the CPU path; the GPU path's pipeline
            normalises itself and only its `dtype` is used.
    """

    def __init__(self, build: Callable[[int, str], EpochPipeline], num_batches: int,
                 batch_size: int, partial: bool, shard: tuple[int, int], channels_last: bool,
                 normalize: Normalize) -> None:
        self.build, self.num_batches, self.batch_size = build, num_batches, batch_size
        self.partial, self.shard = partial, shard
        self.channels_last, self.normalize, self.dtype = channels_last, normalize, normalize.dtype
        self.epoch, self.start = 0, 0
        # Read by the engine like the torch backend's; always empty: DALI stops at an unreadable
        # file (a DatasetError naming it) instead of skipping it.
        self.skipped: dict[str, str] = {}

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch and skip its first `start_batch` batches (resume inside an epoch).
        The skipped batches are still decoded: DALI's random state advances per batch, so
        that is what keeps the remaining batches identical to the full epoch's."""
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return max(self.num_batches - self.start, 0)

    def __iter__(self) -> Iterator[Batch]:
        if len(self) == 0:  # a validation shard can be empty (fewer images than ranks)
            return
        epoch, start = self.epoch, self.start
        with tempfile.TemporaryDirectory(prefix="fasttrain-dali-") as list_dir:
            pipe, samples, per_sample = self.build(epoch, list_dir)
            index = 0
            try:
                # Builds the pipeline (the reader reads the list now).
                step, finish = (self._dense(pipe) if per_sample is None
                                else self._ragged(pipe, per_sample, len(samples)))
            except RuntimeError as e:
                raise self._error(e, samples, index) from None
        try:
            # Training stops at the cap (full batches only; validation's cap is its last batch).
            while index < self.num_batches:
                try:
                    out = step()
                except StopIteration:
                    return
                except RuntimeError as e:
                    raise self._error(e, samples, index) from None
                index += 1
                if index > start:  # a skipped batch needs DALI's run only, not its torch half
                    yield finish(out, index - 1)
        finally:
            # Release the pipeline now (threads, pinned and device buffers), also when the
            # consumer stops early (train.max_steps, the per-rank batch cap).
            del step, finish
            pipe._shutdown()
            del pipe
            _release_freed_memory()

    def _dense(self, pipe: Any) -> tuple[Callable[[], Any], Callable[[Any, int], Batch]]:
        """The GPU path: DALI's PyTorch iterator over finished batches (it removes the reader's
        padding). Returns (next batch's outputs, their conversion to a Batch)."""
        dali = _dali()
        policy = dali.LastBatchPolicy.PARTIAL if self.partial else dali.LastBatchPolicy.DROP
        # Builds the pipeline and prefetches batch 0.
        it = dali.DALIGenericIterator([pipe], ["images", "labels"], reader_name=READER,
                                      last_batch_policy=policy)
        return (lambda: next(it)[0]), (lambda out, index: self._convert(out))

    def _convert(self, out: dict[str, torch.Tensor]) -> Batch:
        images = out["images"]
        if self.channels_last:
            images = images.permute(0, 3, 1, 2)  # (N, H, W, C) → (N, C, H, W), channels-last
        if images.dtype != self.dtype:
            images = images.to(self.dtype)  # bf16: keeps the strides (preserve_format)
        return images, out["labels"].view(-1).long()

    def _ragged(self, pipe: Any, per_sample: SampleFn, n_samples: int
                ) -> tuple[Callable[[], Any], Callable[[Any, int], Batch]]:
        """The CPU path: the pipeline's outputs differ in size per sample, which DALI's
        iterators cannot batch, so it is run directly (`pipe.run()`: the outputs of the next
        batch, DALI preparing PREFETCH more) and each sample is finished in torch on a
        zero-copy view. Returns (next batch's outputs, their conversion to a Batch)."""
        pipe.build()
        batch_fn = getattr(per_sample, "batch", None) if self.channels_last else None
        rank, world = self.shard
        shard_size = n_samples * (rank + 1) // world - n_samples * rank // world

        def finish(out: tuple[Any, ...], index: int) -> Batch:
            images, labels, *values = out
            # pad_last_batch=True fills the shard's last batch with copies of its last sample:
            # keep the real ones (training's cap only ever reaches full batches).
            count = min(self.batch_size, shard_size - index * self.batch_size)
            values = [v.as_array() for v in values]
            # Every view into DALI's buffers is read here, before the next pipe.run() reuses them.
            # One torch thread: DALI's threads are decoding the next batches on the other cores,
            # and torch's idle intra-op threads spin-wait between these small per-image ops
            # (2 cores: 690 img/s and 2.9 CPU-ms per image with 2 threads, 960-1,150 img/s with 1).
            with torch_threads(1):
                if batch_fn is not None:
                    batch = batch_fn(images, values, count)
                else:
                    finished = []
                    for i in range(count):
                        image = torch.from_numpy(np.asarray(images[i])).permute(2, 0, 1)  # view
                        finished.append(per_sample(image, *(v[i] for v in values)))
                    batch = _stack(finished, self.channels_last)
            return (self.normalize(batch),
                    torch.from_numpy(labels.as_array()[:count]).view(-1).long())

        return pipe.run, finish

    def _error(self, error: RuntimeError, samples: list[tuple[str, int]],
               batch: int) -> ShardError:
        """A one-line error for a pipeline failure at `batch` of this rank's shard, naming the
        file when one of the batches in flight cannot be decoded on the CPU."""
        rank, world = self.shard
        lo, hi = len(samples) * rank // world, len(samples) * (rank + 1) // world  # DALI's shard
        first = lo + batch * self.batch_size
        # The failure can come from any batch DALI was preparing: this one or a prefetched one.
        window = [p for p, _ in samples[first:min(hi, first + (PREFETCH + 1) * self.batch_size)]]
        bad = _first_undecodable(window)
        if bad is not None:
            path, reason = bad
            return ShardError(f"{path}: DALI cannot decode this file ({reason}); "
                              f"data.backend=dali stops at unreadable files, remove it or use "
                              f"data.backend=torch, which skips them")
        return ShardError(f"data.backend=dali: the pipeline failed at batch {batch} of epoch "
                          f"{self.epoch} ({_cause(error)})")


def _stack(images: list[torch.Tensor], channels_last: bool) -> torch.Tensor:
    """The uint8 (N, 3, H, W) batch of same-size (3, H, W) images, written once in the asked
    memory format (torch's resize returns channels-last images: copying them into a
    channels-last batch is a plain copy)."""
    c, h, w = images[0].shape
    batch = (torch.empty((len(images), h, w, c), dtype=torch.uint8).permute(0, 3, 1, 2)
             if channels_last else torch.empty((len(images), c, h, w), dtype=torch.uint8))
    for row, image in zip(batch, images):
        row.copy_(image)
    return batch


class ResizeFlip:
    """The CPU training path's torch half (a `SampleFn`): each decoded crop resized to
    size x size (the uint8 antialiased bilinear of the torch backend's RandomResizedCrop),
    mirrored where DALI's coin says."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, crop: torch.Tensor, flip: Any) -> torch.Tensor:
        """One (3, H, W) crop through torch's ops: the reference, and the path for
        contiguous-format batches and builds without fasttrain's resize function."""
        image = resize_square(crop, self.size)
        return horizontal_flip(image) if flip else image

    @property
    def batch(self) -> Callable[[Any, list[np.ndarray], int], torch.Tensor] | None:
        """The whole batch in one C call per image (`resize.resize_into`), straight from DALI's
        buffers into the batch, resized and mirrored, when the library is built (else None):
        `__call__` per sample adds torch's dispatch, a tensor per image and the copy into the
        batch, ~20 % of the main thread's time."""
        return self._batch if resize.AVAILABLE else None

    def _batch(self, images: Any, values: list[np.ndarray], count: int) -> torch.Tensor:
        shapes = images.shape()
        sources = []
        for i in range(count):
            height, width = shapes[i][0], shapes[i][1]
            sources.append((images[i].data_ptr(), height, width, width * 3))
        batch = torch.empty((count, self.size, self.size, 3), dtype=torch.uint8)
        return resize.resize_into(batch, sources, values[0][:count]).permute(0, 3, 1, 2)


def _cause(error: RuntimeError) -> str:
    """The line of a DALI pipeline error that says what went wrong (it follows "encountered:",
    after the operator's name and the Python traceback of its definition)."""
    text = str(error)
    tail = text.split("encountered:", 1)[-1]
    lines = [l.strip() for l in tail.splitlines()
             if l.strip() and "no longer valid" not in l]
    return (lines[0] if lines else text.strip().splitlines()[0])[:200]


def _first_undecodable(paths: list[str]) -> tuple[str, str] | None:
    """The first of `paths` DALI's CPU decoder rejects, with the reason; None if all decode.

    Files the reader itself cannot map (missing, a broken link, empty, unreadable) are found
    first by opening them: the reader reads ahead, so its error surfaces on the sample before
    the bad one and would name the wrong file."""
    for path in paths:
        try:
            problem = not_regular(os.stat(path).st_mode)
            if problem:  # opening a FIFO would wait for a writer for good
                return path, problem
            with open(path, "rb") as f:
                if not f.read(1):
                    return path, "empty file"
        except FileNotFoundError:
            return path, ("broken symbolic link" if os.path.islink(path) else "file not found")
        except OSError as e:
            return path, f"cannot open ({e.strerror or e})"
    if not paths:
        return None
    dali = _dali()
    fn = dali.fn
    with tempfile.TemporaryDirectory(prefix="fasttrain-dali-") as folder:
        pipe = dali.Pipeline(batch_size=1, num_threads=1, device_id=None, seed=0,
                             prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        with pipe:
            jpegs, _ = fn.readers.file(
                file_list=_write_file_list(folder, "check.txt", [(p, 0) for p in paths]))
            pipe.set_outputs(fn.decoders.image(jpegs, device="cpu"))
        try:
            pipe.build()
            for path in paths:
                try:
                    pipe.run()
                except RuntimeError as e:
                    return path, _cause(e)
        finally:
            pipe._shutdown()
    return None


def _val_geometry(dali: SimpleNamespace, shape: Any, resize: int, crop: int
                  ) -> tuple[Any, Any, Any, Any]:
    """ValTransform's geometry as per-sample DALI arithmetic on the (H, W, C) `shape`: the
    resized (height, width) and the normalised crop positions (pos_y, pos_x) that make
    `crop_mirror_normalize` cut torchvision's `center_crop` window.

    torchvision: the shorter side becomes `resize`, the longer one `resize * long // short`
    (each axis scaled to its integer size); the crop's offset is round-half-to-even((size -
    crop) / 2), or when the crop is larger, the image is padded by (crop - size) // 2 before.
    DALI's crop anchor is roundf(pos * (size - crop)), so pos = offset / (size - crop) lands
    on the exact integer offset.
    """
    types, math_ = dali.types, dali.math

    def as_int(node: Any) -> Any:
        return dali.fn.cast(node, dtype=types.INT32)

    h, w = shape[0], shape[1]
    wide = as_int(w > h)
    height = wide * resize + (1 - wide) * (resize * h // w)
    width = (1 - wide) * resize + wide * (resize * w // h)

    def position(size: Any) -> Any:
        d = size - crop
        grow = as_int(d > 0)  # crop inside the image (else padded, or an exact fit)
        p = math_.abs(d)
        half = p // 2
        offset = half + grow * (p % 2) * (half % 2)  # round half to even
        return dali.fn.cast(offset, dtype=types.FLOAT) / dali.fn.cast(math_.max(p, 1),
                                                                       dtype=types.FLOAT)

    return (dali.fn.cast(height, dtype=types.FLOAT), dali.fn.cast(width, dtype=types.FLOAT),
            position(height), position(width))


def _normalize_args(data: DataConfig, dtype: torch.dtype, channels_last: bool) -> dict:
    layout = dict(dtype=_output_dtype(dtype), output_layout="HWC" if channels_last else "CHW")
    if dtype == torch.uint8:  # raw pixels, not normalised (see build_loaders)
        return layout
    return dict(layout, mean=[m * 255.0 for m in data.mean], std=[s * 255.0 for s in data.std])


def build_dali_loaders(data: DataConfig, aug: AugConfig, *, rank: int, world_size: int,
                       device: torch.device, channels_last: bool, seed: int,
                       grad_accum_steps: int, dtype: torch.dtype) -> Loaders:
    """Train and validation loaders for this rank from DALI pipelines; the contract is
    `fasttrain.data.loader.build_loaders`'s.

    On a CUDA `device` the pipelines decode, resize, flip and normalise on the GPU. On the CPU
    they read and decode only (DALI's CPU resize is ~3x slower than torch's), and the loader
    resizes each image in torch: training crops to the epoch's resolution, then flips them where
    DALI's coin says; validation images with the torch backend's `ValTransform` (the same pixels
    as the torch backend); then `Normalize`.

    Training: rank k reads the torch backend's share of the epoch's permutation
    (perm[k::world_size], its first len(train) // world_size samples), the shares laid out one
    after the other so that DALI's contiguous shard k is exactly rank k's; every rank yields
    (len(train) // world_size) // batch batches (the rest of the epoch is dropped, differently
    each epoch). Validation: each rank reads its contiguous part of the list (none when there
    are fewer images than ranks), its last batch padded by the reader and trimmed by the loader,
    so every image is seen exactly once.

    Raises:
        RunError: DALI is not installed.
        DatasetError: missing data set, or a file DALI cannot decode (named).
        ConfigError: a batch does not split across ranks, or a setting DALI cannot implement.
    """
    dali = _dali()
    train_set, val_set, classes, root = _datasets(data)
    batch, val_batch = rank_batches(data, world_size, grad_accum_steps, len(train_set), root)
    gpu = device.type == "cuda"
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) \
        if gpu else None
    decoder = dict(device="mixed", device_memory_padding=DEVICE_MEMORY_PADDING,
                   host_memory_padding=HOST_MEMORY_PADDING) if gpu else dict(device="cpu")
    threads = max(1, data.num_workers)
    normalize = _normalize_args(data, dtype, channels_last)  # also rejects dtypes DALI lacks
    black = [-m / s for m, s in zip(data.mean, data.std)]  # pixel 0, normalised
    fn, types = dali.fn, dali.types

    def pipeline(batch_size: int, pipe_seed: int) -> Any:
        return dali.Pipeline(batch_size=batch_size, num_threads=threads, device_id=device_id,
                             seed=pipe_seed, prefetch_queue_depth=PREFETCH)

    def reader(list_path: str, shard: tuple[int, int]) -> tuple[Any, Any]:
        jpegs, labels = fn.readers.file(file_list=list_path, shard_id=shard[0],
                                        num_shards=shard[1], random_shuffle=False,
                                        stick_to_shard=True, pad_last_batch=True, name=READER)
        return jpegs, labels.gpu() if gpu else labels

    # The part of each pipeline that depends on the device, one helper per path (`Tail`):
    # training's after the ROI decode, validation's from the encoded files. GPU: DALI finishes
    # the batch. CPU: DALI's resize is the slow part, so torch does it. Single thread, ~500x375
    # JPEGs to 224x224: the ROI decode takes 1.2 ms per image, DALI's CPU resize 1.3-1.9 ms more
    # (antialiased or not), torch's uint8 antialiased resize of the decoded crop (a channels-last
    # view) 0.35-0.5 ms; the training loader went from ~4.5 to ~1.9 ms per image.

    def gpu_train(crops: Any, res: int) -> Tail:
        images = fn.resize(crops, resize_x=res, resize_y=res, antialias=True)
        return fn.crop_mirror_normalize(
            images, mirror=fn.random.coin_flip(probability=aug.hflip), **normalize), [], None

    def cpu_train(crops: Any, res: int) -> Tail:
        flips = fn.random.coin_flip(probability=aug.hflip)
        return crops, [flips], ResizeFlip(res)

    def gpu_val(jpegs: Any) -> Tail:
        height, width, pos_y, pos_x = _val_geometry(
            dali, fn.peek_image_shape(jpegs, dtype=types.INT32, adjust_orientation=False),
            data.val_resize, data.val_res)
        images = fn.decoders.image(jpegs, output_type=types.RGB, adjust_orientation=False,
                                   **decoder)
        images = fn.resize(images, resize_y=height, resize_x=width, antialias=True)
        # Padded with black where the image is smaller than the crop, like torchvision's
        # center_crop (DALI fills the normalised output: black is -mean/std).
        return fn.crop_mirror_normalize(
            images, crop=(data.val_res, data.val_res), crop_pos_x=pos_x, crop_pos_y=pos_y,
            out_of_bounds_policy="pad", fill_values=black, **normalize), [], None

    def cpu_val(jpegs: Any) -> Tail:
        # The torch backend's resize and crop: its pixels exactly (the same libjpeg-turbo
        # decode).
        images = fn.decoders.image(jpegs, output_type=types.RGB, adjust_orientation=False,
                                   **decoder)
        return images, [], ValTransform(data)

    train_tail, val_tail = (gpu_train, gpu_val) if gpu else (cpu_train, cpu_val)
    train_samples = train_set.samples
    _check_listable(train_samples)  # before any epoch: --dry-run says it too
    for dataset in (train_set, val_set):
        _check_regular(getattr(dataset, "special_files", []))
    # Once, not per epoch: making 1.28 M ImageNet-like paths absolute and formatting them in an
    # epoch's random order held up its start 6.7 s, picking the prepared lines 1.4 s (the same
    # file; 8 ranks' shares, 2-core VM at load 3.5)
    train_lines = _list_lines(train_samples)
    _check_listable(val_set.samples)

    def build_train(epoch: int, list_dir: str) -> EpochPipeline:
        # The torch backend's permutation of the epoch (EpochSampler) and its shares: rank k's
        # is perm[k::world_size], of which it trains the first N // world_size. They are laid
        # out one after the other, so DALI's contiguous shard k is exactly rank k's share:
        # every rank reads the torch backend's samples (without accumulation, under which the
        # torch backend deals to ranks x micro-batches), and a resume inside an epoch on another
        # number of ranks still sees each sample once (contiguous shards of the permutation
        # itself repeated and skipped samples there).
        g = torch.Generator().manual_seed(sample_seed(seed, epoch, -1))
        perm = torch.randperm(len(train_samples), generator=g).tolist()
        per_rank = len(train_samples) // world_size
        order = [i for k in range(world_size) for i in perm[k::world_size][:per_rank]]
        samples = _Picked(train_samples, order)
        pipe = pipeline(batch, sample_seed(seed, epoch, rank, repeat=-2))
        with pipe:
            jpegs, labels = reader(_write_lines(list_dir, "train.txt",
                                                [train_lines[i] for i in order]),
                                   (rank, world_size))
            # adjust_orientation=False everywhere: the torch backend's decoder ignores EXIF
            # orientation too, so both backends see the same pixels.
            crops = fn.decoders.image_random_crop(
                jpegs, output_type=types.RGB, adjust_orientation=False,
                random_area=list(aug.scale),
                random_aspect_ratio=list(aug.ratio), num_attempts=10, **decoder)
            images, values, per_sample = train_tail(crops, progressive_resolution(data, epoch))
            # GPU: (N, H, W, C) or (N, C, H, W); (N, 1) int32. CPU: (H, W, C) uint8 crops of
            # every size; (N, 1) int32; (N,) int32 flips.
            pipe.set_outputs(images, labels, *values)
        return pipe, samples, per_sample

    # Each rank reads its own contiguous part of the validation list, [N * rank // world,
    # N * (rank + 1) // world), as a list of its own: DALI's reader refuses a list with fewer
    # files than shards (2 images on 3 ranks failed on the ranks that had one).
    val_samples = val_set.samples[len(val_set.samples) * rank // world_size:
                                  len(val_set.samples) * (rank + 1) // world_size]

    def build_val(epoch: int, list_dir: str) -> EpochPipeline:
        pipe = pipeline(val_batch, 0)  # nothing random
        with pipe:
            jpegs, labels = reader(_write_file_list(list_dir, "val.txt", val_samples), (0, 1))
            images, values, per_sample = val_tail(jpegs)
            pipe.set_outputs(images, labels, *values)
        return pipe, val_samples, per_sample

    to_dtype = Normalize(data.mean, data.std, dtype)
    train = DaliLoader(build_train, (len(train_samples) // world_size) // batch, batch, False,
                       (rank, world_size), channels_last, to_dtype)
    val = DaliLoader(build_val, math.ceil(len(val_samples) / val_batch), val_batch, True, (0, 1),
                     channels_last, to_dtype)
    return Loaders(train, val, len(classes), list(classes), root, len(train_samples),
                   len(val_set.samples))
