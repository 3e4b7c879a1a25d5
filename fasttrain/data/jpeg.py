"""Region JPEG decoding: only a crop box's pixels, through libjpeg-turbo (csrc/jpeg).

RandomResizedCrop throws away about half of each training image. `decode_region` asks
libjpeg-turbo for the box alone (rows above it skipped, columns outside its iMCU band never
converted) and, when the box is at least twice the output size, decodes it at 1/2, 1/4 or 1/8
scale in the DCT domain, which is both a proper low-pass downscale and much less work. The
reference twin, `decode_region_reference`, decodes the whole image with torchvision and slices.

The library (`fasttrain/data/_jpeg*.so`, built by setup.py when libjpeg-turbo's development files
are present) is called through ctypes with plain C types, so FFCV's numba-compiled decoders call
the same functions (`numba_region_decoder`). Without it, `AVAILABLE` is False and callers decode
whole images (`LOAD_ERROR` says why).
"""
from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
OK, ERROR, UNSUPPORTED, BAD_ARGUMENT, WARNING = 0, -1, -2, -3, 1
_ERR_SIZE = 200
DCT_SCALES = (8, 4, 2, 1)  # libjpeg-turbo's SIMD-accelerated reductions, largest first

_lib: ctypes.CDLL | None = None
AVAILABLE = False
LOAD_ERROR = ""


def _library_path() -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = HERE / f"_jpeg{suffix}"
        if path.is_file():
            return path
    return None


def _load() -> None:
    global _lib, AVAILABLE, LOAD_ERROR
    path = _library_path()
    if path is None:
        LOAD_ERROR = ("fasttrain/data/_jpeg*.so is not built (setup.py builds it when "
                      "libjpeg-turbo's development files are installed: Debian "
                      "libjpeg62-turbo-dev; tools/env.sh installs them)")
        return
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        LOAD_ERROR = f"{path.name} did not load: {e}"
        return
    try:
        _bind(lib)
    except AttributeError as e:  # a library built from older sources lacks a function
        LOAD_ERROR = (f"{path.name} is a build of older sources ({e}); rebuild it (tools/env.sh "
                      f"does when csrc/ changes)")
        return
    _lib, AVAILABLE = lib, True


def _bind(lib: ctypes.CDLL) -> None:
    u8p, i32, i32p = ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32)
    lib.ft_jpeg_info.argtypes = [u8p, ctypes.c_uint64, i32p, i32p, i32p, ctypes.c_char_p,
                                 ctypes.c_uint64]
    lib.ft_jpeg_info.restype = ctypes.c_int
    lib.ft_jpeg_decode_region.argtypes = [u8p, ctypes.c_uint64, i32, i32, i32, i32, i32, u8p,
                                          ctypes.c_char_p, ctypes.c_uint64]
    lib.ft_jpeg_decode_region.restype = ctypes.c_int
    lib.ft_jpeg_lib_version.restype = ctypes.c_int
    lib.ft_jpeg_check.argtypes = [u8p, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_uint64]
    lib.ft_jpeg_check.restype = ctypes.c_int


_load()


class JpegInfo(NamedTuple):
    height: int
    width: int
    rgb: bool  # False: CMYK/YCCK, which decode_region refuses (decode those whole elsewhere)


def is_jpeg(raw: bytes | np.ndarray) -> bool:
    return len(raw) >= 3 and bytes(raw[:3]) == b"\xff\xd8\xff"


def _pointer(raw: bytes | np.ndarray) -> tuple[int, int]:
    if isinstance(raw, np.ndarray):
        return raw.ctypes.data, raw.nbytes
    return ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value, len(raw)


def lib_version() -> str:
    """libjpeg-turbo's version the decoder was built with, e.g. '2.1.5'; '' without it."""
    if _lib is None:
        return ""
    n = _lib.ft_jpeg_lib_version()
    return f"{n // 1000000}.{n // 1000 % 1000}.{n % 1000}"


def jpeg_info(raw: bytes | np.ndarray) -> JpegInfo:
    """Height, width and RGB-decodability from the headers alone.

    Raises:
        RuntimeError: the decoder library is not available.
        ValueError: not a readable JPEG (the reason from libjpeg).
    """
    if _lib is None:
        raise RuntimeError(f"region JPEG decoder unavailable: {LOAD_ERROR}")
    h, w, rgb = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_int32()
    err = ctypes.create_string_buffer(_ERR_SIZE)
    # A bytes object stays alive (and unmoved) for the duration of the call.
    ptr, size = _pointer(raw)
    code = _lib.ft_jpeg_info(ptr, size, ctypes.byref(h), ctypes.byref(w), ctypes.byref(rgb),
                             err, _ERR_SIZE)
    if code != OK:
        raise ValueError(f"cannot decode: {err.value.decode(errors='replace')}")
    return JpegInfo(h.value, w.value, bool(rgb.value))


def decode_warning(raw: bytes | np.ndarray) -> str | None:
    """libjpeg's first warning when it decodes the whole JPEG `raw` (damage it decodes past, such
    as "Corrupt JPEG data: 216 extraneous bytes before marker 0xda"), or None for a clean decode.
    The loaders' decoders drop or print such warnings and decode on; tools/check_data.py lists
    them.

    Raises:
        RuntimeError: the decoder library is not available.
        ValueError: not a readable JPEG (the reason from libjpeg).
    """
    if _lib is None:
        raise RuntimeError(f"region JPEG decoder unavailable: {LOAD_ERROR}")
    err = ctypes.create_string_buffer(_ERR_SIZE)
    ptr, size = _pointer(raw)
    code = _lib.ft_jpeg_check(ptr, size, err, _ERR_SIZE)
    message = err.value.decode(errors="replace")
    if code == WARNING:
        return message or "libjpeg warned"
    if code != OK:
        raise ValueError(f"cannot decode: {message}")
    return None


def dct_scale(box_height: int, box_width: int, min_height: int, min_width: int) -> int:
    """The largest reduction d in (8, 4, 2, 1) that keeps the box at least (min_height,
    min_width) pixels after decoding at 1/d (libjpeg's rounding up)."""
    for d in DCT_SCALES:
        if box_height // d >= min_height and box_width // d >= min_width:
            return d
    return 1


def scaled_box(box: tuple[int, int, int, int], scale: int, height: int, width: int
               ) -> tuple[int, int, int, int]:
    """`box` (top, left, h, w) in full-size pixels → the smallest box of the image decoded at
    1/scale (ceil(height/scale) x ceil(width/scale)) covering it."""
    top, left, h, w = box
    if scale == 1:
        return box
    sh, sw = -(-height // scale), -(-width // scale)
    t, l = top // scale, left // scale
    b, r = min(sh, -(-(top + h) // scale)), min(sw, -(-(left + w) // scale))
    return t, l, b - t, r - l


def decode_region(raw: bytes | np.ndarray, box: tuple[int, int, int, int],
                  min_size: tuple[int, int] | None = None,
                  info: JpegInfo | None = None) -> torch.Tensor:
    """The pixels of `box` = (top, left, height, width) of a JPEG as uint8 RGB (3, h, w).

    With `min_size` = (min_h, min_w), the box is decoded at the largest DCT reduction (1/2, 1/4,
    1/8) that leaves it at least that large (then h, w are the reduced box's size); without it,
    at full size (h, w = the box's). The tensor is a (3, h, w) view of row-major (h, w, 3) memory,
    which torch's channels-last resize kernels read directly.

    Raises:
        RuntimeError: the decoder library is not available.
        ValueError: corrupt data, a CMYK/YCCK JPEG, or a box outside the image.
    """
    if _lib is None:
        raise RuntimeError(f"region JPEG decoder unavailable: {LOAD_ERROR}")
    info = info or jpeg_info(raw)
    top, left, h, w = box
    if top < 0 or left < 0 or h <= 0 or w <= 0 or top + h > info.height \
            or left + w > info.width:
        raise ValueError(f"box {box} outside the {info.height}x{info.width} image")
    scale = dct_scale(h, w, *min_size) if min_size else 1
    top, left, h, w = scaled_box(box, scale, info.height, info.width)
    out = torch.empty((h, w, 3), dtype=torch.uint8)
    err = ctypes.create_string_buffer(_ERR_SIZE)
    ptr, size = _pointer(raw)
    code = _lib.ft_jpeg_decode_region(ptr, size, scale, top, left, h, w, out.data_ptr(), err,
                                      _ERR_SIZE)
    if code != OK:
        raise ValueError(f"cannot decode: {err.value.decode(errors='replace')}")
    return out.permute(2, 0, 1)


def decode_region_reference(raw: bytes | np.ndarray, box: tuple[int, int, int, int]
                            ) -> torch.Tensor:
    """decode_region's pure-PyTorch twin at full size: torchvision decodes the whole image, then
    the box is sliced out."""
    from torchvision.io import ImageReadMode, decode_image
    data = torch.frombuffer(bytearray(bytes(raw)), dtype=torch.uint8)
    image = decode_image(data, mode=ImageReadMode.RGB)
    top, left, h, w = box
    return image[:, top:top + h, left:left + w]


def numba_region_decoder() -> ctypes._CFuncPtr:
    """`ft_jpeg_decode_region` with integer arguments only (pointers as addresses, no error
    buffer: pass 0, 0), the form numba-compiled code can call:
    (data, size, scale_denom, top, left, height, width, out, 0, 0) -> 0 or a negative code."""
    if _lib is None:
        raise RuntimeError(f"region JPEG decoder unavailable: {LOAD_ERROR}")
    fn = ctypes.CDLL(_lib._name).ft_jpeg_decode_region  # own prototype, not _lib's
    i32, ptr = ctypes.c_int32, ctypes.c_void_p
    fn.argtypes = [ptr, ctypes.c_uint64, i32, i32, i32, i32, i32, ptr, ptr, ctypes.c_uint64]
    fn.restype = ctypes.c_int
    return fn
