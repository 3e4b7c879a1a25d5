"""Datasets as (uint8 image CHW, label) sources: built-in digits, any ImageFolder, CIFAR-10.

Images stay uint8 until they reach the training device, where they are normalised in one batched
op (FFCV's layout): workers decode and crop, they never do float math per pixel.
"""
from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import stat
import struct
import sys
import textwrap
import uuid
import zlib
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import to_dtype

from ..errors import DatasetError, one_line
from . import jpeg

DIGITS_SIZE = 32
DIGITS_VAL_EVERY = 5  # every 5th image of each class (in scikit-learn's order) is validation
DIGITS_JPEG_QUALITY = 95
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"


def default_root(dataset: str) -> Path:
    """Where a data set lives when `data.path` is empty: $FASTTRAIN_DATA/<dataset>, by default
    in the cache folder tools/env.sh uses ($FASTTRAIN_CACHE, default ~/.cache/fasttrain). A
    leading `~` in either variable is the home folder, as in the path options."""
    # A quoted '~/x' reaches the environment unexpanded; taken literally, it made a folder "~".
    cache = Path(os.environ.get("FASTTRAIN_CACHE") or "~/.cache/fasttrain").expanduser()
    base = Path(os.environ.get("FASTTRAIN_DATA") or cache / "data").expanduser()
    return base / dataset


def dataset_root(data) -> Path:
    """The data set folder of a DataConfig: `data.path`, or the default for `data.dataset`."""
    return Path(data.path).expanduser() if data.path else default_root(data.dataset)


_ROOT_FROM = "the folder comes from data.path, else $FASTTRAIN_DATA, else $FASTTRAIN_CACHE"


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (another user's included): the owner of a
    temporary file named after its pid may still be writing it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_killed_builds(target: Path) -> None:
    """Remove the temporary folders of `_publish_dir` builds of `target` whose process is gone
    (killed outright: SIGKILL, the OOM killer; a download of CIFAR-10 leaves ~170 MB), naming
    each on stderr. A live process's folder (a rank building at the same time) is left alone."""
    pattern = re.compile(re.escape(f".{target.name}.tmp-") + r"(\d+)-[0-9a-f]{8}")
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(match[1])
        if pid_alive(pid):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.lexists(entry.path):
            print(one_line(f"removed {entry.path}, left by a killed build of {target.name} "
                           f"(pid {pid})"), file=sys.stderr)


def _publish_dir(build: Callable[[Path], None], target: Path) -> Path:
    """Build a directory under a temporary name and rename it into place.

    The rename is atomic, so concurrent ranks or an interrupted build never leave a half-written
    `target`: whoever renames first wins, the others discard their copy.
    """
    if target.is_dir():
        return target
    if target.exists():
        raise DatasetError(f"{target}: exists and is not a directory ({_ROOT_FROM})")
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_killed_builds(target)
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    except OSError as e:
        raise DatasetError(f"{target}: cannot write the data set here ({e.strerror or e}; "
                           f"{_ROOT_FROM})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_digits(root: Path) -> Path:
    """Make sure `root` holds the built-in digits as an ImageFolder tree of real JPEG files.

    The 1,797 UCI handwritten digits (8x8, 17 grey levels, shipped with scikit-learn) are scaled to
    0..255, upsampled to 32x32 (bicubic), stored as RGB JPEGs (quality 95) under
    `root/{train,val}/<digit>/<index>.jpg`. Every 5th image of each class goes to `val` (364 images,
    1,433 for `train`): the split depends on nothing but scikit-learn's order. Idempotent.
    """
    def build(tmp: Path) -> None:
        # Imported only when building: scikit-learn alone takes ~2 s to import.
        from PIL import Image
        from sklearn.datasets import load_digits

        digits = load_digits()
        seen = [0] * 10
        for index, (image, label) in enumerate(zip(digits.images, digits.target)):
            split = "val" if seen[label] % DIGITS_VAL_EVERY == 0 else "train"
            seen[label] += 1
            pixels = np.clip(np.rint(image * (255.0 / 16.0)), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels, mode="L").resize((DIGITS_SIZE, DIGITS_SIZE),
                                                           Image.Resampling.BICUBIC)
            out = tmp / split / str(int(label))
            out.mkdir(parents=True, exist_ok=True)
            img.convert("RGB").save(out / f"{index:04d}.jpg", quality=DIGITS_JPEG_QUALITY)

    return _publish_dir(build, root)


class SkippedSample(NamedTuple):
    """Stands in for a sample whose file cannot be decoded; the collate function drops it."""
    path: str
    reason: str


def _walk_files(folder: str):
    """(folder path, file names, names of those that are no regular file) for `folder` and
    every folder below it, as os.walk(followlinks=True) lists them (a folder that cannot be
    listed passed over), refusing a symbolic link to a folder that contains it. os.walk follows
    such a loop until the path is too long for the OS (~40 rounds), so one `up -> ..` link
    listed every image of the class ~40 times, and the other classes' images under this class's
    label; torchvision's `make_dataset` has no guard, which is why this walk is written here.
    The file types come from `scandir` (no stat but for symbolic links, which os.walk stats
    too): a FIFO, socket or device, or a link to one, is named for readers that cannot skip
    files (opening a FIFO waits for a writer for good).

    Raises:
        DatasetError: a symbolic link points at a folder the walk is inside of.
    """
    chains = {folder: (os.path.realpath(folder),)}  # real paths of a folder and its parents
    pending = [folder]
    while pending:
        root = pending.pop()
        chain = chains.pop(root)
        dirs, files, special = [], [], []
        try:
            with os.scandir(root) as entries:
                for entry in entries:
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        is_dir = False
                    if is_dir:
                        dirs.append(entry.name)
                        continue
                    files.append(entry.name)
                    try:  # free for a plain entry (the folder's type field), a stat for a link
                        regular = entry.is_file() or not os.path.exists(entry.path)
                    except OSError:
                        regular = True  # unreadable: the reader says why
                    if not regular:
                        special.append(entry.name)
        except OSError:  # os.walk's default: a folder that cannot be listed is passed over
            continue
        for name in sorted(dirs):
            child = os.path.join(root, name)
            real = os.path.realpath(child)
            if real in chain:
                # The link may be a folder above `child` (`up -> ..`, met as `up/<class>`).
                link = child
                while not os.path.islink(link) and len(link) > len(folder):
                    link = os.path.dirname(link)
                child, real = link, os.path.realpath(link)
                raise DatasetError(f"{child}: symbolic link to {real}, a folder it is inside "
                                   f"of, so its images would be listed again and again; "
                                   f"remove the link")
            chains[child] = (*chain, real)
            pending.append(child)
        yield root, files, special


def folder_files(root: Path, class_to_idx: dict[str, int],
                 special: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """(image files as (path, class index), other files) under `root/<class>/` for the classes
    in `class_to_idx`, as every loader lists them: torchvision's `make_dataset` order (classes
    sorted, then folders, then files; symbolic links to folders followed, dangling links
    included: reading one fails) and an image is a file with an `IMG_EXTENSIONS` extension.
    tools/check_data.py lists through this too, so it checks exactly the files a run reads.
    `special`, when given, gets the image paths that exist but are no regular file (a FIFO, a
    device; `_walk_files`), in the same order.

    Raises:
        DatasetError: a symbolic link loops back to a folder that contains it.
    """
    images, others = [], []
    for name in sorted(class_to_idx):
        target = class_to_idx[name]
        class_dir = os.path.join(str(root), name)
        if not os.path.isdir(class_dir):
            continue
        for folder, files, odd in sorted(_walk_files(class_dir)):
            for file in sorted(files):
                path = os.path.join(folder, file)
                if has_file_allowed_extension(path, IMG_EXTENSIONS):
                    images.append((path, target))
                    if special is not None and file in odd:
                        special.append(path)
                else:
                    others.append(path)
    return images, others


def loose_images(split: Path) -> list[str]:
    """Image files (an `IMG_EXTENSIONS` extension) directly in `split`, outside every class
    folder, sorted: torchvision's ImageFolder, and so every loader, never reads them. [] when
    `split` cannot be listed. Broken links are `broken_links`'."""
    try:
        with os.scandir(split) as entries:
            return sorted(e.path for e in entries
                          if not e.is_dir() and has_file_allowed_extension(e.name, IMG_EXTENSIONS)
                          and os.path.exists(e.path))
    except OSError:
        return []


def broken_links(split: Path) -> list[tuple[str, str]]:
    """(path, target) of the symbolic links directly in `split` whose target is missing, sorted:
    torchvision's ImageFolder skips them without a word, so a class folder on an unmounted
    drive is no class at all (and every later class's label shifts). [] when `split` cannot
    be listed."""
    try:
        with os.scandir(split) as entries:
            links = sorted(e.path for e in entries if e.is_symlink())
    except OSError:
        return []
    broken = []
    for path in links:
        try:
            if not os.path.exists(path):
                broken.append((path, os.readlink(path)))
        except OSError:  # removed or replaced since the listing: not a broken link now
            pass
    return broken


def read_encoded(path: str) -> bytes:
    """The bytes of the regular file at `path` (symbolic links followed).

    Raises:
        OSError: the file cannot be opened or read.
        ValueError: a broken link, not a regular file, empty or truncated; one line.
    """
    try:
        # Checked before opening: opening a FIFO waits for a writer (check_data hung), and
        # reading a device (a link to /dev/zero) never ends (it ran out of memory).
        info = os.stat(path)
        problem = not_regular(info.st_mode)
        if problem:
            raise ValueError(problem)
        with open(path, "rb") as f:  # not Path.read_bytes: its path parsing is half the time
            raw = f.read(info.st_size)  # bounded, should it be swapped for something endless
    except FileNotFoundError:
        if os.path.islink(path):  # listed by the folder walk, but it points nowhere
            raise ValueError(f"broken symbolic link (to {os.readlink(path)})") from None
        raise
    if not raw:
        raise ValueError("empty file")
    # libjpeg-turbo decodes a truncated JPEG with a warning and grey rows; refuse it instead.
    if raw[:2] == b"\xff\xd8" and _jpeg_truncated(raw):
        raise ValueError("truncated JPEG (no end-of-image marker)")
    return raw


_FILE_KINDS = {stat.S_IFIFO: "FIFO", stat.S_IFCHR: "character device",
               stat.S_IFBLK: "block device", stat.S_IFSOCK: "socket", stat.S_IFDIR: "folder"}


def not_regular(mode: int) -> str | None:
    """What a file of `mode` (`os.stat`'s st_mode) is when it is no regular file, as the
    loaders say it ("not a regular file (a FIFO)"); None for a regular file."""
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFREG:
        return None
    return f"not a regular file (a {_FILE_KINDS.get(kind, 'special file')})"


def _jpeg_truncated(raw: bytes) -> bool:
    """Whether a JPEG has no end-of-image marker after its first scan. Walks the marker
    segments to that scan, so neither an EXIF thumbnail's marker before it (in APP1) nor data
    that cameras append after the image (phones' motion-photo trailers) is taken for it; the
    scan data cannot hold one (0xFF is stuffed there)."""
    i, n = 2, len(raw)
    while i + 4 <= n:
        if raw[i] != 0xFF:
            return False  # not a segment where one belongs: the decoder says what is wrong
        marker = raw[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0xDA:  # start of scan
            return raw.rfind(b"\xff\xd9") < i
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(raw[i + 2:i + 4], "big")
    return True  # cut before the first scan


# IMG_EXTENSIONS formats that torchvision.io cannot decode (it reads JPEG, PNG, GIF and WebP)
# but DALI can, so the other backends read them with PIL (its "PPM" is PBM/PGM/PPM); and WebP,
# whose animated files torchvision.io refuses (PIL gives the first frame, as for a GIF).
PIL_FORMATS = ("BMP", "TIFF", "PPM", "WEBP")
# The magic by which torchvision.io.decode_image hands content to libpng: decoded by PIL
# instead (`_decode_png`), whatever the file's extension.
_PNG_MAGIC = b"\x89PNG"
# torchvision's errors start with where they were raised in its build tree.
_SOURCE_LOCATION = re.compile(r"^.*?\.(?:cpp|cc|cu|h):\d+, ")
_REASON_CHARS = 160


def _reason(error: BaseException) -> str:
    """The first line of `error` without torchvision's source location, shortened at a word."""
    lines = str(error).strip().splitlines()
    text = _SOURCE_LOCATION.sub("", lines[0]) if lines else type(error).__name__
    return textwrap.shorten(text, _REASON_CHARS, placeholder=" ...")


def _check_pixels(height: int, width: int) -> None:
    """Refuse an image larger than PIL.Image.MAX_IMAGE_PIXELS (None: no limit), PIL's own
    guard, which torchvision's decoders lack.

    Raises:
        ValueError: over the limit; one line.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit and height * width > limit:
        raise ValueError(f"cannot decode: {width}x{height} pixels, more than "
                         f"PIL.Image.MAX_IMAGE_PIXELS ({limit}), could be a decompression bomb")


def _check_declared_size(raw: bytes) -> None:
    """Refuse an image whose headers declare more pixels than `_check_pixels` allows, before
    anything is decoded: a 633-byte JPEG declaring 30000x30000 pixels decoded to 3.5 GB.

    Raises:
        ValueError: over the limit; one line. Headers that cannot be read pass: the decoder
            says what is wrong with them.
    """
    if jpeg.AVAILABLE and jpeg.is_jpeg(raw):
        try:
            info = jpeg.jpeg_info(raw)  # reads the headers only
        except ValueError:
            return
        _check_pixels(info.height, info.width)
        return
    try:
        # Image.open reads the headers only. PIL refuses twice its limit itself (and warns
        # above it: fasttrain then refuses the image all the same).
        with Image.open(io.BytesIO(raw)) as image:
            height, width = image.height, image.width
    except Image.DecompressionBombError as e:
        raise ValueError(f"cannot decode: {_reason(e)}") from None
    except Exception:  # noqa: BLE001  (not an image PIL knows: the decoders say why)
        return
    _check_pixels(height, width)


# Adam7 interlacing's passes: first row, first column, row step, column step.
_ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2),
          (1, 0, 2, 1))
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type


def _check_png_data_size(raw: bytes) -> None:
    """Refuse a PNG whose image data (its IDAT chunks, inflated) is shorter than its header's
    size needs. libpng refuses it ("Not enough image data"); PIL decodes the rows that are there
    and leaves the others black (its decoder deliberately ends with the data), and nothing
    installable here says so. Call it on a verified PNG (chunks whole, their CRCs right).

    Raises:
        ValueError: no header first, too little data, or corrupt compressed data; one line.
    """
    if raw[12:16] != b"IHDR":  # the PNG standard's place for it, which libpng requires
        raise ValueError("the first chunk is not the header (IHDR)")
    width, height, depth, colour, _, _, interlace = struct.unpack_from(">IIBBBBB", raw, 16)
    bits = depth * _PNG_CHANNELS.get(colour, 1)
    needed = 0
    for top, left, row_step, column_step in _ADAM7 if interlace else ((0, 0, 1, 1),):
        rows = -(-(height - top) // row_step)
        columns = -(-(width - left) // column_step)
        if rows > 0 and columns > 0:  # each row: a filter byte and its packed samples
            needed += rows * (1 + (columns * bits + 7) // 8)
    inflate, size, offset = zlib.decompressobj(), 0, 8
    while size < needed:
        length, kind = struct.unpack_from(">I4s", raw, offset)
        if kind == b"IEND":
            break
        data = raw[offset + 8:offset + 8 + length] if kind == b"IDAT" else b""
        while data and size < needed:  # in steps, not a second copy of a large image
            size += len(inflate.decompress(data, 1 << 20))
            data = inflate.unconsumed_tail
        offset += 12 + length
    if size < needed:
        raise ValueError(f"not enough image data ({size} of {needed} bytes)")


def _decode_png(raw: bytes) -> torch.Tensor:
    """PNG content decoded by PIL to what torchvision's decode_png gives with ImageReadMode.RGB,
    its 16-bit output scaled to uint8 (the high byte: every consumer reads values up to 255):
    gray and palette expanded, alpha and transparency (tRNS) dropped, Adam7
    interlacing undone, an APNG's default image. The same values, (C, H, W) strides too.

    Not torchvision's decoder: libpng reports corrupt data by a longjmp that torchvision's
    handler turns into a segmentation fault (a byte changed in the compressed data, a height
    larger than the data), which killed a DataLoader worker's epoch and tools/check_data.py.

    Raises:
        ValueError: corrupt (a chunk's CRC included) or truncated; one line.
    """
    try:
        # libpng refuses a chunk whose CRC is wrong; PIL's decoder does not check the image
        # data's CRCs, nor that the file goes on to its end chunk (IEND).
        with PngImagePlugin.PngImageFile(io.BytesIO(raw)) as image:
            image.verify()
        _check_png_data_size(raw)
        with PngImagePlugin.PngImageFile(io.BytesIO(raw)) as image:
            if image.mode == "I;16":  # 16-bit gray, which PIL's convert clips to 255
                gray = to_dtype(torch.from_numpy(np.array(image)), torch.uint8, scale=True)
                rgb = gray.unsqueeze(2).expand(-1, -1, 3).numpy()
            else:
                # Dropped as libpng's RGB output drops it; convert would warn that it does.
                image.info.pop("transparency", None)
                rgb = np.array(image.convert("RGB"))  # PIL reads 16-bit colour's high bytes
    # PIL reports corrupt content as SyntaxError, OSError, struct.error, EOFError...
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot decode: {_reason(e)}") from None
    # (C, H, W) view of (H, W, C) memory: the strides torchvision's decoders return.
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


def _decode_whole(raw: bytes) -> torch.Tensor:
    _check_declared_size(raw)
    if raw.startswith(_PNG_MAGIC):
        return _decode_png(raw)
    try:
        image = decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                             mode=ImageReadMode.RGB)
        if image.dim() == 4:  # an animated GIF: (frames, C, H, W); PIL's convert takes frame 0
            image = image[0]
        return image
    except RuntimeError as e:
        error = e
    try:
        with Image.open(io.BytesIO(raw), formats=PIL_FORMATS) as image:
            rgb = np.array(image.convert("RGB"))  # (H, W, C)
    except Image.UnidentifiedImageError:
        reason = _reason(error)
        if reason.startswith("Unsupported image file"):  # its list omits PIL_FORMATS
            reason = "not a JPEG, PNG, GIF, WebP, BMP, TIFF or PBM/PGM/PPM image"
        raise ValueError(f"cannot decode: {reason}") from None
    # PIL's plugins report corrupt content as OSError, SyntaxError, struct.error, EOFError...
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot decode: {_reason(e)}") from None
    # (C, H, W) view of (H, W, C) memory: the strides torchvision's decoders return.
    return torch.from_numpy(rgb).permute(2, 0, 1)


def read_image(path: str) -> torch.Tensor:
    """Decode an image file to uint8 RGB (C, H, W), whatever its extension says.

    torchvision.io (libjpeg-turbo, giflib, libwebp) turns grayscale, CMYK, GIF and WebP content
    into RGB; PNG content is decoded by PIL to exactly what torchvision's libpng decoder gave
    (`_decode_png`: libpng crashed the process on corrupt files); BMP, TIFF and PBM/PGM/PPM
    content (`PIL_FORMATS`), which torchvision cannot decode, and animated WebP, which it
    refuses, are decoded by PIL and converted with its `convert("RGB")` (an animated file's
    first frame).

    Raises:
        ValueError: empty, truncated (a JPEG without its end marker), undecodable file, a
            broken symbolic link, not a regular file (a FIFO, a link to a device), or more
            pixels than PIL.Image.MAX_IMAGE_PIXELS (checked on the headers, before decoding);
            the message is one line.
    """
    return _decode_whole(read_encoded(path))


BoxChooser = Callable[[int, int], tuple[int, int, int, int]]


def read_image_box(path: str, choose_box: BoxChooser, min_size: tuple[int, int] | None,
                   region_decode: bool = True) -> torch.Tensor:
    """uint8 RGB (3, h, w) of the box `choose_box(height, width)` = (top, left, h, w) picks.

    With `region_decode` and the region decoder built (fasttrain.data.jpeg), an RGB-convertible
    JPEG is decoded inside the box only, DCT-downscaled while it stays at least `min_size` (so h,
    w may be the box's size / 2, 4 or 8); anything else (PNG, CMYK, no decoder) is decoded whole
    and sliced. `choose_box` is called exactly once either way, so seeded draws stay in step.

    Raises:
        ValueError: empty, truncated or undecodable file, or too large (as in `read_image`).
    """
    raw = read_encoded(path)
    if region_decode and jpeg.AVAILABLE and jpeg.is_jpeg(raw):
        info = jpeg.jpeg_info(raw)
        if info.rgb:
            _check_pixels(info.height, info.width)
            return jpeg.decode_region(raw, choose_box(info.height, info.width), min_size, info)
    image = _decode_whole(raw)
    top, left, h, w = choose_box(image.shape[1], image.shape[2])
    return image[:, top:top + h, left:left + w]


class SampleList(Sequence[tuple[str, int]]):
    """(path, class index) pairs, read like a list of tuples, stored as numpy arrays: the
    paths' bytes back to back with their offsets, and the labels.

    Why not the list: DataLoader workers are forked and share the parent's memory until they
    write to it, and reading a Python object writes its reference count. A worker that went
    through ImageNet's 1.28 M (path, label) tuples held its own ~200 MB copy of them: 16
    workers x 8 ranks of a recipe, ~26 GB per node (pytorch/pytorch#13246). Reading numpy
    buffers writes nothing, so the workers keep sharing one copy (9-10 MB of private memory
    after 150 k samples against 209 MB, measured)."""

    def __init__(self, pairs: Sequence[tuple[str, int]]) -> None:
        # One growing buffer, not a list of encoded paths joined: building it peaked at +531 MB
        # for ImageNet's 1.28 M paths, twice what it keeps
        paths, ends = bytearray(), np.empty(len(pairs), dtype=np.int64)
        for i, (path, _) in enumerate(pairs):
            paths += os.fsencode(path)
            ends[i] = len(paths)
        self._offsets = np.concatenate([np.zeros(1, dtype=np.int64), ends])
        self._paths = np.frombuffer(paths, dtype=np.uint8)
        self._labels = np.fromiter((label for _, label in pairs), dtype=np.int64,
                                   count=len(pairs))

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]  # negative indices; IndexError past the end
        start, end = self._offsets[index], self._offsets[index + 1]
        return os.fsdecode(self._paths[start:end].tobytes()), int(self._labels[index])

    def __iter__(self):
        paths, offsets = self._paths.tobytes(), self._offsets.tolist()
        for i, label in enumerate(self._labels.tolist()):
            yield os.fsdecode(paths[offsets[i]:offsets[i + 1]]), label

    def labels(self) -> list[int]:
        return self._labels.tolist()


class ImageFolderDataset(Dataset):
    """Files under `root/<class>/...` decoded to uint8 RGB tensors (C, H, W).

    The files are those `folder_files` lists. A file that cannot be read or decoded yields a
    `SkippedSample` instead of raising, so the loader drops it from its batch and reports it
    once; empty class folders are allowed.

    Raises:
        DatasetError: `root` is missing, cannot be listed, or holds no class folder or no image.
    """

    def __init__(self, root: Path, transform: Callable | None = None,
                 class_to_idx: dict[str, int] | None = None) -> None:
        if not root.is_dir():
            raise DatasetError(f"{root}: directory not found")
        try:
            classes, found = find_classes(str(root)) if class_to_idx is None else (
                sorted(class_to_idx, key=class_to_idx.get), class_to_idx)
        except FileNotFoundError:  # find_classes' word for a folder without subfolders
            raise DatasetError(f"{root}: no class folders (images go in {root}/<class>/)"
                               ) from None
        except OSError as e:
            raise DatasetError(f"{root}: cannot list the folder ({e.strerror})") from None
        self.classes, self.class_to_idx = classes, found
        self.special_files: list[str] = []  # image paths that are no regular file
        self.samples = SampleList(folder_files(root, found, self.special_files)[0])
        if not self.samples:
            if not any((root / name).is_dir() for name in found):  # e.g. ImageNet's flat val
                raise DatasetError(f"{root}: no class folders (images go in {root}/<class>/, "
                                   f"one folder per class of train/)")
            raise DatasetError(f"{root}: no image files found")
        self.targets = self.samples.labels()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | SkippedSample:
        path, target = self.samples[index]
        try:
            image = read_image(path)  # (C, H, W) uint8
        except (OSError, ValueError) as e:
            return SkippedSample(path, str(e))
        if self.transform is not None:
            image = self.transform(image)
        return image, target

    def read_box(self, index: int, choose_box: BoxChooser, min_size: tuple[int, int] | None,
                 region_decode: bool = True) -> tuple[torch.Tensor, int] | SkippedSample:
        """Sample `index` cropped to `choose_box(height, width)` at decode time
        (`read_image_box`), without `transform`; unreadable files as in __getitem__."""
        path, target = self.samples[index]
        try:
            return read_image_box(path, choose_box, min_size, region_decode), target
        except (OSError, ValueError) as e:
            return SkippedSample(path, str(e))


class TensorImageDataset(Dataset):
    """In-memory uint8 images (N, H, W, C) with integer labels (CIFAR-10)."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], classes: list[str],
                 transform: Callable | None = None) -> None:
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)  # (N, C, H, W) view
        self.targets = list(labels)
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a CIFAR file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, classes: Sequence[str]) -> tuple[np.ndarray, list[int]]:
    """One batch file: images (N, 32, 32, 3) and labels, each an index into `classes`."""
    if not path.is_file():
        raise DatasetError(f"{path}: missing (CIFAR-10 has data_batch_1 to data_batch_5 and "
                           f"test_batch)")
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
        data = np.asarray(entry["data"])
        labels = [int(v) for v in entry.get("labels", entry.get("fine_labels"))]
    except (OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as e:
        raise DatasetError(f"{path}: not a CIFAR-10 batch file ({e})") from None
    # Rows of 3,072 bytes (3 planes of 32x32): any other shape would be reshaped into
    # images silently scrambled.
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: data has shape {tuple(data.shape)}, not (images, 3072)")
    # A cast would keep the shape but not the pixels: floats in [0, 1] become 0 and 1, wider
    # ints wrap around.
    if data.dtype != np.uint8:
        raise DatasetError(f"{path}: data has dtype {data.dtype}, not uint8 (bytes 0-255)")
    if len(labels) != len(data):
        raise DatasetError(f"{path}: {len(data)} images but {len(labels)} labels")
    # An out-of-range label would fail the loss with an IndexError mid-training.
    bad = next((label for label in labels if not 0 <= label < len(classes)), None)
    if bad is not None:
        raise DatasetError(f"{path}: label {bad} is not one of the {len(classes)} classes "
                           f"(0 to {len(classes) - 1})")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # (N, H, W, C)


def _read_cifar_classes(meta_path: Path) -> list[str]:
    """The class names of `batches.meta` (its `label_names`); "0" to "9" without the file."""
    if not meta_path.is_file():
        return [str(i) for i in range(10)]
    try:
        with open(meta_path, "rb") as f:
            names = _ArrayUnpickler(f, encoding="latin1").load()["label_names"]
    except (OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as e:
        why = f"no {e}" if isinstance(e, KeyError) else str(e)
        raise DatasetError(f"{meta_path}: not a CIFAR-10 meta file ({why})") from None
    if (not isinstance(names, (list, tuple)) or not names
            or not all(isinstance(n, str) for n in names)):
        raise DatasetError(f"{meta_path}: label_names is not a list of class names")
    return list(names)


class _NotFetched(Exception):
    """The CIFAR-10 download got no data (no network, a refused or reset connection)."""

    def __init__(self, reason: object) -> None:
        super().__init__(reason)
        self.reason = reason


def load_cifar10(root: Path, train: bool, download: bool) -> TensorImageDataset:
    """CIFAR-10 in torchvision's on-disk format (`root/cifar-10-batches-py/`), downloading it
    (with an MD5 check) when missing and `download` is set."""
    folder = root / CIFAR10_DIR
    if not folder.is_dir():
        if not download:
            raise DatasetError(f"{folder}: CIFAR-10 not found and data.download is false")
        from torchvision.datasets.utils import download_and_extract_archive

        def fetch(tmp: Path) -> None:
            try:
                download_and_extract_archive(CIFAR10_URL, str(tmp), md5=CIFAR10_MD5,
                                             remove_finished=True)
            except OSError as e:
                if e.filename is None:  # URLError, a reset connection, a timeout: no write
                    raise _NotFetched(getattr(e, "reason", None) or e) from None
                raise

        made = [p for p in (root, *root.parents) if not p.exists()]
        try:
            _publish_dir(fetch, root / ".download")
        except Exception as e:  # network errors come in many types; all mean the same here
            for folder in made:  # an empty data folder was all it left (from --dry-run too)
                try:
                    folder.rmdir()
                except OSError:
                    break
            why = (f"no answer from {CIFAR10_URL}: {e.reason}" if isinstance(e, _NotFetched)
                   else f"{type(e).__name__}: {e}")
            raise DatasetError(f"cannot download CIFAR-10 to {root} ({why}); place "
                               f"{CIFAR10_DIR}/ there by hand") from None
        _publish_dir(lambda tmp: shutil.copytree(root / ".download" / CIFAR10_DIR, tmp), folder)
        shutil.rmtree(root / ".download", ignore_errors=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    classes = _read_cifar_classes(folder / "batches.meta")
    parts = [_read_cifar_batch(folder / n, classes) for n in names]
    return TensorImageDataset(np.concatenate([p[0] for p in parts]),
                              [l for p in parts for l in p[1]], classes)


def write_cifar10(root: Path, images: np.ndarray, labels: Sequence[int], per_batch: int) -> Path:
    """Write uint8 images (N, 32, 32, 3) in CIFAR-10's python format (5 train batches of
    `per_batch` images, then one test batch). Used by tests and to convert small sets."""
    folder = root / CIFAR10_DIR
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        sl = slice(i * per_batch, (i + 1) * per_batch)
        entry = {"batch_label": name, "labels": [int(v) for v in labels[sl]],
                 "data": np.ascontiguousarray(images[sl].transpose(0, 3, 1, 2)).reshape(-1, 3072),
                 "filenames": [f"{name}_{j}.png" for j in range(len(labels[sl]))]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)  # the protocol of the published files
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                     "frog", "horse", "ship", "truck"]}, f, protocol=2)
    return folder
