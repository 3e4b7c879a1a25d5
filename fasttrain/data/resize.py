"""Antialiased bilinear resize (and flip) of uint8 RGB images as a plain C function.

FFCV's numba-compiled pipeline can call C functions but not torch; the resize it ships
(libffcv's OpenCV INTER_AREA) takes ~4x as long as torch's uint8 antialiased bilinear kernel on a
~280 px crop to 224 (519-674 vs 144-174 us here) and is a different filter. The operator library
`fasttrain/ops/_C` exports `fasttrain_resize_flip_rgb_u8` (csrc/cpu/resize_u8.cpp), which runs
ATen's kernel on the caller's memory in the caller's thread, so FFCV's crops get the torch
backend's resize pixel for pixel. The torch and DALI loaders call it too (`resize_rgb`,
`resize_into`): one call resizes, flips and writes into the batch, where torch's ops cost a
dispatch and an allocation each. Its reference twin is `transforms.resize_square` then `transforms.horizontal_flip`
(torchvision's `resize(..., antialias=True)` and `horizontal_flip`).

Without the library, `AVAILABLE` is False (`LOAD_ERROR` says why): FFCV keeps its own resize and
the Python loaders torch's ops. Setting it False switches the function off in this process (the
benchmarks' torch's-ops arms); `pin_in_workers` carries that to a DataLoader's workers.
"""
from __future__ import annotations

import ctypes
from typing import Callable, Sequence

import torch

AVAILABLE = False
LOAD_ERROR = ""
_SYMBOL = "fasttrain_resize_flip_rgb_u8"
_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
             ctypes.c_int64, ctypes.c_int64, ctypes.c_int32]


def _function() -> ctypes._CFuncPtr | None:
    """A fresh ctypes prototype of the C function (each caller owns its own), or None."""
    global AVAILABLE, LOAD_ERROR
    from ..ops import _ext
    path = _ext.library_path("_C")
    if path is None or not _ext.HAS_EXT:
        LOAD_ERROR = _ext.LOAD_ERRORS.get("_C", "fasttrain/ops/_C is not loaded")
        return None
    try:
        fn = getattr(ctypes.CDLL(str(path)), _SYMBOL)
    except (OSError, AttributeError) as e:  # a library built before the function existed
        LOAD_ERROR = f"{path.name} has no {_SYMBOL} ({e}); rebuild with tools/env.sh"
        return None
    fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
    AVAILABLE = True
    return fn


_resize = _function()


def is_packed_rgb(image: torch.Tensor) -> bool:
    """True for an (H, W, 3) uint8 CPU image whose pixels are 3 packed bytes (rows may be
    further apart: a window of a larger image), the memory the C function reads."""
    return (image.dtype == torch.uint8 and image.device.type == "cpu" and image.dim() == 3
            and image.shape[2] == 3 and image.stride(2) == 1 and image.stride(1) == 3
            and image.stride(0) >= 3 * image.shape[1] and min(image.shape) >= 1)


def resize_rgb(image: torch.Tensor, height: int, width: int, flip: bool = False,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """An (H, W, 3) uint8 CPU image whose pixels are 3 packed bytes (rows may be further apart:
    a window of a larger image) resized to (height, width, 3), mirrored left-right if `flip`,
    as `TF.resize(image.permute(2, 0, 1), [height, width], antialias=True)` (then
    `TF.horizontal_flip`) computes it. Written into `out` when given: a contiguous
    (height, width, 3) uint8 CPU tensor not overlapping `image` (a row of a batch), returned.

    Raises:
        RuntimeError: the library is not available.
        ValueError: not such an image or `out`, or a size < 1.
    """
    if _resize is None:
        raise RuntimeError(f"native resize unavailable: {LOAD_ERROR}")
    if not is_packed_rgb(image):
        raise ValueError(f"need an (H, W, 3) uint8 CPU image with packed pixels, got "
                         f"{tuple(image.shape)} {image.dtype} strides {image.stride()}")
    if height < 1 or width < 1:
        raise ValueError(f"output size must be positive, got {height}x{width}")
    if out is None:
        out = torch.empty((height, width, 3), dtype=torch.uint8)
    elif (out.dtype != torch.uint8 or out.device.type != "cpu"
          or tuple(out.shape) != (height, width, 3) or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous ({height}, {width}, 3) uint8 CPU tensor, "
                         f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    if _resize(image.data_ptr(), image.shape[0], image.shape[1], image.stride(0),
               out.data_ptr(), height, width, int(bool(flip))) != 0:
        raise RuntimeError(f"{_SYMBOL} failed on a {tuple(image.shape)} image")
    return out


def resize_into(out: torch.Tensor, sources: Sequence[tuple[int, int, int, int]],
                flips: Sequence[bool]) -> torch.Tensor:
    """out[i] = the image `sources[i]` resized to out's (H, W), mirrored where `flips[i]`: one
    C call per image, no tensor per image (the DALI loader's batches, whose images are in DALI's
    buffers). A source is (address, height, width, row stride in bytes) of an (h, w, 3) uint8
    image with packed pixels that the caller keeps alive and that does not overlap `out`.

    Raises:
        RuntimeError: the library is not available, or the C function refused a source.
        ValueError: `out` is not a contiguous (N, H, W, 3) uint8 CPU tensor with N >= the
            number of sources, or `flips` has another length.
    """
    if _resize is None:
        raise RuntimeError(f"native resize unavailable: {LOAD_ERROR}")
    if (out.dtype != torch.uint8 or out.device.type != "cpu" or out.dim() != 4
            or out.shape[3] != 3 or not out.is_contiguous() or out.shape[0] < len(sources)):
        raise ValueError(f"out must be a contiguous (N >= {len(sources)}, H, W, 3) uint8 CPU "
                         f"tensor, got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    if len(flips) != len(sources):
        raise ValueError(f"{len(sources)} sources but {len(flips)} flips")
    height, width = out.shape[1], out.shape[2]
    address, step = out.data_ptr(), out.stride(0)
    for i, ((src, h, w, row_stride), flip) in enumerate(zip(sources, flips)):
        if _resize(src, h, w, row_stride, address + i * step, height, width,
                   int(bool(flip))) != 0:
            raise RuntimeError(f"{_SYMBOL} failed on source {i} ({h}x{w}, row stride "
                               f"{row_stride})")
    return out


def pin_in_workers(loader: torch.utils.data.DataLoader) -> None:
    """Makes the worker processes `loader` starts see `AVAILABLE` as it is in this process now.

    Forked workers inherit the module as it is, but spawned ones (macOS; any loader with
    multiprocessing_context="spawn") import it afresh, and forkserver ones (Linux from Python
    3.14) fork from a server that imported it, with the environment it had, when it started:
    both see whether the library loaded, so switching the function off here did not reach them.
    The value travels in the loader's worker_init_fn, which every start method pickles."""
    loader.worker_init_fn = _SetAvailable(AVAILABLE, loader.worker_init_fn)


class _SetAvailable:
    """A DataLoader worker_init_fn: `AVAILABLE` switched off in the worker unless `available`,
    then the loader's own `then`. A module-level class: spawn and forkserver pickle it."""

    def __init__(self, available: bool, then: Callable[[int], None] | None) -> None:
        self.available, self.then = available, then

    def __call__(self, worker_id: int) -> None:
        global AVAILABLE
        AVAILABLE = AVAILABLE and self.available  # never on where the library did not load
        if self.then is not None:
            self.then(worker_id)


def numba_resizer() -> ctypes._CFuncPtr:
    """The C function with integer arguments only, the form numba-compiled code can call:
    (src address, height, width, src row stride in bytes, dst address, out_height, out_width,
    flip 0/1) -> 0, or -1 on failure (dst then unspecified)."""
    fn = _function()
    if fn is None:
        raise RuntimeError(f"native resize unavailable: {LOAD_ERROR}")
    return fn
