"""What a comparison plots: points from run directories, user CSV files and the literature, with
latency measured by tools/benchmark.py attached.

A `Point` is one network: its top-1, conv+fc MACs and parameters, where it comes from (`origin`:
"measured here" for run directories of this project, "user-provided" for a CSV file,
"published" for the literature) and its kind ("thin": a uniformly thin ResNet, these make the
Pareto curve; "pruned"; "literature"; "other"). Its own baseline (`base_top1`, `base_macs`) gives
the Δ-accuracy / MAC-reduction view: a pruned run's baseline is the checkpoint it was pruned
from, a thin point's is the widest thin run of the same model, a literature point's is the
paper's.
"""
from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import ConfigError
from .literature import Benchmark, CompareError, LiteraturePoint

THIN, PRUNED, LITERATURE, OTHER = "thin", "pruned", "literature", "other"
MEASURED, USER, PUBLISHED = "measured here", "user-provided", "published"


def _shown(text: str) -> str:
    """`text` with the undecodable bytes of a non-UTF-8 file name escaped (`caf\\udce9`), as
    the tools print it: plot labels, the CSV and the Markdown table cannot hold surrogates."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class Point:
    """One network in a comparison (see module doc).

    Attributes:
        top1: validation top-1 (%); for run directories the last complete epoch's `val_top1`.
        macs: conv+fc MACs per image at `resolution` (fvcore; the literature's "FLOPs").
        reduction_pct: MAC reduction vs its own baseline as stated (literature); else derived
            from `base_macs` (see `mac_reduction`).
        latency_ms: p50 latency of one batch from a tools/benchmark.py result file.
    """

    label: str
    kind: str
    origin: str
    top1: float
    macs: int | None
    params: int | None = None
    model: str | None = None
    width: float | None = None
    resolution: int | None = None
    base_top1: float | None = None
    base_macs: int | None = None
    reduction_pct: float | None = None
    latency_ms: float | None = None
    method: str | None = None
    source: str = ""
    dataset: str | None = None  # a run's data.dataset (unknown for points files)

    @property
    def delta_top1(self) -> float | None:
        """top1 - base_top1 without the difference's float noise (93.26 - 90.72 gave
        -2.5400000000000063 in the table's CSV): rounded to 10 decimals, which keeps every digit
        a measured top-1 (a fraction of the validation images) carries in practice."""
        return None if self.base_top1 is None else round(self.top1 - self.base_top1, 10)

    @property
    def mac_reduction(self) -> float | None:
        """MAC reduction (%) relative to the point's own baseline."""
        if self.reduction_pct is not None:
            return self.reduction_pct
        if self.base_macs and self.macs:
            return 100 * (1 - self.macs / self.base_macs)
        return None


# --------------------------------------------------------------------------- literature

def literature_points(points: Iterable[LiteraturePoint], model: str | None = None
                      ) -> list[Point]:
    """Published operating points as comparison points (rows without MACs stay out of the MAC
    axes but keep their place in the table). `model`: the benchmark's network (its fasttrain
    model, option-A shortcuts for the CIFAR ResNets, as the literature's), whose thin curve
    they are set against when the comparison has one."""
    return [Point(label=f"{p.method} ({p.venue})", kind=LITERATURE, origin=PUBLISHED, top1=p.top1,
                  macs=p.macs, params=p.params, base_top1=p.base_top1,
                  reduction_pct=p.macs_reduction_pct, method=p.method, model=model,
                  source=f"{p.source} (line {p.line})") for p in points]


# --------------------------------------------------------------------------- run directories

def _not_utf8(path: Path, e: UnicodeDecodeError) -> CompareError:
    return CompareError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                        f"{e.start})")


def _last_metrics(run: Path, warnings: list[str] | None = None) -> dict[str, Any]:
    """The last complete epoch's metrics line; a last line of an epoch cut inside
    (`train.max_steps`: it holds `epoch_step`) is passed over with a warning (taken, with one,
    when it is the only line), and so is a last line cut short (no newline, no JSON: a write
    that a crash or a full disk stopped, which `--resume auto` trims)."""
    path = run / "metrics.jsonl"
    try:
        text = path.read_text()
    except OSError:
        raise CompareError(f"{run}: no metrics.jsonl (has the run finished an epoch?)") from None
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    lines = [l for l in text.splitlines() if l.strip()]
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
            if warnings is not None:
                warnings.append(f"{path}: its last line is cut short (a write stopped by a "
                                f"crash or a full disk): passed over")
    if not lines:
        raise CompareError(f"{path}: no finished epoch")
    number = len(lines)
    try:
        last = json.loads(lines[-1])
        if isinstance(last, dict) and last.get("epoch_step"):
            cut = (f"{run}: epoch {last.get('epoch')} was cut after {last['epoch_step']} "
                   f"steps (train.max_steps): ")
            if number > 1:
                number -= 1
                last = json.loads(lines[-2])
            if warnings is not None:
                warnings.append(cut + ("the last complete epoch's top-1 is used" if number <
                                       len(lines) else "its partial epoch's top-1 is all there is"))
        top1 = float(last["val_top1"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CompareError(f"{path}:{number}: not a metrics line with val_top1") from None
    if not 0 <= top1 <= 100:  # NaN too (a hand-edited line): it was plotted as the thin curve
        raise CompareError(f"{path}:{number}: val_top1 must be a percentage in [0, 100], got "
                           f"{top1}")
    return {**last, "val_top1": top1}


def _lineage(state: dict[str, Any]) -> dict[str, Any] | None:
    """The pruning a checkpoint's weights come from: its own record (tools/prune.py wrote it)
    or, for a network fine-tuned from a pruned one, the summary its checkpoints carry."""
    for key in ("pruning", "pruned_from"):
        if isinstance(state.get(key), dict):
            return state[key]
    return None


def _pruning_record(init_from: str, run: Path, warnings: list[str],
                    macs: int | None = None,
                    channels: dict | None = None) -> dict[str, Any] | None:
    """The pruning the run's network comes from: the summary the run's own checkpoints carry
    (`pruned_from`, written by this version's trainer), else the `pruning` entry of the
    checkpoint `init_from` names (tools/prune.py writes it).

    `init_from` is absolute in the config.yaml of runs trained by this version; when a project
    folder was moved or copied it no longer exists there, and its trailing parts are looked
    for from the current folder and from the run's parent folders. A file found any way counts
    only when its network's channel spec is the run's (`channels`), or, for a file without
    one, when its record's pruned MACs are the run's (`macs`): a relative path (older versions)
    taken from the current folder, or a file pruned again since, gave another network's
    baseline without a word."""
    from ..engine import checkpoint as ckpt
    from ..errors import CheckpointError

    for name in ("last.pt", "best.pt"):
        try:  # mmap: only the pickled dicts are read, not a ResNet-50's weights
            own = _lineage(ckpt.load(run / "checkpoints" / name, mmap=True))
        except CheckpointError:
            continue
        if isinstance(own, dict):
            return own
    path = Path(init_from)
    candidates = [path] if path.is_absolute() else [path, run.parent / path, run / path]
    if path.is_absolute() and not path.is_file() and macs is not None:  # a moved project
        tails = [Path(*path.parts[-k:]) for k in range(1, len(path.parts))]
        candidates += [base / tail for tail in tails
                       for base in (Path.cwd(), *run.resolve().parents)]
    problem = None
    for c in candidates:
        if not c.is_file():
            continue
        try:
            state = ckpt.load(c)
            record = _lineage(state)
        except CheckpointError as e:
            problem = problem or f"{run}: {e}"
            continue
        if not isinstance(record, dict):
            problem = problem or (f"{run}: {c} has no pruning record (not written by "
                                  f"tools/prune.py)")
            continue
        spec = ((state.get("config") or {}).get("model") or {}).get("channels")
        if channels is not None and spec is not None:
            # (not the MACs: a run fine-tuned at another resolution than the pruning's counts
            # other MACs for the same network)
            if spec != channels:
                problem = problem or (
                    f"{run}: model.init_from {init_from} found as {c}, but its pruned network's "
                    f"channels are not the run's: not the file the run was fine-tuned from "
                    f"(pruned again since?), so its baseline is unknown and it is left out of "
                    f"the Δ view")
                continue
        elif macs is not None and record.get("macs") not in (None, macs):
            problem = problem or (
                f"{run}: model.init_from {init_from} found as {c}, but its pruned network has "
                f"{record['macs']:,} MACs and the run's {macs:,}: not the file the run was "
                f"fine-tuned from (pruned again since?), so its baseline is unknown and it is "
                f"left out of the Δ view")
            continue
        return record
    warnings.append(problem or f"{run}: model.init_from {init_from} not found: its baseline "
                               f"(the network it was pruned from) is unknown, so it is left "
                               f"out of the Δ view")
    return None


# (model section without init_from, resolution) -> (conv+fc MACs, params). A sweep's runs share
# a few architectures, and counting builds the model and traces it (~0.6 s a ResNet-50 run).
_COUNTS: dict[str, tuple[int, int]] = {}


def _counts(m, res: int) -> tuple[int, int]:
    """(conv+fc MACs at `res`, parameters) of the model section `m`, counted once per
    architecture in a process."""
    from ..engine.loop import build_model
    from ..measure import count_macs, count_params

    key = json.dumps([{**asdict(m), "init_from": ""}, res], sort_keys=True)
    if key not in _COUNTS:
        model = build_model(m, m.num_classes)
        _COUNTS[key] = count_macs(model, res).conv_fc, count_params(model)
    return _COUNTS[key]


def base_macs_at(record: dict[str, Any], model_config: dict[str, Any], res: int,
                 macs: int | None) -> int | None:
    """The pruning source's conv+fc MACs at `res`, where the pruned network (model section
    `model_config`, a dict) counts `macs`. `record` is the pruning summary (tools/prune.py's,
    or the one a fine-tuned network carries): its `source_macs` were counted at the pruning
    resolution, and a network fine-tuned or evaluated at another one set them against its own
    count there (16 px against 32 px: a -100 % MAC reduction). Its `macs` tell: unequal to
    `macs`, the source it names is counted again at `res`; None when that cannot be done."""
    base = record.get("source_macs")
    if macs is None or record.get("macs") in (None, macs):
        return base
    from ..config import ModelConfig

    known = {f for f in ModelConfig.__dataclass_fields__}
    source = {k: v for k, v in model_config.items() if k in known}
    source.update(name=record.get("source_model") or source.get("name"),
                  width=record.get("source_width", source.get("width")),
                  channels=record.get("source_channels"), init_from="")
    try:
        return _counts(ModelConfig(**source), res)[0]
    except Exception:  # a record this version cannot rebuild: no reduction, not a wrong one
        return None


def model_identity(model_config: dict[str, Any]) -> str:
    """The `model` of a point: the registry name, and for a CIFAR ResNet with option-B
    shortcuts (1x1 projections) that too: it is another architecture than option A (the CIFAR
    recipes' and the pruning literature's), with its own thin curve and baselines."""
    name = str(model_config.get("name") or "")
    if name.startswith("cifar_") and model_config.get("shortcut") == "B":
        return f"{name} (shortcut B)"
    return name


def point_from_run(run_dir: str | Path, warnings: list[str] | None = None) -> Point:
    """The point of a fasttrain run directory: its last complete epoch's validation top-1, and
    params and MACs of the model its config.yaml describes, counted at the validation
    resolution. A run short of its schedule's epochs gets a warning.

    A run whose model has an explicit channel spec is "pruned"; its baseline comes from the
    pruned checkpoint named by `model.init_from` (the source checkpoint's top-1 and MACs).

    Raises:
        CompareError: missing directory, config.yaml or finished epoch.
        ConfigError: an invalid config.yaml.
    """
    from .. import config as config_mod

    warnings = [] if warnings is None else warnings
    run = Path(run_dir)
    if not run.is_dir():
        if run.exists():  # a checkpoint given for its run: the run is the folder above it
            raise CompareError(f"{run}: a file, not a run directory (give the folder that "
                               f"holds config.yaml and metrics.jsonl)")
        raise CompareError(f"{run}: run directory not found")
    if not (run / "config.yaml").is_file():
        raise CompareError(f"{run}: no config.yaml (not a fasttrain run directory)")
    cfg = config_mod.load(run / "config.yaml")
    metrics = _last_metrics(run, warnings)
    if isinstance(metrics.get("epoch"), int):
        complete = metrics["epoch"] - bool(metrics.get("epoch_step"))  # a cut epoch is not
        if complete < cfg.schedule.epochs:
            warnings.append(f"{run}: trained {complete} of its {cfg.schedule.epochs} epochs: "
                            f"its top-1 is not its schedule's final one")
    m = cfg.model
    if not m.num_classes:
        raise CompareError(f"{run}/config.yaml: model.num_classes is 0 (the trainer writes the "
                           f"resolved count; was this file edited?)")
    res = cfg.data.val_res
    try:
        macs, params = _counts(m, res)
    except ConfigError as e:  # an unknown model.name: which of the runs said it
        raise ConfigError(f"{run / 'config.yaml'}: {e}") from None
    model = model_identity(asdict(m))
    point = Point(label=f"{model} w{m.width:g}", kind=THIN, origin=MEASURED,
                  top1=metrics["val_top1"], macs=macs,
                  params=params, model=model, width=m.width, resolution=res,
                  source=_shown(str(run)), dataset=cfg.data.dataset)
    if m.channels is not None:
        point.kind, point.width = PRUNED, None
        point.label = f"{model} pruned"
        record = (_pruning_record(m.init_from, run, warnings, point.macs, m.channels)
                  if m.init_from else None)
        if record is not None:
            # pruned again after fine-tuning: "pruned x2", its base the intermediate network
            times, earlier = 1, record.get("source_pruning")
            while isinstance(earlier, dict):
                times, earlier = times + 1, earlier.get("source_pruning")
            point.label = (f"{model} w{record['source_width']:g} pruned"
                           + (f" x{times}" if times > 1 else "")
                           + f" ({record['importance']}, {record['scope']})")
            point.method = f"{record['importance']}, {record['scope']}"
            point.base_top1 = record.get("source_val_top1")
            point.base_macs = base_macs_at(record, asdict(m), res, point.macs)
            if record.get("macs") not in (None, point.macs):
                warnings.append(f"{run}: evaluated at {res} px, another resolution than its "
                                f"pruning's: its source's MACs are counted at {res} px, but "
                                f"the source's top-1 is the one it had at its own, so its Δ "
                                f"top-1 sets accuracies at two resolutions against each other")
    return point


# --------------------------------------------------------------------------- user CSV files

USER_COLUMNS = {"label": str, "top1": float, "macs": float, "kind": str, "params": float,
                "base_top1": float, "base_macs": float, "model": str, "width": float,
                "resolution": float, "note": str}
USER_REQUIRED = ("label", "top1", "macs")
USER_KINDS = (THIN, PRUNED, OTHER)


def points_from_csv(path: str | Path) -> list[Point]:
    """Points trained elsewhere, from a CSV file with a header. Columns: `label`, `top1` (%),
    `macs` (conv+fc MACs per image, e.g. 1.05e9) required; `kind` (thin | pruned | other,
    default other), `params`, `base_top1`, `base_macs` (its own baseline, for the Δ view),
    `model`, `width`, `resolution`, `note` optional. Every point is labelled user-provided.
    The file is UTF-8, with or without the byte-order mark spreadsheet programs write. Counts
    (`macs`, `params`, `base_macs`, `resolution`) are rounded to whole numbers and must be >= 1
    after rounding. Labels name the points in the plots and the table, so one label is used
    once per file.

    Raises:
        CompareError: unreadable or non-UTF-8 file, unknown, missing or repeated column, a
            label used twice (naming both lines), or a bad cell, naming the file, line and
            column.
    """
    path = Path(path)
    try:
        # utf-8-sig: Excel's "CSV UTF-8" starts with a BOM that would otherwise stick to the
        # first column's name
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise CompareError(f"{path}: cannot read points CSV ({e.strerror})") from None
    with f:
        try:
            return _read_points(path, f)
        except UnicodeDecodeError as e:
            raise CompareError(f"{_not_utf8(path, e)}; save it as CSV UTF-8") from None
        except csv.Error as e:
            raise CompareError(f"{path}: not a readable CSV file ({e})") from None


def _read_points(path: Path, f) -> list[Point]:
    points = []
    labels: dict[str, int] = {}  # label -> line it was first used on
    reader = csv.DictReader(f)
    header = list(reader.fieldnames or [])
    unknown = [c for c in header if c not in USER_COLUMNS]
    if unknown:
        raise CompareError(f"{path}:1: unknown column {unknown[0]!r}; columns: "
                           f"{', '.join(USER_COLUMNS)}")
    repeated = [c for i, c in enumerate(header) if c in header[:i]]
    if repeated:  # DictReader would silently keep the last one
        raise CompareError(f"{path}:1: column {repeated[0]!r} appears more than once")
    missing = [c for c in USER_REQUIRED if c not in header]
    if missing:
        raise CompareError(f"{path}:1: missing column {missing[0]!r} (required: "
                           f"{', '.join(USER_REQUIRED)})")
    for row in reader:
        line = reader.line_num
        if None in row:
            raise CompareError(f"{path}:{line}: more cells than the header's "
                               f"{len(header)} columns")
        if not any((v or "").strip() for v in row.values()):
            continue
        if any("\n" in (v or "") for v in row.values()):  # an unclosed quote ate lines
            raise CompareError(f"{path}:{line}: a quoted cell spans lines (an unclosed \"?)")
        values = {k: _user_cell(path, line, k, (v or "").strip()) for k, v in row.items()}
        for k in USER_REQUIRED:
            if values.get(k) is None:
                raise CompareError(f"{path}:{line}: column {k}: required, but empty")
        kind = values.get("kind") or OTHER
        if kind not in USER_KINDS:
            raise CompareError(f"{path}:{line}: column kind: must be one of "
                               f"{', '.join(USER_KINDS)}, got {kind!r}")
        as_int = {k: None if values.get(k) is None else round(values[k])
                  for k in ("macs", "params", "base_macs", "resolution")}
        for k, v in as_int.items():
            if v is not None and v < 1:  # a count of 0 has no place on a log axis
                raise CompareError(f"{path}:{line}: column {k}: must be >= 1 after "
                                   f"rounding to a whole count, got {row[k].strip()}")
        label = values["label"]
        if label in labels:
            raise CompareError(f"{path}:{line}: column label: {label!r} is already the "
                               f"label of line {labels[label]}; labels name the points, "
                               f"make them unique")
        labels[label] = line
        points.append(Point(label=values["label"], kind=kind, origin=USER,
                            top1=values["top1"], macs=as_int["macs"],
                            params=as_int["params"], model=values.get("model"),
                            width=values.get("width"), resolution=as_int["resolution"],
                            base_top1=values.get("base_top1"),
                            base_macs=as_int["base_macs"], source=_shown(f"{path}:{line}")))
    if not points:  # a header alone (or blank lines) is a mistake, not an empty comparison
        raise CompareError(f"{path}: no points (a header but no rows)")
    return points


def _user_cell(path: Path, line: int, column: str, text: str) -> Any:
    if not text:
        return None
    if USER_COLUMNS[column] is str:
        return text
    try:
        value = float(text)
    except ValueError:
        raise CompareError(f"{path}:{line}: column {column}: expected a number, "
                           f"got {text!r}") from None
    # 1e18: no network's count comes near; 1e300 passed and broke the plots' axis limits.
    # A top-1 of 0 is a measurement (a diverged run; tools/evaluate.py writes it), a count of
    # 0 no point on a log axis.
    accuracy = column in ("top1", "base_top1")
    if not math.isfinite(value) or value < 0 or (value == 0 and not accuracy) \
            or value > (100 if accuracy else 1e18):
        bound = "in [0, 100]" if accuracy else "in (0, 1e18]"
        raise CompareError(f"{path}:{line}: column {column}: must be {bound}, got {text}")
    return value


# --------------------------------------------------------------------------- baselines

def assign_thin_baselines(points: list[Point]) -> list[str]:
    """Give every thin point without a baseline the widest thin point of the same model and
    origin (most MACs) as its baseline, in place. Thin points of no known model get none (the
    widest thin point of a file may be another architecture): a warning says so."""
    unnamed = [p.label for p in points
               if p.kind == THIN and p.base_top1 is None and p.macs and not p.model]
    warnings = [f"thin points without a model ({', '.join(unnamed[:3])}"
                f"{f' and {len(unnamed) - 3} more' if len(unnamed) > 3 else ''}): no Δ "
                f"baseline; give a points CSV a model column (or base_top1/base_macs)"
                ] if unnamed else []
    widest: dict[tuple[str | None, str], Point] = {}
    for p in points:
        if p.kind == THIN and p.macs and p.model:
            key = (p.model, p.origin)
            if key not in widest or p.macs > widest[key].macs:
                widest[key] = p
    for p in points:
        if p.kind == THIN and p.base_top1 is None and (p.model, p.origin) in widest:
            ref = widest[(p.model, p.origin)]
            p.base_top1, p.base_macs = ref.top1, ref.macs
    return warnings


def check_baselines(points: list[Point]) -> list[str]:
    """Warnings for points whose own baseline has fewer MACs than they do: the negative MAC
    reduction is shown as given, but a pruned network is never larger than its source, so
    this is most often `macs` and `base_macs` swapped in a points CSV."""
    return [f"{p.source}: {p.label} has {p.macs:,} MACs but its baseline (base_macs) only "
            f"{p.base_macs:,}: a negative MAC reduction (macs and base_macs swapped?)"
            for p in points if p.macs and p.base_macs and p.base_macs < p.macs]


def dedupe_labels(points: list[Point]) -> None:
    """Make the labels of the non-literature points unique, in place: a shared label gets the
    source's last path part appended ("A [mine.csv]"); where that still repeats (the same file
    or run folder name in two places), the second and later get " #2", " #3", ... in order."""
    seen = Counter(p.label for p in points)
    for p in points:
        if seen[p.label] > 1 and p.kind != LITERATURE:
            p.label = f"{p.label} [{Path(p.source.split(':')[0]).name}]"
    seen = Counter(p.label for p in points if p.kind != LITERATURE)
    nth: Counter[str] = Counter()
    for p in points:
        if p.kind != LITERATURE and seen[p.label] > 1:
            nth[p.label] += 1
            if nth[p.label] > 1:
                p.label = f"{p.label} #{nth[p.label]}"


# The fasttrain data sets a benchmark's runs may have trained on (an ImageNet run reads an
# ImageNet-layout folder, which is all the config can say).
BENCHMARK_DATASETS = {"imagenet": ("imagefolder",), "cifar10": ("cifar10",)}


def check_benchmark_fit(points: list[Point], bench: Benchmark) -> list[str]:
    """Warnings for measured points whose resolution differs from the benchmark's (their MACs
    are then not comparable to the published ones).

    Raises:
        CompareError: a run trained on another data set than the benchmark's (its accuracy
            would be set against the published ones at equal MACs all the same).
    """
    for p in points:
        allowed = BENCHMARK_DATASETS.get(bench.dataset, ())
        if p.dataset is not None and p.dataset not in allowed:
            raise CompareError(f"{p.source}: trained on data.dataset={p.dataset}, but "
                               f"{bench.name} is on {bench.dataset} (data.dataset="
                               f"{' or '.join(allowed)}); compare it without --benchmark")
    return [f"{p.source}: {p.model or p.label} at {p.resolution} px, but {bench.name} counts "
            f"MACs at {bench.resolution} px: its MACs are not comparable with the published ones"
            for p in points if p.resolution is not None and p.resolution != bench.resolution]


def check_common_conditions(points: list[Point]) -> list[str]:
    """Warnings for a comparison without a benchmark whose points (those that say) were taken at
    several input resolutions or on several data sets: MACs grow with the input's area and
    top-1 depends on both, so one thin curve through them, and the gaps read off it, mix
    conditions."""
    warnings = []
    for what, key, unit in (("resolutions", "resolution", " px"), ("data sets", "dataset", "")):
        groups: dict[Any, list[str]] = {}
        for p in points:
            if getattr(p, key) is not None:
                groups.setdefault(getattr(p, key), []).append(p.label)
        if len(groups) > 1:
            parts = "; ".join(f"{value}{unit}: {', '.join(labels[:2])}"
                              f"{', ...' if len(labels) > 2 else ''}"
                              for value, labels in sorted(groups.items()))
            warnings.append(f"points at several {what} ({parts}): their top-1 and MACs are "
                            f"set against each other on one axis")
    return warnings


# --------------------------------------------------------------------------- latency

@dataclass(frozen=True)
class LatencyConditions:
    """The shared conditions of the benchmark rows a comparison uses."""

    device_name: str
    threads: int | None
    precision: str
    layout: str
    mode: str
    batch_size: int
    torch_version: str
    files: tuple[str, ...]

    def describe(self) -> str:
        threads = f", {self.threads} thread{'s' if self.threads != 1 else ''}" \
            if self.threads else ""
        return (f"{self.device_name}{threads}, {self.precision}, {self.layout}, {self.mode}, "
                f"batch {self.batch_size}, torch {self.torch_version}")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError as e:
        raise CompareError(f"{path}: cannot read latency results ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise CompareError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise CompareError(f"{path}: expected a list of tools/benchmark.py result rows")
        return rows
    if path.suffix.lower() == ".csv":
        return [dict(r) for r in csv.DictReader(text.splitlines())]
    raise CompareError(f"{path}: latency results must be a tools/benchmark.py .json or .csv "
                       f"file")


LATENCY_FIELDS = ("kind", "status", "params", "macs", "resolution", "batch_size",
                  "latency_ms_p50", "device_name", "precision", "layout", "mode")


# What a latency row was measured under: rows that differ in one are not comparable.
CONDITION_KEYS = ("device_name", "threads", "precision", "layout", "mode", "norm_act")


def attach_latency(points: list[Point], files: Iterable[str | Path],
                   batch_size: int | None = None) -> LatencyConditions | None:
    """Set `latency_ms` (p50) of every point whose params, MACs and resolution equal those of a
    successful inference row in `files` (tools/benchmark.py results): latency depends on the
    architecture only, so a run and the checkpoint benchmarked from it match. Of several rows
    for one point the last (most recently appended) is used.

    Args:
        batch_size: which batch size's rows; default the smallest in the files.

    Returns:
        The rows' shared conditions, or None when no point matched.

    Raises:
        CompareError: unreadable files, rows missing fields, no row at `batch_size`, or matched
            rows measured under different conditions (device, threads, precision, layout,
            mode, norm_act): latencies from different set-ups are not comparable.
    """
    rows = []
    files = [Path(f) for f in files]
    for path in files:
        for i, row in enumerate(_read_rows(path), start=1):
            if row.get("kind") == "train":  # a --train record: img/s, no latency; skipped
                continue
            missing = [k for k in LATENCY_FIELDS if k not in row]
            if missing:
                raise CompareError(f"{path}: row {i}: missing field {missing[0]!r} (not a "
                                   f"tools/benchmark.py result file?)")
            if row["kind"] != "latency" or row["status"] != "ok" or row["macs"] in (None, ""):
                continue
            try:
                rows.append({**row, "params": int(row["params"]), "macs": int(row["macs"]),
                             "resolution": int(row["resolution"]),
                             "batch_size": int(row["batch_size"]),
                             "latency_ms_p50": float(row["latency_ms_p50"]),
                             "threads": int(row["threads"]) if row.get("threads") not in
                             (None, "") else None})
            except (TypeError, ValueError):
                raise CompareError(f"{path}: row {i}: non-numeric params, macs, resolution, "
                                   f"batch_size or latency") from None
    if not rows:
        if files:
            raise CompareError(f"{', '.join(map(str, files))}: no successful inference rows")
        return None
    sizes = sorted({r["batch_size"] for r in rows})
    batch = sizes[0] if batch_size is None else batch_size
    if batch not in sizes:
        raise CompareError(f"no latency rows at batch size {batch}; the files have "
                           f"{', '.join(map(str, sizes))}")
    by_arch: dict[tuple[int, int, int], list[dict]] = {}
    for r in rows:
        if r["batch_size"] == batch:
            by_arch.setdefault((r["params"], r["macs"], r["resolution"]), []).append(r)
    used = []
    for p in points:
        matches = by_arch.get((p.params, p.macs, p.resolution), [])
        if not matches or p.kind == LITERATURE:
            continue
        # norm_act changes the latency but not the counts (a BN-folded export counts like its
        # checkpoint), and so do the mode (a TorchScript file's rows against a checkpoint's
        # eager ones) and the other conditions: such rows are not re-measurements of each
        # other, and the last file given would win
        for key in CONDITION_KEYS:
            values = list(dict.fromkeys(m.get(key) for m in matches))
            if len(values) > 1:
                raise CompareError(f"{p.label}: latency rows of its network ({p.params:,} "
                                   f"params, {p.macs:,} MACs) measured with {key} "
                                   f"{values[0]!r} and {values[1]!r}; compare one set-up at "
                                   f"a time")
        r = matches[-1]  # the last (most recent) measurement
        p.latency_ms = r["latency_ms_p50"]
        used.append(r)
    if not used:
        return None
    first = used[0]
    for r in used[1:]:
        for k in CONDITION_KEYS:
            if r.get(k) != first.get(k):
                raise CompareError(f"latency rows measured under different conditions: "
                                   f"{k} {first.get(k)!r} and {r.get(k)!r}; compare one "
                                   f"set-up at a time")
    return LatencyConditions(first["device_name"], first["threads"], first["precision"],
                             first["layout"], first["mode"], batch,
                             str(first.get("torch_version", "?")),
                             tuple(str(f) for f in files))

