"""Comparison plots, each written as PNG and SVG (matplotlib's Agg canvas; no display needed).

- `plot_top1`: top-1 against conv+fc MACs, parameters or measured latency (log x). Thin points
  with their Pareto curve (straight segments in log x = linear interpolation in log MACs),
  pruned and other points labelled, published points labelled by method; dotted vertical lines
  mark where the ThinResNet widths of the benchmark sit (from thinresnet_counts.csv) whether or
  not their accuracy has been measured.
- `plot_delta`: Δ top-1 against MAC reduction, each point relative to its own baseline (papers
  start from different baselines).

SVG files carry no date and fixed element ids, so regenerating an unchanged plot gives an
unchanged file.
"""
from __future__ import annotations

from pathlib import Path
from typing import IO, Callable, Sequence

from .literature import CompareError
from .pareto import pareto_front
from .points import LITERATURE, MEASURED, PRUNED, THIN, USER, Point

STYLE = {  # kind -> marker, colour, legend text
    THIN: ("o", "C0", "ThinResNet"),
    PRUNED: ("s", "C3", "pruned + fine-tuned"),
    "other": ("D", "C2", "other"),
}
AXES = {"macs": "conv+fc MACs per image (fvcore; the literature's \"FLOPs\")",
        "params": "parameters",
        "latency": "p50 latency per batch (ms)"}


def _legend(ax) -> None:
    """A legend when something is labelled (a plot of points without params or baselines has
    nothing to draw, and matplotlib warns on an empty legend)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")


def _value(p: Point, x: str) -> float | None:
    return {"macs": p.macs, "params": p.params, "latency": p.latency_ms}[x]


def _figure(title: str, subtitle: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6))
    ax = fig.subplots()
    fig.suptitle(title, fontsize=11)
    if subtitle:
        ax.set_title(subtitle, fontsize=8)
    ax.grid(True, which="both", alpha=0.25)
    return fig, ax


LABEL = "point-label"  # gid of the per-point labels `_spread_labels` may move


def _spread_labels(fig) -> None:
    """Move each point label (gid `LABEL`), in drawing order, up or down by whole line steps
    until it overlaps no label placed before it, no other text and no marker, staying inside
    its axes; one that finds no free place keeps its own. Published results crowd at a few MAC
    counts (CHIP beside DMCP, GReg-2 on DMC and CCP-AC) and printed over each other, unread.
    Written here because matplotlib places no labels and adjustText is not a dependency; the
    moves are deterministic, so regenerated plots diff clean."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    renderer = FigureCanvasAgg(fig).get_renderer()
    for ax in fig.axes:
        labels = [t for t in ax.texts if t.get_gid() == LABEL]
        if not labels:
            continue
        frame = ax.get_window_extent(renderer)
        taken = [t.get_window_extent(renderer) for t in ax.texts if t.get_gid() != LABEL]
        r = 2.5  # half a marker, in pixels: a label just beside its own marker is free
        for c in ax.collections:
            for x, y in c.get_transform().transform(c.get_offsets()):
                taken.append(Bbox([[x - r, y - r], [x + r, y + r]]))
        # the thin curves (and the Δ plot's zero line): a label struck through is as unread.
        # Not the vertical width lines, which no move up or down can leave.
        segments = [(a, b) for line in ax.lines
                    for xy in [line.get_transform().transform(line.get_xydata())]
                    for a, b in zip(xy[:-1], xy[1:]) if abs(b[0] - a[0]) >= 1]
        for t in labels:
            base, step = t.xyann, t.get_fontsize() * 1.15
            for k in (0, 1, -1, 2, -2, 3, -3, 4, -4):
                t.xyann = (base[0], base[1] + k * step)
                box = t.get_window_extent(renderer)
                inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
                if (inside and not any(box.overlaps(o) for o in taken)
                        and not any(_crosses(box, a, b) for a, b in segments)):
                    break
            else:
                k, t.xyann = 0, base
                box = t.get_window_extent(renderer)
            taken.append(box)
            if k:  # moved off its point: a leader line says whose label it is
                t.remove()
                ax.annotate(t.get_text(), t.xy, textcoords="offset points", xytext=t.xyann,
                            ha=t.get_ha(), va=t.get_va(), fontsize=t.get_fontsize(),
                            color=t.get_color(), gid=LABEL,
                            arrowprops=dict(arrowstyle="-", color="0.6", lw=0.4, shrinkA=0,
                                            shrinkB=2))


def _crosses(box, a, b) -> bool:
    """Whether the segment from `a` to `b` (display coordinates) passes through `box`: the
    segment clipped to the box's x range (Liang-Barsky on x) has a y range meeting the box's."""
    (x0, y0), (x1, y1) = a, b
    lo, hi = 0.0, 1.0
    dx = x1 - x0
    if dx == 0:
        if not box.x0 <= x0 <= box.x1:
            return False
    else:
        t0, t1 = sorted(((box.x0 - x0) / dx, (box.x1 - x0) / dx))
        lo, hi = max(lo, t0), min(hi, t1)
        if lo > hi:
            return False
    ya, yb = sorted((y0 + lo * (y1 - y0), y0 + hi * (y1 - y0)))
    return ya <= box.y1 and yb >= box.y0


def _save(fig, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    _spread_labels(fig)
    png, svg = stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")
    write_replacing(png, lambda f: fig.savefig(f, format="png", dpi=110))
    import matplotlib

    # stable ids, so regenerated files diff clean; set for this write only (a notebook's own
    # SVGs keep their random ids)
    with matplotlib.rc_context({"svg.hashsalt": "fasttrain"}):
        write_replacing(svg, lambda f: fig.savefig(f, format="svg", metadata={"Date": None}))
    return [png, svg]


def write_replacing(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """`write(f)` to `path` through a temporary file renamed over it
    (`checkpoint.write_atomic`): a failed write (a full disk) leaves the earlier file whole,
    where writing in place left a truncated plot or table.

    Raises:
        CompareError: `path` cannot be written; names it.
    """
    from ..engine.checkpoint import write_atomic

    try:
        write_atomic(path, write)
    except OSError as e:
        raise CompareError(f"{path}: cannot write ({e.strerror or e}); the file is as it "
                           f"was") from None


# Beyond this many points of one family (published / ours) the per-point labels are left out:
# hundreds of labels overprint into a blot, and each text costs every draw (with a scatter and
# a label per point, comparing 1,000 points took ~70 s, 4,000 ~7 min); the table names them all.
LABEL_LIMIT = 80


def _unlabelled_note(ax, dropped: list[str]) -> None:
    if dropped:
        ax.annotate(f"points not labelled (over {LABEL_LIMIT}; the table names them): "
                    f"{', '.join(dropped)}", (0.01, 0.01), xycoords="axes fraction", fontsize=6,
                    color="0.4")


def _literature(ax, points: list[Point], xy: Callable[[Point], tuple[float, float] | None]
                ) -> list[str]:
    """Published points, one scatter per method (a collection draws thousands of markers at
    the cost of one artist). Returns what was left unlabelled, for `_unlabelled_note`."""
    import matplotlib

    shown = [(p, xy(p)) for p in points if p.kind == LITERATURE and xy(p) is not None]
    # Styles by the place of the method among all of the comparison's methods, not this plot's:
    # a method left off one plot (no parameter count) shifted every other's colour there. Past
    # tab20's 20 colours the marker changes, so that no two methods look alike.
    place = {m: i for i, m in enumerate(sorted({p.method for p in points
                                                 if p.kind == LITERATURE}))}
    cmap = matplotlib.colormaps["tab20"]
    markers = ("^", "v", "<", ">", "D")
    labelled = len(shown) <= LABEL_LIMIT
    for j, method in enumerate(sorted({p.method for p, _ in shown})):
        i = place[method]
        at = [v for p, v in shown if p.method == method]
        ax.scatter([v[0] for v in at], [v[1] for v in at], marker=markers[i // 20 % len(markers)],
                   s=22, color=cmap(i % 20), alpha=0.85, zorder=3,
                   label=None if j else "published" + (" (labelled by method)" if labelled
                                                        else " (one style per method)"))
    if not labelled:
        return [f"{len(shown)} published"]
    for p, (x, y) in shown:
        ax.annotate(p.method, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=5.5,
                    color="0.25", gid=LABEL)
    return []


def _ours(ax, points: list[Point], xy: Callable[[Point], tuple[float, float] | None],
          log_x: bool) -> list[str]:
    """Thin, pruned and other points, one scatter per kind and origin. Returns what was left
    unlabelled, for `_unlabelled_note`."""
    import math

    ours = [(p, xy(p)) for p in points if p.kind != LITERATURE and xy(p) is not None]
    groups: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for p, v in ours:
        groups.setdefault((p.kind, p.origin), []).append(v)
    for (kind, origin), at in groups.items():
        marker, colour, text = STYLE.get(kind, STYLE["other"])
        ax.scatter([v[0] for v in at], [v[1] for v in at], marker=marker, s=40, color=colour,
                   zorder=4, facecolors="none" if origin == USER else colour,
                   label=f"{text} ({origin})")
    if len(ours) > LABEL_LIMIT:
        return [f"{len(ours)} of ours"]
    scale = (lambda v: math.log(v)) if log_x else (lambda v: v)
    xs = [scale(v[0]) for _, v in ours]
    lo, span = (min(xs), (max(xs) - min(xs)) or 1.0) if xs else (0.0, 1.0)
    for p, (x, y) in ours:
        colour = STYLE.get(p.kind, STYLE["other"])[1]
        right = (scale(x) - lo) / span > 0.6  # label towards the middle: never off the canvas
        ax.annotate(p.label + (" (user-provided)" if p.origin == USER else ""), (x, y),
                    textcoords="offset points", xytext=(-4 if right else 4, -10),
                    ha="right" if right else "left", fontsize=7, color=colour, gid=LABEL)
    return []


def _reference(ax, reference: Sequence[tuple[str, float]]) -> None:
    for i, (text, x) in enumerate(reference):
        ax.axvline(x, color="0.55", linestyle=":", linewidth=1,
                   label="ThinResNet widths (position only)" if i == 0 else None, zorder=1)
        ax.annotate(text, (x, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                    xytext=(2, -4), textcoords="offset points", fontsize=7, va="top",
                    color="0.4")


def _log_x(ax) -> None:
    from matplotlib.ticker import LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.margins(x=0.12, y=0.08)  # room for the point labels
    locator = LogLocator(subs=(1.0, 2.0, 5.0))
    lo, hi = ax.get_xlim()
    if sum(lo <= v <= hi for v in locator.tick_values(lo, hi)) < 2:
        # a narrow range (latencies of 8.1 to 9.9 ms) had one labelled tick, "10": every digit
        locator = LogLocator(subs=tuple(range(1, 10)))
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_minor_formatter(NullFormatter())


def _si(v: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{unit}"
    return f"{v:g}"


def _thin_curves(ax, thin: list[tuple[str | None, float, float]], to_x: Callable[[float], float],
                 how: str) -> None:
    """One Pareto curve per model of the thin points (model, x, y), as the table sets a point
    against its own model's thin curve (report.table_rows); points of no model make one curve
    together. The front is the points no other beats at smaller or equal x; `to_x` maps x to
    the axis (the Δ plot passes minus the reduction, so that more reduction counts as less)."""
    models = sorted({m for m, _, _ in thin}, key=lambda m: (m is None, m or ""))
    styles = ("-", "--", "-.", ":")
    for i, model in enumerate(models):
        front = pareto_front((v, a) for m, v, a in thin if m == model)
        if len(front) > 1:
            name = f" of {model}" if len(models) > 1 and model else ""
            ax.plot([to_x(f[0]) for f in front], [f[1] for f in front], color=STYLE[THIN][1],
                    lw=1.5, ls=styles[i % len(styles)], zorder=2,
                    label=f"ThinResNet Pareto curve{name}{how}")


def plot_top1(points: list[Point], x: str, stem: Path, *, title: str, subtitle: str = "",
              reference: Sequence[tuple[str, float]] = ()) -> list[Path]:
    """Top-1 against `x` ("macs" | "params" | "latency"), log x; PNG and SVG at `stem`.{png,svg}.

    Returns:
        The written paths.
    """
    from matplotlib.ticker import FuncFormatter

    label = AXES[x]
    fig, ax = _figure(title, subtitle)

    def xy(p: Point):
        v = _value(p, x)
        return None if v is None else (v, p.top1)

    _thin_curves(ax, [(p.model, v, p.top1) for p in points
                      if p.kind == THIN and (v := _value(p, x)) is not None],
                 lambda v: v, " (linear in log x)")
    _reference(ax, reference)
    _unlabelled_note(ax, _literature(ax, points, xy) + _ours(ax, points, xy, log_x=True))
    _log_x(ax)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _si(v)))
    ax.set_xlabel(label)
    runs = any(p.origin == MEASURED for p in points)
    ax.set_ylabel("top-1 accuracy (%" + ("; runs: last complete epoch" if runs else "") + ")")
    _legend(ax)
    return _save(fig, stem)


def plot_delta(points: list[Point], stem: Path, *, title: str, subtitle: str = "",
               reference: Sequence[tuple[str, float]] = ()) -> list[Path]:
    """Δ top-1 (pp) against MAC reduction (%), each point relative to its own baseline; points
    without a baseline are left out. PNG and SVG at `stem`.{png,svg}."""
    fig, ax = _figure(title, subtitle)

    def xy(p: Point):
        red, delta = p.mac_reduction, p.delta_top1
        return None if red is None or delta is None else (red, delta)

    ax.axhline(0, color="0.3", lw=0.8)
    # The thin curve of each model, as on the top-1 plots: its points nothing beats (more or
    # equal reduction and higher or equal Δ), not every thin point of every model joined in
    # order of reduction (a zigzag between ResNet-18s and ResNet-50s).
    _thin_curves(ax, [(p.model, -xy(p)[0], xy(p)[1]) for p in points
                      if p.kind == THIN and xy(p) is not None], lambda x: -x, "")
    _reference(ax, reference)
    _unlabelled_note(ax, _literature(ax, points, xy) + _ours(ax, points, xy, log_x=False))
    ax.set_xlabel("MAC reduction relative to the point's own baseline (%)")
    ax.set_ylabel("Δ top-1 vs own baseline (percentage points)")
    ax.margins(x=0.08, y=0.08)
    _legend(ax)
    return _save(fig, stem)
