"""Scan an image data set for files a long run would trip on, before the run."""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import DatasetError, UserError
from .datasets import read_image


@dataclass
class ScanReport:
    root: Path
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> n
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, what is wrong)
    ignored: list[str] = field(default_factory=list)  # files without an image extension
    images: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_file(path: str) -> tuple[str, str | None]:
    try:
        image = read_image(path)
        if min(image.shape[1:]) < 1:
            return path, "decodes to an empty image"
    except (OSError, ValueError) as e:
        return path, str(e)
    return path, None


def scan(root: Path, workers: int = 0, progress: Callable[[int, int], None] | None = None
         ) -> ScanReport:
    """Decode every image under `root` (ImageFolder layout, with or without train/ and val/)
    in `workers` processes (0 = one per core) and report unreadable files, empty class
    folders, files that are not images, and the class counts.

    Raises:
        DatasetError: `root` is not a directory.
        UserError: `workers` is negative.
    """
    if workers < 0:
        raise UserError(f"--workers={workers}: must be 0 (one per core) or more")
    if not root.is_dir():
        raise DatasetError(f"{root}: " + ("not a directory" if root.exists()
                                          else "directory not found"))
    splits = [d for d in (root / "train", root / "val") if d.is_dir()] or [root]
    report = ScanReport(root)
    files: list[str] = []
    for split in splits:
        counts: Counter = Counter()
        for cls in sorted(d for d in split.iterdir() if d.is_dir()):
            n = 0
            for f in sorted(p for p in cls.rglob("*") if p.is_file()):
                if f.suffix.lower() in IMG_EXTENSIONS:
                    files.append(str(f))
                    n += 1
                else:
                    report.ignored.append(str(f))
            counts[cls.name] = n
            if n == 0:
                report.problems.append((str(cls), "empty class folder"))
        report.class_counts[split.name] = dict(counts)
        if not counts:
            report.problems.append((str(split), "no class folders"))
    report.images = len(files)
    with ProcessPoolExecutor(max_workers=workers or None) as pool:
        for done, (path, problem) in enumerate(pool.map(_check_file, files, chunksize=64), 1):
            if problem:
                report.problems.append((path, problem))
            if progress:
                progress(done, len(files))
    return report
