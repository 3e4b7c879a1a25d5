"""Published structured-pruning results and the ThinResNet reference counts (package data).

`data/pruning_literature.csv` holds one row per published operating point (ResNet-50 on
ImageNet, ResNet-56 on CIFAR-10): method, venue, baseline and pruned top-1 (%), and whichever of
pruned GMACs, MAC reduction (%) and speed-up (= base MACs / pruned MACs) the source reports,
pruned parameters (M), the source and notes. `data/thinresnet_counts.csv` holds the exact
params and conv+fc MACs of uniformly thinned ResNets (copies of ../shared/reference).
Adding a result is adding a CSV row; `load_literature` validates every row and fills what can
be derived:

- MACs: the stated GMACs; else base MACs x (1 - reduction); else base MACs / speed-up.
- MAC reduction (%): the stated one (relative to the paper's own baseline); else from the stated
  GMACs against the base MACs; else 1 - 1 / speed-up.
- speed-up: the stated one; else 1 / (1 - reduction); else base MACs / GMACs.
- Δ top-1 = pruned - baseline top-1, when the baseline is stated.

"Base MACs" is the unpruned network at width 1.0 from `thinresnet_counts.csv` (ResNet-50:
4,089,184,256; ResNet-56: 125,485,696). Where a row states two or three MAC figures that disagree
by more than `tolerance` (1 %), a warning names the row; the stated GMACs stay the MAC-axis
position and the stated reduction the Δ-view position. Malformed rows raise `LiteratureError`
naming the file, line and column.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

DATA = Path(__file__).resolve().parent / "data"
LITERATURE_CSV = DATA / "pruning_literature.csv"
COUNTS_CSV = DATA / "thinresnet_counts.csv"
COLUMNS = ("benchmark", "method", "venue", "base_top1", "pruned_top1", "pruned_gmacs",
           "macs_reduction_pct", "speedup", "pruned_params_m", "source", "note")
MISMATCH_TOLERANCE = 0.01


class CompareError(UserError, ValueError):
    """Bad comparison input: unknown benchmark, unusable run directory or points file."""


class LiteratureError(CompareError):
    """A literature CSV row is malformed (the message names file, line and column)."""


@dataclass(frozen=True)
class Benchmark:
    """A task of the pruning literature and its unpruned network.

    Attributes:
        name: e.g. "resnet50-imagenet".
        title: e.g. "ResNet-50 on ImageNet".
        model: the fasttrain model it uses ("thin_resnet50").
        dataset: "imagenet" | "cifar10".
        resolution: input size the MACs are counted at.
        base_macs / base_params: the unpruned network (width 1.0) from thinresnet_counts.csv.
    """

    name: str
    title: str
    model: str
    dataset: str
    resolution: int
    base_macs: int
    base_params: int


_BENCHMARKS = {"resnet50-imagenet": ("ResNet-50 on ImageNet", "thin_resnet50"),
               "resnet56-cifar10": ("ResNet-56 on CIFAR-10", "cifar_resnet56")}


@dataclass(frozen=True)
class ThinCount:
    """One row of thinresnet_counts.csv."""

    model: str
    dataset: str
    width: float
    base_width: int
    resolution: int
    num_classes: int
    params: int
    macs: int


def thin_counts(model: str | None = None) -> list[ThinCount]:
    """Rows of thinresnet_counts.csv (of `model` only when given), ordered by width."""
    with open(COUNTS_CSV, newline="") as f:
        rows = [ThinCount(r["model"], r["dataset"], float(r["width"]), int(r["base_width"]),
                          int(r["resolution"]), int(r["num_classes"]), int(r["params"]),
                          int(r["macs"])) for r in csv.DictReader(f)]
    rows = [r for r in rows if model is None or r.model == model]
    return sorted(rows, key=lambda r: (r.model, r.width))


def benchmark_names() -> list[str]:
    return sorted(_BENCHMARKS)


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called `name`.

    Raises:
        CompareError: unknown name (the message lists the known ones).
    """
    if name not in _BENCHMARKS:
        raise CompareError(f"unknown benchmark {name!r}; known: {', '.join(benchmark_names())}")
    title, model = _BENCHMARKS[name]
    (full,) = [r for r in thin_counts(model) if r.width == 1.0]
    return Benchmark(name, title, model, full.dataset, full.resolution, full.macs, full.params)


@dataclass(frozen=True)
class LiteraturePoint:
    """One published operating point, derived columns filled (see module doc).

    Attributes:
        line: its line in the CSV (header = line 1).
        macs: conv+fc MACs per image of the pruned network, None when the source gives no MAC
            figure. params: parameters, None when not reported.
        stated: which of "gmacs", "reduction", "speedup" the source states.
        derived: names of the fields this loader computed.
    """

    line: int
    benchmark: str
    method: str
    venue: str
    base_top1: float | None
    top1: float
    macs: int | None
    macs_reduction_pct: float | None
    speedup: float | None
    params: int | None
    delta_top1: float | None
    source: str
    note: str
    stated: tuple[str, ...]
    derived: tuple[str, ...]


@dataclass
class Literature:
    """Validated literature points and the loader's warnings (one line each)."""

    points: list[LiteraturePoint]
    warnings: list[str] = field(default_factory=list)
    path: Path = LITERATURE_CSV


def _shown(path: Path) -> str:
    """`path` as messages show it: relative to the project for the package's own file."""
    try:
        return str(path.resolve().relative_to(DATA.parents[2]))
    except ValueError:
        return str(path)


def _number(text: str, where: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = True, high_open: bool = False) -> float | None:
    """The cell as a float (None when empty), within (low, high] by default."""
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise LiteratureError(f"{where}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise LiteratureError(f"{where}: expected a finite number, got {text!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise LiteratureError(f"{where}: must be {'>' if low_open else '>='} {low:g}, "
                              f"got {text}")
    if high is not None and (value >= high if high_open else value > high):
        raise LiteratureError(f"{where}: must be {'<' if high_open else '<='} {high:g}, "
                              f"got {text}")
    return value


def _parse_row(row: dict[str, str], line: int, path: Path, tolerance: float
               ) -> tuple[LiteraturePoint, list[str]]:
    shown = _shown(path)

    def where(col: str) -> str:
        return f"{shown}:{line}: column {col}"

    for col in ("benchmark", "method", "venue", "pruned_top1", "source"):
        if not (row.get(col) or "").strip():
            raise LiteratureError(f"{where(col)}: required, but empty")
    name = row["benchmark"].strip()
    if name not in _BENCHMARKS:
        raise LiteratureError(f"{where('benchmark')}: unknown benchmark {name!r}; known: "
                              f"{', '.join(benchmark_names())}")
    bench = get_benchmark(name)
    base_top1 = _number(row["base_top1"], where("base_top1"), low=0, high=100)
    top1 = _number(row["pruned_top1"], where("pruned_top1"), low=0, high=100)
    gmacs = _number(row["pruned_gmacs"], where("pruned_gmacs"), low=0,
                    high=bench.base_macs / 1e9, high_open=True)
    reduction = _number(row["macs_reduction_pct"], where("macs_reduction_pct"), low=0,
                        high=100, high_open=True)
    speedup = _number(row["speedup"], where("speedup"), low=1)
    params_m = _number(row["pruned_params_m"], where("pruned_params_m"), low=0,
                       high=bench.base_params / 1e6, high_open=True)
    base = bench.base_macs
    stated = tuple(k for k, v in (("gmacs", gmacs), ("reduction", reduction),
                                  ("speedup", speedup)) if v is not None)
    derived = []
    # MACs each stated figure implies, for the consistency check and the derivations.
    implied = {}
    if gmacs is not None:
        implied["pruned_gmacs"] = gmacs * 1e9
    if reduction is not None:
        implied["macs_reduction_pct"] = base * (1 - reduction / 100)
    if speedup is not None:
        implied["speedup"] = base / speedup
    warnings = []
    items = list(implied.items())
    for i, (col_a, a) in enumerate(items):
        for col_b, b in items[i + 1:]:
            if abs(a / b - 1) > tolerance:
                warnings.append(
                    f"{shown}:{line}: {name} {row['method'].strip()}: {col_a}={row[col_a].strip()}"
                    f" and {col_b}={row[col_b].strip()} disagree: they imply {a / 1e9:.4g} G and "
                    f"{b / 1e9:.4g} G MACs ({a / b - 1:+.1%}, base {base / 1e9:.4g} G); the "
                    f"stated GMACs stay the MAC position, the stated reduction the Δ position")
    macs = None
    if gmacs is not None:
        macs = round(gmacs * 1e9)
    elif implied:  # a stated reduction, else a stated speed-up
        macs = round(implied.get("macs_reduction_pct", implied.get("speedup")))
        derived.append("macs")
    else:
        warnings.append(f"{shown}:{line}: {name} {row['method'].strip()}: no MAC figure "
                        f"(pruned_gmacs, macs_reduction_pct or speedup); left off the MAC axes")
    if reduction is None and macs is not None:
        reduction = (100 * (1 - gmacs * 1e9 / base) if gmacs is not None
                     else 100 * (1 - 1 / speedup))
        derived.append("macs_reduction_pct")
    if speedup is None and macs is not None:
        speedup = (1 / (1 - reduction / 100) if "reduction" in stated
                   else base / (gmacs * 1e9))
        derived.append("speedup")
    delta = None
    if base_top1 is not None:
        delta = round(top1 - base_top1, 6)  # the inputs have 2 decimals: drop float noise
        derived.append("delta_top1")
    point = LiteraturePoint(
        line=line, benchmark=name, method=row["method"].strip(), venue=row["venue"].strip(),
        base_top1=base_top1, top1=top1, macs=macs, macs_reduction_pct=reduction,
        speedup=speedup, params=None if params_m is None else round(params_m * 1e6),
        delta_top1=delta, source=row["source"].strip(), note=(row.get("note") or "").strip(),
        stated=stated, derived=tuple(derived))
    return point, warnings


def load_literature(path: str | Path = LITERATURE_CSV, benchmark: str | None = None,
                    tolerance: float = MISMATCH_TOLERANCE) -> Literature:
    """Read, validate and complete the literature CSV (module doc).

    Args:
        benchmark: keep only this benchmark's rows (all rows are validated either way).
        tolerance: relative disagreement between stated MAC figures that gives a warning.

    Raises:
        CompareError: unknown `benchmark`. LiteratureError: a missing file, a wrong header or
            a malformed row (file, line, column).
    """
    if benchmark is not None:
        get_benchmark(benchmark)
    path = Path(path)
    try:
        f = open(path, newline="")
    except OSError as e:
        raise LiteratureError(f"{path}: cannot read literature CSV ({e.strerror})") from None
    with f:
        reader = csv.DictReader(f)
        header = tuple(reader.fieldnames or ())
        missing = [c for c in COLUMNS if c not in header]
        unknown = [c for c in header if c not in COLUMNS]
        if missing or unknown:
            raise LiteratureError(f"{_shown(path)}:1: header must be {','.join(COLUMNS)}"
                                  + (f"; missing {', '.join(missing)}" if missing else "")
                                  + (f"; unknown {', '.join(unknown)}" if unknown else ""))
        points, warnings = [], []
        for row in reader:
            line = reader.line_num
            if None in row:
                raise LiteratureError(f"{_shown(path)}:{line}: more cells than the {len(COLUMNS)} "
                                      f"columns of the header")
            if not any((v or "").strip() for v in row.values()):
                continue  # a blank line
            point, row_warnings = _parse_row(row, line, path, tolerance)
            if benchmark is None or point.benchmark == benchmark:
                points.append(point)
                warnings += row_warnings
    return Literature(points, warnings, path)
