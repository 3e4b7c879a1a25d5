"""Scan an image data set for files a long run would trip on, before the run."""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torchvision.datasets.folder import find_classes

from ..config import MAX_WORKERS
from ..errors import DatasetError, UserError
from ..measure.env import usable_cores
from . import jpeg
from .datasets import (CIFAR10_DIR, _decode_whole, broken_links, folder_files, load_cifar10,
                       loose_images, read_encoded)


@dataclass
class ScanReport:
    root: Path
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> n
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, what is wrong)
    ignored: list[str] = field(default_factory=list)  # files without an image extension
    # (path, libjpeg's warning): JPEGs that decode past damage, into damaged pixels
    warnings: list[tuple[str, str]] = field(default_factory=list)
    images: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_file(path: str) -> tuple[str, str | None, str | None]:
    """(path, why it is unreadable or None, libjpeg's warning or None)."""
    try:
        raw = read_encoded(path)
        image = _decode_whole(raw)  # what read_image does, keeping the bytes for the check
        if min(image.shape[1:]) < 1:
            return path, "decodes to an empty image", None
        # torchvision prints libjpeg's warning without the file's name, the region decoder
        # drops it: either way the run trains on the damaged pixels
        warning = jpeg.decode_warning(raw) if jpeg.AVAILABLE and jpeg.is_jpeg(raw) else None
    except (OSError, ValueError) as e:
        return path, str(e), None
    return path, None, warning


def _silence_stderr() -> None:
    """A decoding worker's stderr goes nowhere: libjpeg, through torchvision, prints its
    warnings there without the file's name ("Corrupt JPEG data: ..."), a line the report
    already gives with the name; the workers' errors reach the report as return values."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def scan(root: Path, workers: int = 0, progress: Callable[[int, int], None] | None = None
         ) -> ScanReport:
    """Decode every image under `root` (ImageFolder layout, with or without train/ and val/)
    in `workers` processes (0 = one per core) and report unreadable files (broken symbolic
    links included), empty class folders, images outside every class folder, hidden folders
    taken as classes, files that are not images, JPEGs libjpeg decodes past damage with a
    warning (`warnings`: not problems, such files train, on damaged pixels), the class counts, and
    what training refuses at start: a missing train/ or val/ beside the other, validation
    classes that train/ lacks.
    The files are the ones the loaders list (`datasets.folder_files`: symbolic links to
    folders followed), decoded by the loaders' `read_image`. A CIFAR-10 folder (`root` holding
    `cifar-10-batches-py/`, as `data.path` of `data.dataset=cifar10` does, or that folder
    itself) is read as training reads it instead (`_scan_cifar10`).

    Raises:
        DatasetError: `root` is not a directory, or a split folder cannot be listed.
        UserError: `workers` is negative.
    """
    if workers < 0 or workers > MAX_WORKERS:
        raise UserError(f"--workers={workers}: must be 0 (one per core) to {MAX_WORKERS}")
    if not root.is_dir():
        raise DatasetError(f"{root}: " + ("not a directory" if root.exists()
                                          else "directory not found"))
    cifar = _cifar_root(root)
    if cifar is not None:
        return _scan_cifar10(root, cifar, progress)
    splits = [d for d in (root / "train", root / "val") if d.is_dir()] or [root]
    report = ScanReport(root)
    files: list[str] = []
    for split in splits:
        try:
            classes, class_to_idx = find_classes(str(split))
        except FileNotFoundError:  # find_classes' word for a folder without class folders
            report.class_counts[split.name] = {}
            report.problems.append((str(split), "no class folders"))
            continue
        except OSError as e:
            raise DatasetError(f"{split}: cannot list the folder ({e.strerror})") from None
        # a half-sorted split: these images are silently left out of training
        report.problems += [(path, "image outside every class folder: the loaders never read "
                             "it (move it into its class folder)")
                            for path in loose_images(split)]
        report.problems += [(path, f"broken link (to {target}): not read, as a class folder or "
                             f"an image; mount or restore its target, or remove it")
                            for path, target in broken_links(split)]
        images, others = folder_files(split, class_to_idx)
        files += [path for path, _ in images]
        report.ignored += others
        per_class = Counter(target for _, target in images)
        report.class_counts[split.name] = {cls: per_class[class_to_idx[cls]] for cls in classes}
        report.problems += [(str(split / cls), "empty class folder") for cls in classes
                            if not per_class[class_to_idx[cls]]]
        # torchvision's ImageFolder (and so the loaders) takes them as classes, sorted first
        report.problems += [(str(split / cls), "hidden folder taken as a class: remove it if "
                             "it is not one (it shifts every other class's label)")
                            for cls in classes if cls.startswith(".")]
    report.images = len(files)
    # What the loaders refuse at start (loader._datasets): reported here with the rest.
    # Only for the ImageNet layout: a folder of class folders (DIR/train itself, whose name
    # is "train") is one split checked on its own, with no partner to miss.
    counts = report.class_counts if splits != [root] else {}
    if "train" in counts and "val" not in counts:
        report.problems.append((str(root / "val"), "folder missing (training reads train/ and "
                                                   "val/)"))
    elif "val" in counts and "train" not in counts:
        report.problems.append((str(root / "train"), "folder missing (training reads train/ "
                                                     "and val/)"))
    elif "train" in counts:
        extra = sorted(set(counts["val"]) - set(counts["train"]))
        if extra:
            report.problems.append((str(root / "val"), f"{len(extra)} class folder"
                                    f"{'s' if len(extra) > 1 else ''} not in train/, which "
                                    f"training refuses: {', '.join(extra[:5])}"
                                    f"{', ...' if len(extra) > 5 else ''}"))
    # More processes than files only costs their start-up.
    with ProcessPoolExecutor(max_workers=max(1, min(workers or usable_cores(), len(files))),
                             initializer=_silence_stderr) as pool:
        for done, (path, problem, warning) in enumerate(pool.map(_check_file, files,
                                                                 chunksize=64), 1):
            if problem:
                report.problems.append((path, problem))
            if warning:
                report.warnings.append((path, warning))
            if progress:
                progress(done, len(files))
    return report


def _cifar_root(root: Path) -> Path | None:
    """The `data.path` of a CIFAR-10 folder `root` is or holds, else None."""
    if (root / CIFAR10_DIR).is_dir():
        return root
    if root.name == CIFAR10_DIR and any((root / n).exists() for n in ("data_batch_1",
                                                                       "test_batch")):
        return root.parent
    return None


def _scan_cifar10(root: Path, cifar: Path, progress: Callable[[int, int], None] | None
                  ) -> ScanReport:
    """CIFAR-10's batch files read as `data.dataset=cifar10` reads them (`load_cifar10`):
    class counts of train (data_batch_1 to 5) and val (test_batch); a file training would
    refuse (missing, not a batch, wrong shape or dtype, a label outside the classes) is a
    problem naming it, where the image-folder scan saw one empty "class" and ignored files."""
    report = ScanReport(root)
    for done, (split, train) in enumerate((("train", True), ("val", False)), 1):
        try:
            dataset = load_cifar10(cifar, train=train, download=False)
        except DatasetError as e:
            problem = tuple(str(e).partition(": ")[::2])
            if problem not in report.problems:  # batches.meta is read for both splits
                report.problems.append(problem)
            report.class_counts[split] = {}
        else:
            per_class = Counter(dataset.targets)
            report.class_counts[split] = {name: per_class[i]
                                          for i, name in enumerate(dataset.classes)}
            report.images += len(dataset)
            report.problems += [(str(cifar / CIFAR10_DIR), f"{split}: class {name!r} has no "
                                 f"images") for name, n in report.class_counts[split].items()
                                if not n]
        if progress:
            progress(done, 2)
    return report
