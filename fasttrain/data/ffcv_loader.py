"""The FFCV data path: `.beton` files written once by `write_beton` (tools/write_ffcv.py), decoded
and augmented by FFCV's JIT-compiled pipeline in threads, normalised on the device.

Files: `<data.ffcv_dir>/{train,val}.beton` (default `<dataset root>/ffcv`), each with a JSON
sidecar `{train,val}.beton.json` recording how it was written (write mode, resolution, JPEG
quality, class names, unreadable files). Labels are the torch backend's: ImageFolder's sorted
class folder names, CIFAR-10's labels. A file that could not be decoded is stored as a 1x1
placeholder labelled -1 (FFCV's writer needs every slot filled) and never loaded.

Augmentation follows the torch backend's rules with FFCV's decoders: RandomResizedCrop drawn like
torchvision (area uniform in `aug.scale`, log aspect uniform in `aug.ratio`, 10 tries, then a
clamped central crop) at the epoch's resolution (`progressive_resolution`), or the CIFAR
pad-and-crop, then the horizontal flip. Random-resized crops are resized with the torch backend's
kernel (`resize.numba_resizer`: the same pixels for the same box, ~4x faster than libffcv's
INTER_AREA, which remains the fallback without the library); validation resizes the shorter side
to `val_resize` and center-crops `val_res` exactly as the torch backend does
(`ResizeCenterCrop`: the same pixels when the file stores the original ones).
`data.ffcv_resize=opencv` keeps FFCV's own resize and center-crop decoder (ffcv-imagenet's).
The crop and flip of a sample are drawn from numba's RNG seeded per sample from (`seed`, the
batch's sample ids, the position in the batch): the epoch's order is a function of (`seed`,
epoch), so the augmentation is too, whatever the thread count, and a resume that skips the
epoch's first batches sees the same batches as an uninterrupted run. FFCV's own random ops draw
from unseeded per-thread generators, so they are not used.

FFCV's threads are `data.num_workers` per rank (0 = FFCV's default, one per core; capped at the
cores numba sees). Training uses FFCV's `distributed=True` sampler under DDP (torch's
DistributedSampler: every rank gets ceil(N / world) samples, padded with repeats, so all ranks
run the same number of steps); validation gives rank r the samples r, r + world, ... (no
padding: each image is counted once).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..config import MAX_WORKERS, AugConfig, DataConfig
from ..errors import ConfigError, DatasetError, RunError, one_line
from ..measure.env import usable_cores
from . import jpeg, resize
from .datasets import SkippedSample, dataset_root, pid_alive
from .loader import sample_seed, torch_threads
from .transforms import Normalize, progressive_resolution

SPLITS = ("train", "val")
WRITE_MODES = ("proportion", "jpg", "raw", "smart")
SIDECAR_FORMAT = "fasttrain-ffcv-1"
SKIPPED_LABEL = -1  # label of a placeholder for an unreadable file: excluded when loading
FFCV_MISSING = ("data.backend=ffcv needs FFCV: pip install --no-build-isolation -e .[ffcv] "
                "(and Debian libopencv-dev libturbojpeg0-dev pkg-config)")

_warned: set[str] = set()


# --------------------------------------------------------------------------------------------
# FFCV and the seeded decoders (defined on first use: importing this module never needs FFCV)

@functools.cache
def _ffcv() -> SimpleNamespace:
    """FFCV's classes plus this module's seeded decoders.

    Raises:
        RunError: FFCV (or a library it links at import, OpenCV / libjpeg-turbo) is missing.
    """
    try:
        with torch_threads():  # importing FFCV sets torch's thread count to 1
            import ffcv  # noqa: F401  (imported first: a stubbed-out package fails here)
            import ffcv.pipeline.compiler  # noqa: F401
        from ffcv.fields import IntField, RGBImageField
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import (IMAGE_MODES, CenterCropRGBImageDecoder,
                                           ResizedCropRGBImageDecoder, get_center_crop,
                                           get_random_crop)
        from ffcv.libffcv import imdecode, resize_crop
        from ffcv.loader import Loader, OrderOption
        from ffcv.loader.epoch_iterator import EpochIterator
        from ffcv.pipeline.allocation_query import AllocationQuery
        from ffcv.pipeline.compiler import Compiler
        from ffcv.reader import Reader
        from ffcv import types as ffcv_types
        from ffcv.transforms import ToDevice, ToTensor, ToTorchImage
        from ffcv.writer import DatasetWriter
        import numba
    except (ImportError, OSError):
        raise RunError(FFCV_MISSING) from None

    # Numba compiles the helpers below once per process (they close over constants only); each
    # loader compiles just its thin decode loop around them.
    k1, k2, k3 = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9),
                  np.uint64(0x94D049BB133111EB))
    s27, s30, s31, s32 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(32)
    random_box = numba.njit(nogil=True)(get_random_crop)
    resize_box = numba.njit(nogil=True)(resize_crop)
    if resize.AVAILABLE:
        resize_c = resize.numba_resizer()
    else:  # numba types the call even when the library is missing: a callee that refuses
        @numba.njit(nogil=True)
        def resize_c(src, height, width, row_stride, dst, out_height, out_width, flip):
            return -1

    @numba.njit(nogil=True)
    def mirror(out):
        """Mirror `out` (h, w, C) left-right in place."""
        width = out.shape[1]
        for c in range(width // 2):
            for r in range(out.shape[0]):
                for ch in range(out.shape[2]):
                    value = out[r, c, ch]
                    out[r, c, ch] = out[r, width - 1 - c, ch]
                    out[r, width - 1 - c, ch] = value

    @numba.njit(nogil=True)
    def draw_flip(flip_prob):
        """One draw: mirror this sample?"""
        return flip_prob > 0 and np.random.random() < flip_prob

    @numba.njit(nogil=True)
    def resize_window(image, top, left, height, width, out, native, flip):
        """out (h, w, 3) = the window [top, top + height) x [left, left + width) of image
        (H, W, 3), resized by torch's antialiased bilinear kernel (fasttrain.data.resize: the
        torch backend's pixels) when `native` and the library is there, else by FFCV's
        INTER_AREA; mirrored if `flip` (by the C function too: numba's loop over 3-byte pixels
        costs ~3x its ~25 us at 224 px)."""
        row = image.shape[1] * 3
        packed = (image.strides[1] == 3 and image.strides[0] == row and out.strides[1] == 3
                  and out.strides[0] == out.shape[1] * 3)
        if native and packed:
            offset = np.uintp(np.int64(top) * row + np.int64(left) * 3)
            if resize_c(image.ctypes.data + offset, height, width, row, out.ctypes.data,
                        out.shape[0], out.shape[1], np.int32(flip)) == 0:
                return
        resize_box(image, top, top + height, left, left + width, out)
        if flip:
            mirror(out)

    @numba.njit(nogil=True)
    def mix(z):
        """splitmix64: a well-mixed 64-bit value of a 64-bit key (uint64 arithmetic wraps)."""
        z = z + k1
        z = (z ^ (z >> s30)) * k2
        z = (z ^ (z >> s27)) * k3
        return z ^ (z >> s31)

    @numba.njit(nogil=True)
    def batch_key(seed, batch_indices):
        """One key per batch from its sample ids in order: the same batch in the same epoch
        (a rerun, or a resume that skipped the batches before it) gets the same key."""
        key = mix(seed)
        for k in range(len(batch_indices)):
            key = mix(key ^ np.uint64(batch_indices[k]))
        return key

    @numba.njit(nogil=True)
    def seed_sample(key):
        """Seed numba's generator for the sample of `key`. The generator is per thread:
        seeding it in the thread that draws, right before the draws, makes a sample's draws
        independent of the thread schedule."""
        np.random.seed(np.uint32(mix(key) >> s32))

    @numba.njit(nogil=True)
    def crop_flip(image, out, key, scale, ratio, flip_prob, pad, native):
        """One sample: image (H, W, C) -> out (h, w, C), cropped, resized (`native`: by
        resize_window's torch kernel), maybe mirrored."""
        seed_sample(key)
        height, width = image.shape[0], image.shape[1]
        if pad < 0:  # RandomResizedCrop: torchvision's rule, FFCV's sampler
            i, j, h, w = random_box(height, width, scale, ratio)
            # The flip is drawn after the box, as the other branch draws it after the window.
            resize_window(image, i, j, h, w, out, native, draw_flip(flip_prob))
        else:  # zero-pad by `pad`, take a window: out[r, c] = image[r + dy, c + dx]
            dy = np.random.randint(0, 2 * pad + 1) - pad
            dx = np.random.randint(0, 2 * pad + 1) - pad
            for r in range(out.shape[0]):
                for c in range(out.shape[1]):
                    inside = 0 <= r + dy < height and 0 <= c + dx < width
                    for ch in range(out.shape[2]):
                        out[r, c, ch] = image[r + dy, c + dx, ch] if inside else 0
            if draw_flip(flip_prob):
                mirror(out)

    if jpeg.AVAILABLE:
        region_c = jpeg.numba_region_decoder()
    else:  # numba types the region branch even when it is off: give it a callee that refuses
        @numba.njit(nogil=True)
        def region_c(data, size, d, top, left, height, width, out, err, err_size):
            return -1

    dct_scale = numba.njit(nogil=True)(jpeg.dct_scale)
    scaled_box = numba.njit(nogil=True)(jpeg.scaled_box)

    @numba.njit(nogil=True)
    def region_box(height, width, out_height, out_width, scale, ratio):
        """RandomResizedCrop's box drawn as crop_flip draws it, and the DCT reduction d that
        decode_region would use for it, with the box in the 1/d-scale image:
        (d, top, left, h, w)."""
        i, j, h, w = random_box(height, width, scale, ratio)
        d = dct_scale(h, w, out_height, out_width)
        i, j, h, w = scaled_box((np.int64(i), np.int64(j), np.int64(h), np.int64(w)), d,
                                height, width)
        return d, i, j, h, w

    class SeededCropFlip(ResizedCropRGBImageDecoder):
        """Decode, crop, resize to `output_size`, flip with probability `flip_prob`: the crop
        is RandomResizedCrop's (`scale`, `ratio`), or with `padding` >= 0 the CIFAR crop
        (images stored at `output_size`, zero-padded by `padding` on each side, a random
        `output_size` window). Randomness as in the module docstring. Variable-size images are
        fine; `output_size` may change between epochs (it sizes the buffers of each epoch).
        `region_decode`: decode only the box of JPEG-stored images; `native_resize`: torch's
        resize kernel rather than INTER_AREA (each only where the library is built)."""

        def __init__(self, output_size: tuple[int, int], scale: Sequence[float],
                     ratio: Sequence[float], flip_prob: float, seed: int,
                     padding: int = -1, region_decode: bool = False,
                     native_resize: bool = True) -> None:
            super().__init__(output_size)
            self.scale, self.ratio = tuple(scale), tuple(ratio)
            self.flip_prob, self.seed, self.padding = float(flip_prob), int(seed), int(padding)
            # Region decoding applies to RandomResizedCrop of JPEG-stored images.
            self.region_decode = region_decode and padding < 0 and jpeg.AVAILABLE
            # torch's resize (data.ffcv_resize=torch) when the library has it, else INTER_AREA.
            self.native_resize = native_resize and resize.AVAILABLE

        @property
        def get_crop_generator(self):
            return get_random_crop

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            scale, ratio = np.array(self.scale), np.array(self.ratio)
            flip_prob, pad = self.flip_prob, self.padding
            seed = np.uint64(self.seed & (2**64 - 1))
            region, native = self.region_decode, self.native_resize

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                key = batch_key(seed, batch_indices)
                for dst_ix in my_range(len(batch_indices)):
                    fld = metadata[batch_indices[dst_ix]]
                    image_data = mem_read(fld["data_ptr"], storage_state)
                    height, width = np.uint32(fld["height"]), np.uint32(fld["width"])
                    if region and fld["mode"] == jpg:
                        # crop_flip's RandomResizedCrop with only the box decoded (the same
                        # draws in the same order); a JPEG the decoder refuses falls through
                        # to the whole-image decode.
                        out = destination[dst_ix]
                        seed_sample(key + np.uint64(dst_ix))
                        d, i, j, h, w = region_box(np.int64(height), np.int64(width),
                                                   out.shape[0], out.shape[1], scale, ratio)
                        tmp = temp_storage[dst_ix]
                        if region_c(image_data.ctypes.data, image_data.size, d, i, j, h, w,
                                    tmp.ctypes.data, 0, 0) == 0:
                            resize_window(tmp[:h * w * 3].reshape(h, w, 3), 0, 0, h, w, out,
                                          native, draw_flip(flip_prob))
                            continue
                    if fld["mode"] == jpg:
                        image = temp_storage[dst_ix]
                        imdecode_c(image_data, image, height, width, height, width,
                                   0, 0, 1, 1, False, False)
                        image = image.reshape(-1)[:3 * height * width]
                    else:
                        image = image_data
                    crop_flip(image.reshape(height, width, 3), destination[dst_ix],
                              key + np.uint64(dst_ix), scale, ratio, flip_prob, pad, native)
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    @numba.njit(nogil=True)
    def center_anchor(size, crop):
        """torchvision's center_crop offset, int(round((size - crop) / 2)): Python's round,
        ties to even."""
        d = size - crop
        half = d // 2
        return half + (d % 2) * (half % 2)  # an odd d is a tie: round half up only to even

    class ResizeCenterCrop(ResizedCropRGBImageDecoder):
        """Validation as the torch backend does it (transforms.ValTransform): resize the
        shorter side to `resize` (torchvision's output size rule; skipped when already there)
        with the torch backend's antialiased bilinear kernel, then take the center
        `output_size` crop (torchvision's anchor). JPEGs are decoded by fasttrain's decoder
        (accurate IDCT, torchvision's pixels) when it is built, else by FFCV's. A file storing
        the original pixels (raw, not shrunk) gives the torch backend's batches exactly."""

        def __init__(self, output_size: tuple[int, int], resize: int) -> None:
            super().__init__(output_size)
            self.resize = int(resize)

        @property
        def get_crop_generator(self):
            return get_center_crop

        def declare_state_and_memory(self, previous_state):
            state, (destination, temp) = super().declare_state_and_memory(previous_state)
            heights = self.metadata["height"].astype(np.float64)
            widths = self.metadata["width"].astype(np.float64)
            short, long = np.minimum(heights, widths), np.maximum(heights, widths)
            longest = int((self.resize * long / short).max())
            # The resized image, one buffer per batch slot like FFCV's decode buffer, sized for
            # the file's most elongated image: val_resize^2 x its aspect ratio x 3 bytes (at
            # 256 px, 0.26 MB for 4:3; the decode buffer of a 512 px file is 0.79 MB).
            resized = AllocationQuery((np.uint64(self.resize * max(longest, 1) * 3),),
                                      np.dtype("<u1"))
            return state, (destination, temp, resized)

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            size, crop_h, crop_w = self.resize, self.output_size[0], self.output_size[1]

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage, resized_storage = my_storage
                for dst_ix in my_range(len(batch_indices)):
                    fld = metadata[batch_indices[dst_ix]]
                    image_data = mem_read(fld["data_ptr"], storage_state)
                    height, width = np.int64(fld["height"]), np.int64(fld["width"])
                    if fld["mode"] == jpg:
                        tmp = temp_storage[dst_ix]
                        # The whole image as one box; without the library region_c refuses.
                        if region_c(image_data.ctypes.data, image_data.size, 1, 0, 0, height,
                                    width, tmp.ctypes.data, 0, 0) != 0:
                            imdecode_c(image_data, tmp, np.uint32(height), np.uint32(width),
                                       np.uint32(height), np.uint32(width), 0, 0, 1, 1,
                                       False, False)
                        image = tmp[:height * width * 3].reshape(height, width, 3)
                    else:
                        image = image_data[:height * width * 3].reshape(height, width, 3)
                    if min(height, width) != size:
                        short, long = min(height, width), max(height, width)
                        new_long = np.int64(size * long / short)
                        rh, rw = (size, new_long) if height <= width else (new_long, size)
                        resized = resized_storage[dst_ix][:rh * rw * 3].reshape(rh, rw, 3)
                        resize_window(image, 0, 0, height, width, resized, True, False)
                        image, height, width = resized, rh, rw
                    top, left = center_anchor(height, crop_h), center_anchor(width, crop_w)
                    destination[dst_ix][:] = image[top:top + crop_h, left:left + crop_w]
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return SimpleNamespace(
        CenterCropRGBImageDecoder=CenterCropRGBImageDecoder, Compiler=Compiler,
        ResizeCenterCrop=ResizeCenterCrop,
        DatasetWriter=DatasetWriter, EpochIterator=EpochIterator, IntDecoder=IntDecoder,
        IntField=IntField, Loader=Loader, OrderOption=OrderOption, Reader=Reader,
        types=ffcv_types, IMAGE_MODES=IMAGE_MODES, RGBImageField=RGBImageField,
        SeededCropFlip=SeededCropFlip, ToDevice=ToDevice, ToTensor=ToTensor,
        ToTorchImage=ToTorchImage, numba=numba, crop_flip=crop_flip, seed_sample=seed_sample,
        random_box=random_box)


# --------------------------------------------------------------------------------------------
# Paths and sidecars

def beton_dir(data: DataConfig) -> Path:
    """Where train.beton and val.beton live: `data.ffcv_dir`, default `<dataset root>/ffcv`."""
    return Path(data.ffcv_dir).expanduser() if data.ffcv_dir else dataset_root(data) / "ffcv"


def sidecar_path(beton: Path) -> Path:
    return beton.with_name(beton.name + ".json")


def write_command(data: DataConfig) -> str:
    """The tools/write_ffcv.py command that writes the files `data` names."""
    cmd = f"python tools/write_ffcv.py --dataset={data.dataset}"
    if data.path:
        cmd += f" --path={data.path}"
    if data.ffcv_dir:
        cmd += f" --out={data.ffcv_dir}"
    return cmd


# --------------------------------------------------------------------------------------------
# Writing

@dataclass
class WriteResult:
    path: Path
    images: int  # samples stored (including placeholders of skipped files)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0


# FFCV's DatasetWriter default page (4 x its 2 MiB minimum); what one sample may fill of it, with
# room for the other fields and FFCV's bookkeeping.
FFCV_PAGE_SIZE = 1 << 23
PAGE_MARGIN = 1 << 16
# FFCV's pages must be smaller than 4 GiB: the largest power of two, 2 GiB, holds this side.
MAX_RESOLUTION = math.isqrt(((1 << 31) - PAGE_MARGIN) // 3)


class _HWCSource:
    """`dataset[i]` as FFCV's writer takes it: ((H, W, C) uint8 array, label). An unreadable
    file becomes a 1x1 placeholder labelled -1: the writer's worker processes must fill every
    slot (FFCV waits forever for a sample whose worker raised)."""

    PLACEHOLDER = np.zeros((1, 1, 3), dtype=np.uint8)
    MAX_SIDE = 65535  # FFCV stores heights and widths as uint16

    def __init__(self, dataset, max_resolution: int = 0,
                 page_size: int = FFCV_PAGE_SIZE) -> None:
        self.dataset, self.max_resolution, self.page_size = dataset, max_resolution, page_size
        self.parent = os.getpid()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        if os.getpid() != self.parent:  # in a writer process: Ctrl-C is the main process's
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            sample = self.dataset[index]
            if isinstance(sample, SkippedSample):
                return self.PLACEHOLDER, SKIPPED_LABEL
            image, label = sample  # (C, H, W) uint8
            array = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
            # What RGBImageField.encode asserts or fails on: an error there kills the writer
            # process and FFCV's writer waits for its samples forever.
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
                return self.PLACEHOLDER, SKIPPED_LABEL
            height, width = array.shape[:2]
            stored = self.stored_size(height, width)
            if stored != (height, width):
                import cv2  # FFCV's dependency, as its writer uses it

                array = cv2.resize(array, stored[::-1], interpolation=cv2.INTER_AREA)
            if max(array.shape[:2]) > self.MAX_SIDE or self.too_big(array.shape):
                return self.PLACEHOLDER, SKIPPED_LABEL
            return array, int(label)
        except Exception:  # noqa: BLE001  (reported by the main process, see _skip_reason)
            return self.PLACEHOLDER, SKIPPED_LABEL


    def stored_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after FFCV's own shrink to max_resolution (INTER_AREA, sides
        truncated), with each side at least 1 px: FFCV truncates the short side of an image
        longer than max_resolution:1 to 0 px, and OpenCV raises in the writer process."""
        if not self.max_resolution or max(height, width) <= self.max_resolution:
            return height, width
        ratio = self.max_resolution / max(height, width)
        return max(1, int(ratio * height)), max(1, int(ratio * width))

    def too_big(self, shape: tuple[int, ...]) -> bool:
        """Whether raw pixels of that (shrunk) shape exceed one FFCV page: its writer process
        raises in malloc, and the writer waits for the sample forever."""
        return int(np.prod(shape)) + PAGE_MARGIN > self.page_size


def page_size_for(max_resolution: int) -> int:
    """A page that holds the raw pixels of a max_resolution x max_resolution image (FFCV stores
    any image raw in proportion, raw and smart modes): FFCV's default when that fits, else the
    next power of two. Unbounded sizes (0) keep the default; larger images are skipped."""
    need = max_resolution * max_resolution * 3 + PAGE_MARGIN
    return max(FFCV_PAGE_SIZE, 1 << (need - 1).bit_length())


def _skip_reason(source: _HWCSource, index: int) -> tuple[str, str]:
    """(path, reason) of a sample the writer stored as a placeholder (read again here: only
    the main process can report)."""
    dataset = source.dataset
    samples = getattr(dataset, "samples", None)
    where = samples[index][0] if samples is not None else f"sample {index}"
    try:
        sample = dataset[index]
    except Exception as e:  # noqa: BLE001
        return where, f"{type(e).__name__}: {e}"
    if isinstance(sample, SkippedSample):
        return sample.path, sample.reason
    height, width = source.stored_size(*sample[0].shape[-2:])
    if max(height, width) > source.MAX_SIDE:
        return where, f"{width}x{height} px: FFCV stores sides up to {source.MAX_SIDE} px"
    if source.too_big((height, width, 3)):
        return where, (f"{width}x{height} px: its raw pixels exceed FFCV's page of "
                       f"{source.page_size >> 20} MiB; set --max-resolution")
    return where, "could not be converted for FFCV"


def _check_write_params(write_mode: str, max_resolution: int, jpeg_quality: int,
                        compress_probability: float, num_workers: int,
                        smart_threshold: int) -> None:
    if write_mode not in WRITE_MODES:
        raise ConfigError(f"write_mode (--write-mode) must be one of {', '.join(WRITE_MODES)}, "
                          f"got {write_mode!r}")
    if not 0 <= max_resolution <= MAX_RESOLUTION:
        raise ConfigError(f"max_resolution (--max-resolution) must be in 0..{MAX_RESOLUTION} "
                          f"(0 = keep sizes; FFCV pages are under 4 GiB), got {max_resolution}")
    if not 1 <= jpeg_quality <= 100:
        raise ConfigError(f"jpeg_quality (--jpeg-quality) must be in 1..100, got {jpeg_quality}")
    if not 0.0 <= compress_probability <= 1.0:
        raise ConfigError(f"compress_probability (--compress-probability) must be in 0..1, got "
                          f"{compress_probability}")
    if not 0 <= num_workers <= MAX_WORKERS:
        raise ConfigError(f"num_workers (--num-workers) must be 0..{MAX_WORKERS}, got "
                          f"{num_workers}")
    if smart_threshold < 0:
        raise ConfigError(f"smart_threshold (--smart-threshold) must be >= 0 bytes, got "
                          f"{smart_threshold}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Written:
    """A split written under temporary names, not yet published."""
    tmp: Path
    tmp_json: Path
    result: WriteResult

    def renames(self) -> list[tuple[Path, Path]]:
        """(temporary, final) names, the sidecar first: a beton is only ever published with
        its description beside it."""
        return [(self.tmp_json, sidecar_path(self.result.path)), (self.tmp, self.result.path)]

    def discard(self) -> None:
        for path in (self.tmp, self.tmp_json):
            path.unlink(missing_ok=True)


def _write_split(ff: SimpleNamespace, dataset, target: Path, params: dict[str, Any],
                 num_workers: int, info: dict[str, Any]) -> _Written:
    """Write one split (and its sidecar) under temporary names next to `target`; the caller
    publishes it (renames) once every split is written. A failure leaves nothing behind."""
    t0 = time.perf_counter()
    stamp = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.with_name(f".{target.name}.{stamp}")
    tmp_json = target.with_name(f".{sidecar_path(target).name}.{stamp}")
    writer = None
    done = False
    before: set = set()
    try:
        field_args = dict(write_mode=params["write_mode"],
                          max_resolution=params["max_resolution"] or None,
                          jpeg_quality=params["jpeg_quality"],
                          compress_probability=params["compress_probability"])
        if params["write_mode"] == "smart":
            # FFCV's rule: JPEG when the raw pixels would exceed this many bytes.
            field_args["smart_threshold"] = params["smart_threshold"]
        page_size = page_size_for(params["max_resolution"])
        writer = ff.DatasetWriter(str(tmp), {"image": ff.RGBImageField(**field_args),
                                             "label": ff.IntField()},
                                  num_workers=num_workers, page_size=page_size)
        before = set(multiprocessing.active_children())
        source = _HWCSource(dataset, params["max_resolution"], page_size)
        try:
            with _writer_watchdog(sys.modules[type(writer).__module__]):
                writer.from_indexed_dataset(source, chunksize=params["chunk_size"])
        except _WriterDied as e:
            why = e.reason or f"exit code {e.code}; its error is above: a full disk?"
            raise DatasetError(f"{target}: an FFCV writer process failed ({why}); no file was "
                               f"replaced") from None
        reader = ff.Reader(str(tmp))
        labels = reader.metadata[f"f{reader.field_names.index('label')}"]
        skipped = [_skip_reason(source, int(i)) for i in np.flatnonzero(labels < 0)]
        if len(skipped) == len(labels):
            raise DatasetError(f"{info['source']}: no readable image in the {info['split']} "
                               f"split (first: {skipped[0][0]}: {skipped[0][1]})")
        sidecar = {"format": SIDECAR_FORMAT, **info, "images": int(len(labels)),
                   **params, "skipped": [list(s) for s in skipped],
                   "ffcv_version": _ffcv_version(),
                   "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp_json.write_text(json.dumps(sidecar, indent=1) + "\n")
        _fsync(tmp)
        _fsync(tmp_json)
        done = True
        return _Written(tmp, tmp_json, WriteResult(target, int(len(labels)), skipped,
                                                   time.perf_counter() - t0))
    finally:
        if not done:
            # FFCV's writer processes outlive an interrupted write (and would keep writing
            # into the file removed below)
            for child in set(multiprocessing.active_children()) - before:
                child.terminate()
                child.join(5)
            for path in (tmp, tmp_json):
                path.unlink(missing_ok=True)
        sm = getattr(writer, "metadata_sm", None)
        if sm is not None and not isinstance(sm, int):  # FFCV leaks it when interrupted
            try:
                sm.close()
                sm.unlink()
            except (FileNotFoundError, OSError):
                pass


class _WriterDied(Exception):
    """An FFCV writer process ended with an error (its exit code in `code`; `reason`: its
    OSError in one line, "" when it printed a traceback)."""

    def __init__(self, code: int, reason: str = ""):
        super().__init__(code, reason)
        self.code, self.reason = code, reason


class _WatchedWriter(multiprocessing.Process):
    """FFCV's writer `Process` (multiprocessing's) while `_writer_watchdog` runs: records the
    processes started, for the watchdog. At module level: spawn and forkserver (macOS, Python
    >= 3.14 on Linux) pickle the process object, and a class local to a function cannot be."""

    started: list[multiprocessing.Process] = []  # the parent's, since the last watchdog began
    errors: Any = None  # the watchdog's SimpleQueue of the processes' one-line OSErrors

    def start(self) -> None:
        self._errors = _WatchedWriter.errors  # travels with the process object
        super().start()
        _WatchedWriter.started.append(self)

    def run(self) -> None:
        # Forked with the tool's SIGTERM-as-Ctrl-C handler: the clean-up's terminate()
        # would print a KeyboardInterrupt traceback per process.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            super().run()
        except OSError as e:  # a full disk: the parent's one line says it, not a traceback
            if self._errors is None:
                raise
            self._errors.put(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}")
            sys.exit(1)


@contextlib.contextmanager
def _writer_watchdog(writer_module):
    """FFCV's DatasetWriter waits forever for a writer process that died (a full disk: the
    worker's OSError ends it before it reports its allocations). Record the processes it starts
    (its module's `Process`, replaced for the block) and, when one exits with an error, end the
    main thread's wait with `_WriterDied`: a signal of our own (SIGUSR1, its handler ours for
    the block) interrupts a blocking queue read, whatever SIGINT's disposition is.

    Its `Queue` is replaced too, to record the queues: when the block ends in an exception
    (Ctrl-C early in a large write), the work queue still holds items its feeder thread is
    writing into a pipe nobody reads any more, and the interpreter joins that thread at exit:
    the tool hung instead of exiting. `cancel_join_thread` on each lets it exit (the items
    are for processes that were terminated anyway)."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # no signals there
        yield
        return
    started = _WatchedWriter.started
    started.clear()
    errors = _WatchedWriter.errors = multiprocessing.SimpleQueue()
    real = writer_module.Process

    failed: list[_WriterDied] = []
    stop = threading.Event()
    main = threading.main_thread().ident

    def watch():
        while not stop.wait(0.2):
            bad = [p.exitcode for p in list(started) if p.exitcode not in (None, 0)]
            if bad:
                failed.append(_WriterDied(bad[0], "" if errors.empty() else errors.get()))
                signal.pthread_kill(main, signal.SIGUSR1)
                return

    def writer_died(signum, frame):
        raise failed[0] if failed else _WriterDied(-1)

    queues: list[Any] = []
    real_queue = writer_module.Queue

    def recorded_queue(*args, **kwargs):
        queues.append(real_queue(*args, **kwargs))
        return queues[-1]

    previous = signal.signal(signal.SIGUSR1, writer_died)
    writer_module.Process, writer_module.Queue = _WatchedWriter, recorded_queue
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    except BaseException:
        for queue in queues:
            queue.cancel_join_thread()
        raise
    finally:
        stop.set()
        thread.join()
        writer_module.Process, writer_module.Queue = real, real_queue
        signal.signal(signal.SIGUSR1, previous)
        _WatchedWriter.errors = None
        errors.close()


def _ffcv_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("ffcv")
    except PackageNotFoundError:
        return "unknown"


# The settings that change what is stored, per write mode.
STORAGE_SETTINGS = {"proportion": ("max_resolution", "compress_probability", "jpeg_quality"),
                    "jpg": ("max_resolution", "jpeg_quality"), "raw": ("max_resolution",),
                    "smart": ("max_resolution", "smart_threshold", "jpeg_quality")}


def _refuse_other_settings(target: Path, params: dict[str, Any]) -> None:
    """Refuse to replace `target` when its sidecar records other storage settings: a second
    recipe's write would silently change what the first trains on. A file without a readable
    sidecar has nothing to compare and is replaced; a sidecar without its file replaces
    nothing."""
    if not target.is_file():
        return
    try:
        old = json.loads(sidecar_path(target).read_text())
    except (OSError, ValueError):
        return
    if not isinstance(old, dict):
        return
    # Of another mode, the settings both modes store are named too (max_resolution always).
    now = STORAGE_SETTINGS.get(params["write_mode"], ())
    then = STORAGE_SETTINGS.get(old.get("write_mode"), ())
    keys = (("write_mode",) if old.get("write_mode") != params["write_mode"] else ()) + tuple(
        k for k in now if k in then)
    differ = [f"{k} {old.get(k)} (now {params[k]})" for k in keys if old.get(k) != params[k]]
    if differ:
        raise DatasetError(f"{target}: written with other settings ({', '.join(differ)}); "
                           f"write to another folder with --out=FOLDER (and train with "
                           f"--data.ffcv_dir=FOLDER), or replace it with --overwrite")


def write_beton(data: DataConfig, out: Path | str | None = None, *,
                write_mode: str = "proportion", max_resolution: int = 512,
                jpeg_quality: int = 90, compress_probability: float = 0.5,
                smart_threshold: int = 256 * 256 * 3, num_workers: int = 0,
                chunk_size: int = 100, splits: Sequence[str] = SPLITS,
                overwrite: bool = False) -> list[WriteResult]:
    """Write the data set `data` names (digits, an ImageFolder, CIFAR-10) as FFCV files
    `<out>/{train,val}.beton` with JSON sidecars, with ffcv-imagenet's knobs.

    Args:
        data: `dataset`, `path` and `ffcv_dir` are used (and `download` for CIFAR-10).
        out: output folder; None = `beton_dir(data)` (the loader's default).
        write_mode: proportion (JPEG with `compress_probability`, raw otherwise), jpg, raw, or
            smart (JPEG when the raw pixels exceed `smart_threshold` bytes).
        max_resolution: longest side stored (larger images are shrunk); 0 = keep sizes.
        jpeg_quality: JPEG quality 1..100.
        num_workers: writer processes; 0 = one per core.
        overwrite: replace files whose sidecars record other write settings (without it they
            are refused: the ResNet-50 and ResNet-18 recipes store ImageNet differently, and
            both default to `<dataset root>/ffcv`).
    Returns:
        One `WriteResult` per split: path, images, unreadable files (skipped, listed).
    Raises:
        ConfigError: a writing parameter is out of range.
        DatasetError: the data set is missing or has no readable image, `out` cannot be
            created, or it holds files written with other settings (and not `overwrite`).
        RunError: FFCV is not installed.
    """
    _check_write_params(write_mode, max_resolution, jpeg_quality, compress_probability,
                        num_workers, smart_threshold)
    ff = _ffcv()
    from .loader import _datasets  # the torch backend's datasets: the same labels

    out = Path(out).expanduser() if out is not None else beton_dir(data)
    train, val, classes, root = _datasets(data)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"{out}: cannot create the output folder ({e.strerror})") from None
    params = dict(write_mode=write_mode, max_resolution=max_resolution,
                  jpeg_quality=jpeg_quality, compress_probability=compress_probability,
                  smart_threshold=smart_threshold, chunk_size=chunk_size)
    from ..engine.checkpoint import folder_locked  # here: the engine imports this package

    # From the settings check to the publishing, one writer at a time: two started together
    # both passed the check and the last to finish replaced the other's files silently.
    with folder_locked(out):
        return _write_splits(ff, data, out, params, splits, overwrite,
                             num_workers or usable_cores(), (train, val, classes, root))


def _publish_together(renames: list[tuple[Path, Path]]) -> None:
    """Rename every (temporary, final) pair, or none: a failure part-way (an immutable or
    undeletable old file) puts back the files already replaced, so the folder never holds one
    split new and its partner old, nor a sidecar describing another file.

    Raises:
        DatasetError: naming the final file that could not be replaced.
    """
    for _, final in renames:
        if final.is_dir() and not final.is_symlink():
            raise DatasetError(f"{final}: is a folder, not a file; move it away to write the FFCV "
                               f"files there; nothing was replaced")
    done: list[tuple[Path, Path | None]] = []  # (final, a second name of its old file, or None)
    try:
        for tmp, final in renames:
            old = None
            if final.exists() or final.is_symlink():
                # A second name, not a move: the final name holds the old file or the new one
                # at every moment (a reader, a kill between two renames).
                old = final.with_name(f"{tmp.name}.old")
                try:
                    os.link(final, old, follow_symlinks=False)
                except OSError:  # a file system without hard links: moved aside instead
                    os.replace(final, old)
            done.append((final, old))
            os.replace(tmp, final)
    except BaseException as e:  # an OSError, or Ctrl-C / SIGTERM between two renames
        for published, old in reversed(done):
            with contextlib.suppress(OSError):
                if old is not None:
                    os.replace(old, published)
                elif published.exists():
                    published.unlink()
            with contextlib.suppress(OSError):  # left when putting it back failed
                if old is not None:
                    old.unlink()
        if not isinstance(e, OSError):
            raise
        raise DatasetError(f"{final}: cannot write it in place ({e.strerror or e}); no file "
                           f"was replaced") from None
    for _, old in done:
        if old is not None:
            with contextlib.suppress(OSError):
                old.unlink()


# `_write_split`'s temporary names and `_publish_together`'s second names of old files:
# .<final name>.tmp-<pid>-<8 hex>[.old]
_TEMPORARY = re.compile(r"\.(?P<final>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}(?P<old>\.old)?")


def _clear_stale_temporaries(out: Path) -> None:
    """Deal with the hidden files a killed write left in `out` (SIGKILL, the OOM killer, a
    power cut: nothing ran to remove them): a temporary file is deleted (a half-written or
    unpublished beton, as large as the data set); a second name of an old file is deleted when
    the final name holds a file, and renamed back to it when the final name is empty (the write
    was killed between moving the old file aside and putting the new one in place), so no
    published file is lost. Files of a process still alive are left alone (another host
    sharing the folder). Called under the folder's lock, which every writer holds while it
    writes; each file dealt with is named in a line on stderr."""
    try:
        entries = [e for e in os.scandir(out) if e.is_file(follow_symlinks=False)]
    except OSError:  # the write names the problem with the folder
        return
    for entry in sorted(entries, key=lambda e: e.name):
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or pid_alive(int(match["pid"])):
            continue
        stale, final = Path(entry.path), out / match["final"]
        try:
            if match["old"] and not (final.exists() or final.is_symlink()):
                os.replace(stale, final)
                print(one_line(f"{final}: put back from {stale.name}, where a killed FFCV "
                               f"write (pid {match['pid']}) had moved it"), file=sys.stderr)
            else:
                stale.unlink()
                print(one_line(f"removed {stale}, left by a killed FFCV write (pid "
                               f"{match['pid']})"), file=sys.stderr)
        except OSError as e:  # not ours to remove (another user's): the write goes on
            print(one_line(f"{stale}: left by a killed FFCV write (pid {match['pid']}), "
                           f"cannot remove it ({e.strerror or e})"), file=sys.stderr)


def _write_splits(ff: SimpleNamespace, data: DataConfig, out: Path, params: dict[str, Any],
                  splits: Sequence[str], overwrite: bool, workers: int,
                  datasets: tuple) -> list[WriteResult]:
    train, val, classes, root = datasets
    _clear_stale_temporaries(out)
    if not overwrite:
        for split in splits:
            _refuse_other_settings(out / f"{split}.beton", params)
    written: list[_Written] = []
    try:
        for split in splits:
            dataset = {"train": train, "val": val}[split]
            source = getattr(dataset, "root", None) or root
            info = {"split": split, "dataset": data.dataset, "source": str(source),
                    "classes": list(classes)}
            written.append(_write_split(ff, dataset, out / f"{split}.beton", params, workers,
                                        info))
        _publish_together([r for w in written for r in w.renames()])
        _fsync(out)
    except OSError as e:  # an unwritable folder, a full disk: one line, not a traceback
        raise DatasetError(f"{e.filename or out}: cannot write the FFCV files "
                           f"({e.strerror or e})") from None
    finally:
        for w in written:
            w.discard()
    return [w.result for w in written]


# --------------------------------------------------------------------------------------------
# Loading

@dataclass
class BetonInfo:
    """What a .beton holds, read from its header and metadata (no image data)."""
    path: Path
    labels: np.ndarray  # int64 per stored sample; -1 = placeholder of an unreadable file
    heights: np.ndarray
    widths: np.ndarray
    sidecar: dict[str, Any]

    @property
    def good(self) -> np.ndarray:
        """Ids of the loadable samples."""
        return np.flatnonzero(self.labels >= 0).astype(np.uint64)

    @property
    def skipped(self) -> dict[str, str]:
        return {str(p): str(r) for p, r in self.sidecar.get("skipped", [])}

    def describe(self) -> str:
        s = self.sidecar
        how = (f"{s['write_mode']}, max {s['max_resolution'] or 'original'} px, JPEG q"
               f"{s['jpeg_quality']}" if s else "no sidecar")
        return f"{self.path} ({len(self.good)} images; {how})"


def _header_problem(ff: SimpleNamespace, path: Path, size: int) -> str | None:
    """What is wrong with a .beton's header, checked against the file's `size` before FFCV's
    Reader allocates and seeks by its numbers (a corrupt num_samples made it allocate 22 GiB, a
    page_size of 0 or a pointer past 2^63 raised OverflowError); None when they fit. A file
    of another format version is left to the Reader, whose error says so."""
    types = ff.types
    if size < types.HeaderType.itemsize:
        return f"{size} bytes, fewer than FFCV's header"
    header = np.fromfile(path, dtype=types.HeaderType, count=1)[0]
    if header["version"] != types.CURRENT_VERSION:
        return None
    page = int(header["page_size"])
    if page <= 0 or page & (page - 1):  # FFCV's writer refuses other sizes
        return f"page_size {page} is not a power of two"
    count = int(header["num_fields"])
    fields_end = types.HeaderType.itemsize + count * types.FieldDescType.itemsize
    if fields_end > size:
        return f"num_fields {count} do not fit in its {size} bytes"
    fields = np.fromfile(path, dtype=types.FieldDescType, count=count,
                         offset=types.HeaderType.itemsize)
    handlers = types.get_handlers(fields)
    if None in handlers:  # a custom field: the Reader refuses it
        return None
    samples = int(header["num_samples"])
    metadata_end = fields_end + samples * types.get_metadata_type(handlers).itemsize
    if metadata_end > size:
        return f"num_samples {samples}: their metadata do not fit in its {size} bytes"
    table = int(header["alloc_table_ptr"])
    if not metadata_end <= table <= size:
        return f"alloc_table_ptr {table} is outside its data ({metadata_end} to {size} bytes)"
    return None


def _images_problem(ff: SimpleNamespace, image: np.ndarray, good: np.ndarray, page_size: int,
                    data_end: int, max_resolution: int | None) -> str | None:
    """What is wrong with the image field's metadata of the loadable samples `good`: FFCV
    sizes its decode buffers by the largest height x width (garbage sizes made it allocate
    257 GB at the first epoch) and reads each image at its data_ptr. None when all is well."""
    image = image[good]
    heights, widths = image["height"].astype(np.int64), image["width"].astype(np.int64)
    raw = image["mode"] == ff.IMAGE_MODES["raw"]
    checks = [
        (~np.isin(image["mode"], list(ff.IMAGE_MODES.values())), "has an unknown storage mode"),
        ((heights < 1) | (widths < 1), "is stored as an empty image"),
        (image["data_ptr"] >= data_end, "points past the image data"),
    ]
    if max_resolution:
        checks.append((np.maximum(heights, widths) > max_resolution,
                       f"is larger than the {max_resolution} px it was written with "
                       f"(--max-resolution in the sidecar)"))
    # raw pixels are written into one page
    checks.append((raw & (heights * widths * 3 > page_size),
                   f"has more raw pixels than its {page_size}-byte page holds"))
    for bad, what in checks:
        if bad.any():
            i = int(np.argmax(bad))
            return (f"sample {int(good[i])} ({int(heights[i])}x{int(widths[i])} px) {what}")
    return None


def read_beton(ff: SimpleNamespace, path: Path, data: DataConfig) -> BetonInfo:
    """Open a .beton's header, metadata and sidecar, checking what FFCV would allocate or read
    by against the file's size and the sidecar.

    Raises:
        DatasetError: the file is missing or not a complete, consistent FFCV file.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: FFCV file not found; write it with: {write_command(data)}")
    rewrite = f"rewrite it with: {write_command(data)}"
    size = path.stat().st_size
    try:
        problem = _header_problem(ff, path, size)
        if problem is None:
            reader = ff.Reader(str(path))
    except (AssertionError, OSError, IndexError, KeyError, TypeError, ValueError,
            MemoryError, OverflowError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem is not None:
        raise DatasetError(f"{path}: not a readable FFCV file ({problem}); {rewrite}")
    names = list(reader.field_names)
    if "image" not in names or "label" not in names:
        raise DatasetError(f"{path}: FFCV file without 'image' and 'label' fields (fields: "
                           f"{', '.join(names)}); {rewrite}")
    alloc = reader.alloc_table
    # Compared without adding: a garbage ptr + size wraps around in uint64.
    past_end = (alloc["ptr"] > size) | (alloc["size"] > size - np.minimum(alloc["ptr"], size))
    if len(reader.metadata) != reader.num_samples or not len(alloc) or past_end.any():
        raise DatasetError(f"{path}: truncated FFCV file; {rewrite}")
    image = reader.metadata[f"f{names.index('image')}"]
    labels = np.asarray(reader.metadata[f"f{names.index('label')}"], dtype=np.int64)
    sidecar: dict[str, Any] = {}
    side = sidecar_path(path)
    if side.is_file():
        try:
            sidecar = json.loads(side.read_text())
        except (OSError, ValueError) as e:
            raise DatasetError(f"{side}: unreadable sidecar ({e}); {rewrite}") from None
        if not isinstance(sidecar, dict):  # valid JSON all the same: `[]`, a number
            raise DatasetError(f"{side}: unreadable sidecar (not a JSON object but "
                               f"{type(sidecar).__name__} {json.dumps(sidecar)[:40]}); "
                               f"{rewrite}")
        if sidecar.get("images") != len(labels):  # a stale sidecar of an earlier file
            sidecar = {}
    info = BetonInfo(path, labels, np.asarray(image["height"]), np.asarray(image["width"]),
                     sidecar)
    if not len(info.good):
        raise DatasetError(f"{path}: no loadable images")
    problem = _images_problem(ff, image, info.good, int(reader.page_size),
                              int(reader.header["alloc_table_ptr"]),
                              sidecar.get("max_resolution"))
    if problem is not None:
        raise DatasetError(f"{path}: corrupt FFCV file ({problem}); {rewrite}")
    return info


class FfcvDeviceLoader:
    """Iterates an FFCV loader's (images, labels) on `device`: images normalised float
    (N, C, H, W), channels-last when asked (the same contract as loader.DeviceLoader)."""

    def __init__(self, ff: SimpleNamespace, loader, device: torch.device,
                 normalize: Normalize, channels_last: bool, info: BetonInfo,
                 data: DataConfig | None = None, decoder=None) -> None:
        self.ff, self.loader, self.device, self.channels_last = ff, loader, device, channels_last
        self.normalize = normalize.to(device)
        self.info, self.data, self.decoder = info, data, decoder
        self.epoch, self.start_batch = 0, 0
        # Unreadable files the writer skipped (the engine reports each once).
        self.skipped: dict[str, str] = info.skipped

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    def describe(self) -> str:
        """The file read and how it was written (for a run's summary)."""
        return self.info.describe()

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (its order and augmentation follow from the seed and the epoch)
        and skip its first `start_batch` batches (resume inside an epoch)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return max(len(self.loader) - self.start_batch, 0)

    def _epoch_iterator(self):
        """FFCV's Loader.__iter__, for a chosen epoch and first batch."""
        loader = self.loader
        if self.decoder is not None and self.data is not None:
            res = progressive_resolution(self.data, self.epoch)
            self.decoder.output_size = (res, res)  # applied when the epoch allocates buffers
        order = loader.traversal_order.sample_order(self.epoch)
        size = loader.batch_size
        order = order[:len(loader) * size][self.start_batch * size:]
        loader.next_epoch = self.epoch + 1
        with torch_threads():  # FFCV sets torch's thread count to its worker count
            self.ff.Compiler.set_num_threads(loader.num_workers)
            return self.ff.EpochIterator(loader, order)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        batches = self._epoch_iterator()
        try:
            for images, labels in batches:
                # FFCV reuses its output buffers a few batches later: normalise (a new tensor)
                # and copy the labels before handing them out.
                images = images.to(self.device, non_blocking=True)  # (N, C, H, W) uint8
                labels = labels.to(self.device, non_blocking=True).view(-1).clone()
                yield self.normalize(images).contiguous(memory_format=fmt), labels
        finally:
            _stop(batches)


def _stop(batches) -> None:
    """End an FFCV EpochIterator, also one left mid-epoch. Its `close()` only signals the
    thread and then releases the memory the thread may still be decoding from; the thread
    stops at its next full queue (at most its batches ahead, then 0.5 s), and a process exiting
    before then could abort ("terminate called without an active exception"). So: signal,
    join, then release, once (`closed`, which FFCV never sets, keeps `__del__` from releasing
    again)."""
    batches.terminate_event.set()
    if batches.is_alive():
        batches.join(timeout=60)
    if not batches.closed:
        batches.close()
        batches.closed = True


def _threads(num_workers: int) -> int:
    """FFCV decoding threads: `num_workers`, 0 = one per core, at most the cores numba uses."""
    cores = _ffcv().numba.config.NUMBA_NUM_THREADS
    return min(num_workers, cores) if num_workers > 0 else cores


def _pipelines(ff: SimpleNamespace, decoder, device: torch.device) -> dict[str, list]:
    # ffcv-imagenet's order: uint8 to the device before the layout change; normalised later.
    to_device = [ff.ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    return {"image": [decoder, ff.ToTensor(), *to_device, ff.ToTorchImage(channels_last=True)],
            "label": [ff.IntDecoder(), ff.ToTensor(), *to_device]}


def _warn_small(info: BetonInfo, data: DataConfig, rank: int) -> None:
    """Warn once per file when the stored images are smaller than the largest training
    crop (every crop is then upsampled)."""
    good = info.good
    longest = int(max(info.heights[good].max(), info.widths[good].max()))
    largest = max(progressive_resolution(data, e) for e in
                  range(max(data.end_ramp, data.start_ramp) + 1))
    key = str(info.path)
    if rank == 0 and longest < largest and key not in _warned:
        _warned.add(key)
        written = info.sidecar.get("max_resolution")
        if written and longest >= written:  # the cap shrank them: a larger one keeps more
            how = f" (written with --max-resolution={written})"
            advice = "rewrite with a larger --max-resolution"
        else:  # stored at their own size (cap 0, or above them): the data set is this small
            how = " (their original size)" if written is not None else ""
            # with progressive resizing the largest crop is data.max_res, not data.train_res
            advice = (f"lower data.{'max_res' if data.min_res else 'train_res'} to avoid it")
        warnings.warn(f"{info.path}: stored images are at most {longest} px{how}, smaller "
                      f"than the {largest} px training crop: every crop is upsampled; "
                      f"{advice}", stacklevel=3)


def _check_pair(train: BetonInfo, val: BetonInfo, data: DataConfig) -> None:
    """The two files come from one data set, the one the config names (by their sidecars;
    files without one are taken as they are). A pair written from different data sets would
    validate against the wrong classes, or fail mid-epoch on a label out of range."""
    rewrite = f"rewrite both with: {write_command(data)}"
    for info in (train, val):
        written = info.sidecar.get("dataset")
        if written is not None and written != data.dataset:
            raise DatasetError(f"{info.path}: written from data.dataset={written}, but the "
                               f"config has data.dataset={data.dataset}; {rewrite}")
    classes = [info.sidecar.get("classes") for info in (train, val)]
    if None not in classes and classes[0] != classes[1]:
        raise DatasetError(f"{train.path} and {val.path} were written from different data sets "
                           f"({len(classes[0])} and {len(classes[1])} classes, first "
                           f"{classes[0][:2]} and {classes[1][:2]}); {rewrite}")
    if data.dataset == "imagefolder" and classes[0] is not None:
        # data.path's own class folders, where they are there to list (the files may travel
        # without the images): files written from another folder taught its classes, under
        # this one's name, without a word
        from torchvision.datasets.folder import find_classes  # the writer's listing

        split = dataset_root(data) / "train"
        try:
            here = find_classes(str(split))[0]
        except OSError:  # no such folder (or no class folders): nothing to compare with
            here = None
        if here is not None and here != classes[0]:
            raise DatasetError(f"{train.path}: written from {len(classes[0])} classes "
                               f"({', '.join(classes[0][:3])}, ...), but {split} holds "
                               f"{len(here)} ({', '.join(here[:3])}, ...): the files are of "
                               f"another folder, or the folder changed; {rewrite}")
    n_train = len(classes[0]) if classes[0] is not None else int(train.labels.max()) + 1
    if int(val.labels.max()) >= n_train:
        raise DatasetError(f"{val.path}: label {int(val.labels.max())} but {train.path} has "
                           f"{n_train} classes; {rewrite}")


def build_ffcv_loaders(data: DataConfig, aug: AugConfig, *, rank: int, world_size: int,
                       device: torch.device, channels_last: bool, seed: int,
                       grad_accum_steps: int, dtype: torch.dtype):
    """`build_loaders` for `data.backend=ffcv` (see its contract in loader.py).

    Raises:
        DatasetError: a .beton file is missing or unreadable (the message gives the
            tools/write_ffcv.py command to run).
        ConfigError: batch sizes do not split, `data.ffcv_order=quasi_random` under DDP, or
            `aug.train_crop=pad_random` with stored images not of size `data.train_res`.
        RunError: FFCV is not installed.
    """
    from .loader import Loaders, rank_batches

    if data.ffcv_order == "quasi_random" and world_size > 1:
        raise ConfigError(f"data.ffcv_order=quasi_random does not work with {world_size} ranks "
                          f"(FFCV has no distributed QUASI_RANDOM); use data.ffcv_order=random")
    ff = _ffcv()
    folder = beton_dir(data)
    train_info = read_beton(ff, folder / "train.beton", data)
    val_info = read_beton(ff, folder / "val.beton", data)
    _check_pair(train_info, val_info, data)
    train_good = train_info.good
    batch, val_batch = rank_batches(data, world_size, grad_accum_steps, len(train_good),
                                    train_info.path)
    classes = train_info.sidecar.get("classes") or [
        str(i) for i in range(int(max(train_info.labels.max(), val_info.labels.max())) + 1)]

    if data.val_res > data.val_resize:
        raise ConfigError(f"data.backend=ffcv center-crops inside the resized image: data.val_res"
                          f"={data.val_res} must be <= data.val_resize={data.val_resize}")
    res = progressive_resolution(data, 0)
    if aug.train_crop == "pad_random":
        sizes = {(int(h), int(w)) for h, w in zip(train_info.heights[train_good],
                                                   train_info.widths[train_good])}
        if data.min_res:
            raise ConfigError(f"aug.train_crop=pad_random with data.backend=ffcv crops the "
                              f"stored images as they are: no progressive resizing "
                              f"(data.min_res={data.min_res}; set it to 0)")
        if sizes != {(data.train_res, data.train_res)}:
            found = ", ".join(f"{w}x{h}" for h, w in sorted(sizes)[:3])
            raise ConfigError(f"aug.train_crop=pad_random with data.backend=ffcv needs every "
                              f"stored image at data.train_res={data.train_res} px; "
                              f"{train_info.path} holds {found}")
        decoder = ff.SeededCropFlip((res, res), aug.scale, aug.ratio, aug.hflip, seed,
                                    padding=aug.padding)
    else:
        _warn_small(train_info, data, rank)
        decoder = ff.SeededCropFlip((res, res), aug.scale, aug.ratio, aug.hflip, seed,
                                    region_decode=data.region_decode,
                                    native_resize=data.ffcv_resize == "torch")
    threads = _threads(data.num_workers)
    order = {"random": ff.OrderOption.RANDOM,
             "quasi_random": ff.OrderOption.QUASI_RANDOM}[data.ffcv_order]
    with torch_threads():
        train = ff.Loader(str(train_info.path), batch_size=batch, num_workers=threads,
                          # FFCV orders epoch e by seed + e: a mixed seed keeps the runs of
                          # seeds s and s + 1 from sharing their epochs' orders shifted by one.
                          order=order, distributed=world_size > 1,
                          seed=sample_seed(seed, 0, -4) % 2**31, drop_last=True,
                          os_cache=data.ffcv_os_cache,
                          indices=None if len(train_good) == len(train_info.labels)
                          else train_good,
                          pipelines=_pipelines(ff, decoder, device))
        if data.ffcv_resize == "torch":
            val_decoder = ff.ResizeCenterCrop((data.val_res, data.val_res), data.val_resize)
        else:  # FFCV's: the center square of side val_res / val_resize x the shorter side
            val_decoder = ff.CenterCropRGBImageDecoder((data.val_res, data.val_res),
                                                       ratio=data.val_res / data.val_resize)
        val = ff.Loader(str(val_info.path), batch_size=val_batch, num_workers=threads,
                        order=ff.OrderOption.SEQUENTIAL, distributed=False, seed=seed,
                        drop_last=False, os_cache=data.ffcv_os_cache,
                        indices=val_info.good[rank::world_size],
                        pipelines=_pipelines(ff, val_decoder, device))
    normalize = Normalize(data.mean, data.std, dtype)
    return Loaders(FfcvDeviceLoader(ff, train, device, normalize, channels_last, train_info,
                                    data, decoder),
                   FfcvDeviceLoader(ff, val, device, normalize, channels_last, val_info),
                   len(classes), list(classes), dataset_root(data), len(train_good),
                   len(val_info.good))
