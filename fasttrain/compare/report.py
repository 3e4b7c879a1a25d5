"""A comparison end to end: gather points, build the thin curve and the margin table, write the
plots and tables (tools/compare.py is its command line).

Table: one row per point. Thin points make the curve; every other point (pruned, other, published)
gets the thin curve's top-1 at its MACs (`pareto.curve_value`) and the margin
`thin - point` in percentage points: positive means the thin network is more accurate at equal
MACs. A point whose model has thin points of its own is set against their curve (a pruned
ResNet-50 against thin ResNet-50s, not a thin ResNet-18 that happens to be better); others
against the curve of all thin points. `thin_points` names the thin points the value came from.
Files written to `out_dir` (`name` = the benchmark, or "compare"):

    <name>-top1-vs-macs.{png,svg}     <name>-top1-vs-params.{png,svg}
    <name>-top1-vs-latency.{png,svg}  (when latency results matched a point)
    <name>-delta-vs-reduction.{png,svg}
    <name>-table.md                   <name>-table.csv
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from . import plots
from .literature import (LITERATURE_CSV, Benchmark, CompareError, get_benchmark,
                         load_literature, thin_counts)
from .pareto import NEAREST, curve_points, curve_value, pareto_front
from .points import (LITERATURE, MEASURED, THIN, LatencyConditions, Point,
                     assign_thin_baselines, attach_latency, check_benchmark_fit,
                     check_baselines, check_common_conditions, dedupe_labels,
                     literature_points, point_from_run, points_from_csv)

COLUMNS = ("label", "kind", "origin", "model", "macs", "params", "top1", "base_top1",
           "delta_top1", "mac_reduction_pct", "thin_top1_at_macs", "thin_match", "thin_points",
           "thin_minus_point", "latency_ms_p50", "source")
"""Columns of the CSV table (the markdown table shows the same, formatted)."""


@dataclass
class Comparison:
    """Everything a comparison shows.

    Attributes:
        front: the thin Pareto curve as (MACs, top-1) points.
        rows: table rows (dicts with `COLUMNS`), thin points first, then others, then
            published, each group by MACs.
        latency: conditions of the latency rows used, None when there is no latency.
        warnings: one line each (inconsistent literature rows, unknown baselines, ...).
    """

    benchmark: Benchmark | None
    points: list[Point]
    front: list[tuple[float, float]]
    rows: list[dict[str, Any]]
    latency: LatencyConditions | None
    tolerance: float
    warnings: list[str] = field(default_factory=list)


def table_rows(points: list[Point], front: list[tuple[float, float]], tolerance: float
               ) -> list[dict[str, Any]]:
    """One table row per point (see module doc), in display order."""
    order = {THIN: 0, LITERATURE: 2}

    def key(p: Point):
        return (order.get(p.kind, 1), p.macs is None, p.macs or 0, p.label)

    thin_points = sorted((p for p in points if p.kind == THIN and p.macs), key=lambda p: p.label)
    # The label of a curve point, per model (two models' thin points may share MACs and top-1)
    # and for the curve of all thin points ("*").
    names: dict[tuple[str | None, float, float], str] = {}
    for p in thin_points:
        names.setdefault((p.model, p.macs, p.top1), p.label)
        names.setdefault(("*", p.macs, p.top1), p.label)
    models = {p.model for p in thin_points if p.model}
    fronts = {m: pareto_front((p.macs, p.top1) for p in thin_points if p.model == m)
              for m in models}
    rows = []
    for p in sorted(points, key=key):
        thin, how, used = (None, "", "")
        if p.kind != THIN and p.macs:
            own = p.model in fronts
            curve = fronts[p.model] if own else front
            thin, how = curve_value(curve, p.macs, tolerance)
            if thin is None:
                how = ""
            else:
                used = " – ".join(names[(p.model if own else "*", *c)]
                                  for c in curve_points(curve, p.macs, how))
        rows.append({"label": p.label, "kind": p.kind, "origin": p.origin, "model": p.model,
                     "macs": p.macs, "params": p.params, "top1": p.top1,
                     "base_top1": p.base_top1, "delta_top1": p.delta_top1,
                     "mac_reduction_pct": p.mac_reduction, "thin_top1_at_macs": thin,
                     "thin_match": how, "thin_points": used,
                     "thin_minus_point": None if thin is None else thin - p.top1,
                     "latency_ms_p50": p.latency_ms, "source": p.source})
    return rows


def build_comparison(benchmark: str | None = None, runs: Iterable[str | Path] = (),
                     points_csv: Iterable[str | Path] = (),
                     latency: Iterable[str | Path] = (), batch_size: int | None = None,
                     literature: str | Path = LITERATURE_CSV, tolerance: float = 0.05
                     ) -> Comparison:
    """Gather the points and compute the curve and the table.

    Args:
        benchmark: "resnet50-imagenet" | "resnet56-cifar10": add its published points and the
            ThinResNet width positions; None for a comparison of the user's own points.
        runs: fasttrain run directories ("measured here").
        points_csv: user CSV files (`points.points_from_csv`; "user-provided").
        latency: tools/benchmark.py result files (.json / .csv) for `points.attach_latency`.
        batch_size: which batch size's latency (default: the smallest in the files).
        tolerance: how far outside the thin curve's MAC range a point still gets its end value.

    Raises:
        CompareError / ConfigError / LiteratureError: bad inputs, one line each.
    """
    bench = get_benchmark(benchmark) if benchmark else None
    warnings: list[str] = []
    # the same run or CSV twice would be each of its points twice ("#2"); the same latency
    # file twice, rows matching a point twice
    runs = _each_once("--runs", runs, "run directory")
    points_csv = _each_once("--points", points_csv, "file")
    latency = _each_once("--latency", latency, "file")
    points = [point_from_run(r, warnings) for r in runs]
    for path in points_csv:
        points += points_from_csv(path)
    if not points and bench is None:
        raise CompareError("nothing to compare: give a benchmark, run directories or a points "
                           "CSV")
    conditions = attach_latency(points, latency, batch_size)
    if latency and conditions is None:
        warnings.append(f"no point matched a latency row of {', '.join(map(str, latency))} "
                        f"(matched by params, MACs and resolution)")
    warnings += assign_thin_baselines(points)
    warnings += check_baselines(points)
    dedupe_labels(points)
    if bench is None:
        warnings += check_common_conditions(points)
    else:
        warnings += check_benchmark_fit(points, bench)
        lit = load_literature(literature, bench.name)
        warnings += lit.warnings
        points += literature_points(lit.points, bench.model)
    front = pareto_front((p.macs, p.top1) for p in points if p.kind == THIN and p.macs)
    return Comparison(bench, points, front, table_rows(points, front, tolerance), conditions,
                      tolerance, warnings)


def _each_once(option: str, paths: Iterable[str | Path], what: str) -> list[str | Path]:
    """`paths` as a list, refusing two that resolve to the same file or folder."""
    paths, seen = list(paths), {}
    for path in paths:
        key = Path(path).resolve()
        if key in seen:
            raise CompareError(f"{option} {path}: the same {what} as {seen[key]}")
        seen[key] = path
    return paths


# --------------------------------------------------------------------------- formatting

def si(value: float | None, digits: int = 3) -> str:
    """1234567 -> '1.23 M' (G, M, k); '' for None."""
    if value is None:
        return ""
    for div, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= div:
            return f"{value / div:.{digits}g}{unit}"
    return f"{value:.{digits}g}"


def _num(value: float | None, spec: str, sign: bool = False) -> str:
    if value is None:
        return ""
    return format(value, ("+" if sign else "") + spec)


def display_rows(c: Comparison) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the table (markdown and terminal)."""
    header = ["point", "kind", "origin", "MACs", "params", "top-1 %", "Δ vs own base (pp)",
              "MAC reduction %", "thin top-1 at equal MACs %", "from thin points",
              "thin − point (pp)"]
    with_latency = any(r["latency_ms_p50"] is not None for r in c.rows)
    if with_latency:
        header.append(f"latency p50 ms (batch {c.latency.batch_size})" if c.latency
                      else "latency p50 ms")
    cells = []
    for r in c.rows:
        thin = _num(r["thin_top1_at_macs"], ".2f")
        if thin and r["thin_match"] == NEAREST:
            thin = f"≈ {thin} (nearest)"
        row = [r["label"], r["kind"], r["origin"], si(r["macs"]), si(r["params"]),
               _num(r["top1"], ".2f"), _num(r["delta_top1"], ".2f", sign=True),
               _num(r["mac_reduction_pct"], ".1f"), thin, r["thin_points"],
               _num(r["thin_minus_point"], ".2f", sign=True)]
        if with_latency:
            row.append(_num(r["latency_ms_p50"], ".3f"))
        cells.append(row)
    return header, cells


def markdown(c: Comparison) -> str:
    """The table as markdown, with the notes a reader needs under it."""
    header, cells = display_rows(c)
    esc = [[cell.replace("|", "\\|") for cell in row] for row in cells]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in esc]
    notes = ["", "MACs: conv+fc multiply-accumulates per image (fvcore; BatchNorm excluded; "
                 "the literature's \"FLOPs\"). \"thin − point\" > 0: the thin network is more "
                 "accurate at equal MACs (its curve interpolated linearly in log MACs; "
                 f"\"nearest\": within {c.tolerance:.0%} outside the curve's range)."]
    if any(p.origin == MEASURED for p in c.points):
        notes.append("top-1 of a run: its last complete epoch's validation top-1 of the "
                     "model weights (not the best epoch's, not the EMA's); a pruned network's "
                     "base: the "
                     "top-1 its source checkpoint recorded for the weights it was pruned from "
                     "(the EMA's after `tools/prune.py --weights ema`).")
    if not c.front:
        notes.append("No ThinResNet accuracy is part of this comparison"
                     + (" (none has been measured by this project for this benchmark yet)"
                        if c.benchmark else "") + ": the thin columns are empty.")
    if c.latency:
        notes.append(f"Latency: {c.latency.describe()} (from {', '.join(c.latency.files)}).")
    return "\n".join(lines + notes) + "\n"


def _inert(value: Any) -> Any:
    """A text cell a spreadsheet will not take for a formula (labels come from points files
    of other people): a leading =, +, -, @, tab or CR gets a ' before it, as OWASP advises."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def write_csv(c: Comparison, path: Path) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    for r in c.rows:
        writer.writerow({k: "" if r[k] is None else _inert(r[k]) for k in COLUMNS})
    plots.write_replacing(path, lambda f: f.write(_utf8(text.getvalue())))


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", errors="backslashreplace")


def _reference(c: Comparison, x: str) -> list[tuple[str, float]]:
    """(label, x position) of the benchmark model's uniform widths."""
    if c.benchmark is None:
        return []
    rows = thin_counts(c.benchmark.model)
    if x == "macs":
        return [(f"w{r.width:g}", r.macs) for r in rows]
    if x == "params":
        return [(f"w{r.width:g}", r.params) for r in rows]
    base = c.benchmark.base_macs
    return [(f"w{r.width:g}", 100 * (1 - r.macs / base)) for r in rows]


def check_name(name: str) -> str:
    """`name` if it is a plain file-name stem, the prefix of every file `write_outputs` writes.

    Raises:
        CompareError: `name` is empty, '.' or '..', or holds a path separator or a NUL (the
            files would land outside `out_dir`, in sub-folders, or nowhere).
    """
    seps = [s for s in (os.sep, os.altsep, "/") if s]
    if name in ("", ".", "..") or any(s in name for s in seps) or "\0" in name:
        raise CompareError(f"name {name!r} is not a plain file-name stem (not empty, no path "
                           f"separator, not '.' or '..'); the files go into the output folder")
    return name


def write_outputs(c: Comparison, out_dir: str | Path, name: str | None = None) -> list[Path]:
    """Write the plots (PNG + SVG) and the tables into `out_dir`; returns the written paths.

    Raises:
        CompareError: `name` is not a plain file-name stem (`check_name`), `out_dir` cannot
            be created, or a file cannot be written (names it and the reason; the files
            written before it are the new comparison's, the others as they were).
    """
    if name is not None:
        check_name(name)
    from ..engine.checkpoint import folder_locked

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompareError(f"{out}: cannot write the comparison ({e.strerror or e})") from None
    # Two comparisons into one folder at once left one's plots beside the other's tables.
    with folder_locked(out):
        try:
            return _write_outputs(c, out, name)
        except OSError as e:  # the stale latency plot's removal
            raise CompareError(f"{out}: cannot write the comparison ({e.strerror or e})"
                               ) from None


PLOTS = ("top1-vs-macs", "top1-vs-params", "top1-vs-latency", "delta-vs-reduction")


def output_files(out_dir: str | Path, name: str) -> list[Path]:
    """Every file a comparison named `name` may write (or, the latency plot, remove) in
    `out_dir`, so that a tool can check them all before the work (`cli.check_output`). `name`:
    the `--name`, else the benchmark's name, else "compare"."""
    out = Path(out_dir)
    return [out / f"{name}-{plot}{suffix}" for plot in PLOTS for suffix in (".png", ".svg")
            ] + [out / f"{name}-table.md", out / f"{name}-table.csv"]


def title(c: Comparison) -> str:
    """What the comparison is of: the benchmark's title, else the data set(s) and the
    resolution its points name (a plot passed around alone said only "ThinResNet vs pruned")."""
    if c.benchmark:
        return c.benchmark.title
    sets = sorted({p.dataset for p in c.points if p.dataset})
    sizes = sorted({p.resolution for p in c.points if p.resolution})
    known = ([", ".join(sets)] if sets else []) + (
        [f"{sizes[0]} px"] if len(sizes) == 1 else [f"{sizes[0]}-{sizes[-1]} px"] if sizes else [])
    return "ThinResNet vs pruned" + (f" ({', '.join(known)})" if known else "")


def _write_outputs(c: Comparison, out: Path, name: str | None) -> list[Path]:
    name = name or (c.benchmark.name if c.benchmark else "compare")
    what = title(c)
    thin_note = ("" if c.front else
                 "no ThinResNet accuracy measured by this project for this benchmark yet; "
                 "dotted lines: ThinResNet MAC/param positions only" if c.benchmark else "")
    lat_note = f"latency: {c.latency.describe()}" if c.latency else ""
    # the names output_files lists, so that a tool checks exactly the files written
    macs_plot, params_plot, latency_plot, delta_plot = (out / f"{name}-{p}" for p in PLOTS)
    has_latency = any(p.latency_ms is not None for p in c.points)
    written = []
    written += plots.plot_top1(c.points, "macs", macs_plot,
                               title=f"{what}: top-1 vs MACs", subtitle=thin_note,
                               reference=_reference(c, "macs"))
    written += plots.plot_top1(c.points, "params", params_plot,
                               title=f"{what}: top-1 vs parameters", subtitle=thin_note,
                               reference=_reference(c, "params"))
    if has_latency:
        written += plots.plot_top1(c.points, "latency", latency_plot,
                                   title=f"{what}: top-1 vs measured latency",
                                   subtitle=lat_note)
    written += plots.plot_delta(c.points, delta_plot,
                                title=f"{what}: accuracy change vs MAC reduction, each relative "
                                      f"to its own baseline", subtitle=thin_note,
                                reference=_reference(c, "reduction"))
    md, table = out / f"{name}-table.md", out / f"{name}-table.csv"
    plots.write_replacing(md, lambda f: f.write(_utf8(markdown(c))))
    write_csv(c, table)
    if not has_latency:
        # an earlier comparison's, of other points: it must not pass for this one's. Removed
        # last, so that a write failing before it leaves that comparison's plot in place.
        for suffix in (".png", ".svg"):
            latency_plot.with_suffix(suffix).unlink(missing_ok=True)
    return written + [md, table]
