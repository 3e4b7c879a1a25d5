"""tools/compare.py and fasttrain.compare: Pareto curve math, the margin table, user CSV files,
latency matching, plots that decode, one-line errors, and the whole thin-vs-pruned flow on the
built-in data set (train two widths, prune, fine-tune, benchmark, compare)."""
from __future__ import annotations

import csv
import io
import json
import os
import math
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from conftest import ReaderGone, load_tool
from fasttrain.compare import report
from fasttrain.compare.literature import CompareError
from fasttrain.compare.pareto import curve_value, pareto_front
from fasttrain.compare.points import (LITERATURE, MEASURED, OTHER, PRUNED, PUBLISHED, THIN, USER,
                                      Point, attach_latency, point_from_run, points_from_csv)
from fasttrain.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
compare_tool = load_tool("compare")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (small models; two threads on a shared 2-core machine wait on the
    scheduler)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_images(paths):
    """Every PNG decodes to a non-blank image and every SVG parses as XML."""
    import matplotlib.image

    for path in paths:
        path = Path(path)
        if path.suffix == ".png":
            img = matplotlib.image.imread(path)
            assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
            assert img.std() > 0.01, path  # not a blank canvas
        elif path.suffix == ".svg":
            root = ET.parse(path).getroot()
            assert root.tag.endswith("svg") and len(list(root.iter())) > 50
            assert "<dc:date>" not in path.read_text()  # reproducible files


# --------------------------------------------------------------------------- Pareto math

def test_pareto_front_keeps_only_undominated_points():
    pts = [(10, 70.0), (20, 69.0), (20, 72.0), (40, 75.0), (35, 74.0), (80, 74.5), (80, 76.0),
           (5, 60.0), (10, 70.0)]
    assert pareto_front(pts) == [(5, 60.0), (10, 70.0), (20, 72.0), (35, 74.0), (40, 75.0),
                                 (80, 76.0)]
    assert pareto_front([]) == [] and pareto_front([(3, 1.0)]) == [(3, 1.0)]


def test_pareto_front_keeps_the_best_of_equal_macs():
    # Sorted worst first at equal MACs, both would be kept: two curve points at one x.
    front = pareto_front([(10, 70.0), (10, 72.0), (5, 60.0)])
    assert front == [(5, 60.0), (10, 72.0)]
    assert curve_value(front, 10) == (72.0, "exact")


def test_curve_value_is_linear_in_log_macs():
    front = [(1e6, 60.0), (4e6, 70.0), (16e6, 74.0)]
    assert curve_value(front, 4e6) == (70.0, "exact")
    value, how = curve_value(front, 2e6)  # half-way in log between 1 M and 4 M
    assert how == "interpolated" and value == pytest.approx(65.0)
    value, _ = curve_value(front, 8e6)
    assert value == pytest.approx(72.0)
    t = math.log(5e6 / 4e6) / math.log(4)
    assert curve_value(front, 5e6)[0] == pytest.approx(70.0 + 4.0 * t)
    # Outside the range: the end value within the tolerance, nothing beyond it.
    assert curve_value(front, 0.96e6) == (60.0, "nearest")
    assert curve_value(front, 0.9e6) == (None, "below the thin range")
    # 4.9 % below, as tools/prune.py measures a miss (from the target): within 5 %
    assert curve_value(front, 0.951e6) == (60.0, "nearest")
    assert curve_value(front, 0.949e6) == (None, "below the thin range")
    assert curve_value(front, 16.5e6, tolerance=0.05) == (74.0, "nearest")
    assert curve_value(front, 18e6) == (None, "above the thin range")
    assert curve_value([], 1e6) == (None, "no thin points")
    assert curve_value([(1e6, 50.0)], 1e6) == (50.0, "exact")


def test_margin_table_values():
    pts = [Point("thin a", THIN, "measured here", 60.0, 1_000_000, 10, model="m"),
           Point("thin b", THIN, "measured here", 70.0, 4_000_000, 40, model="m"),
           Point("pruned", PRUNED, "measured here", 63.0, 2_000_000, 15, base_top1=70.5,
                 base_macs=4_000_000, latency_ms=1.5),
           Point("far", OTHER, USER, 50.0, 100_000, 1),
           Point("edge", OTHER, USER, 71.0, 4_100_000, 1)]
    front = pareto_front((p.macs, p.top1) for p in pts if p.kind == THIN)
    rows = {r["label"]: r for r in report.table_rows(pts, front, 0.05)}
    assert rows["pruned"]["thin_top1_at_macs"] == pytest.approx(65.0)
    assert rows["pruned"]["thin_minus_point"] == pytest.approx(2.0)
    assert rows["pruned"]["thin_match"] == "interpolated"
    assert rows["pruned"]["delta_top1"] == pytest.approx(-7.5)
    assert rows["pruned"]["mac_reduction_pct"] == pytest.approx(50.0)
    assert rows["pruned"]["latency_ms_p50"] == 1.5
    assert rows["far"]["thin_top1_at_macs"] is None and rows["far"]["thin_minus_point"] is None
    assert (rows["edge"]["thin_top1_at_macs"], rows["edge"]["thin_match"]) == (70.0, "nearest")
    assert rows["edge"]["thin_minus_point"] == pytest.approx(-1.0)
    assert rows["thin a"]["thin_top1_at_macs"] is None  # thin points make the curve
    assert (rows["pruned"]["thin_points"], rows["edge"]["thin_points"]) == \
        ("thin a – thin b", "thin b")
    assert [r["label"] for r in report.table_rows(pts, front, 0.05)][:2] == ["thin a", "thin b"]


def test_a_point_is_set_against_the_thin_curve_of_its_own_model():
    """A thin ResNet-18 more accurate than thin ResNet-50s of equal MACs used to set the curve
    for a pruned ResNet-50 (interpolated between the ResNet-18 and a wider ResNet-50), turning
    its margin's sign; which thin points were used was not shown."""
    pts = [Point("thin r18 w0.75", THIN, MEASURED, 73.0, 1_043_000_000, model="thin_resnet18"),
           Point("thin r50 w0.5", THIN, MEASURED, 72.0, 1_052_000_000, model="thin_resnet50"),
           Point("thin r50 w0.75", THIN, MEASURED, 75.0, 2_323_000_000, model="thin_resnet50"),
           Point("pruned r50", PRUNED, MEASURED, 72.5, 1_052_000_000, model="thin_resnet50"),
           Point("paper", OTHER, USER, 72.5, 1_052_000_000)]  # no model: every thin point
    front = pareto_front((p.macs, p.top1) for p in pts if p.kind == THIN)
    rows = {r["label"]: r for r in report.table_rows(pts, front, 0.05)}
    pruned, paper = rows["pruned r50"], rows["paper"]
    assert (pruned["thin_top1_at_macs"], pruned["thin_match"], pruned["thin_points"]) == \
        (72.0, "exact", "thin r50 w0.5")
    assert pruned["thin_minus_point"] == pytest.approx(-0.5)
    assert paper["thin_match"] == "interpolated" and paper["thin_minus_point"] > 0
    assert paper["thin_points"] == "thin r18 w0.75 – thin r50 w0.75"
    # a thin point of another model with the same counts and top-1 is not named for it
    pts.append(Point("thin r18 twin", THIN, MEASURED, 72.0, 1_052_000_000, model="a_r18"))
    front = pareto_front((p.macs, p.top1) for p in pts if p.kind == THIN)
    rows = {r["label"]: r for r in report.table_rows(pts, front, 0.05)}
    assert rows["pruned r50"]["thin_points"] == "thin r50 w0.5"


def test_a_moved_project_still_finds_the_pruning_record(tmp_path):
    """model.init_from is recorded absolute; after the project folder moved, the record was
    "not found" and the Δ columns empty. Its trailing parts are looked for from the run's
    folders; a file of that name with other MACs is not taken for it."""
    from fasttrain.compare import points as points_mod

    run = tmp_path / "moved" / "runs" / "ft"
    run.mkdir(parents=True)
    torch.save({"model": {}, "pruning": {"macs": 123, "source": "x"}},
               tmp_path / "moved" / "pruned.pt")
    gone = str(tmp_path / "old-place" / "pruned.pt")
    warnings = []
    assert points_mod._pruning_record(gone, run, warnings, macs=123)["source"] == "x"
    assert warnings == []
    assert points_mod._pruning_record(gone, run, warnings, macs=999) is None
    # a run fine-tuned from a fine-tuned pruned network: its lineage, also after the move
    torch.save({"model": {}, "pruned_from": {"macs": 77, "source": "y"}},
               tmp_path / "moved" / "tuned.pt")
    tuned_gone = str(tmp_path / "old-place" / "tuned.pt")
    assert points_mod._pruning_record(tuned_gone, run, [], macs=77)["source"] == "y"
    assert warnings == [f"{run}: model.init_from {gone} found as {tmp_path / 'moved' / 'pruned.pt'}"
                        f", but its pruned network has 123 MACs and the run's 999: not the file "
                        f"the run was fine-tuned from (pruned again since?), so its baseline is "
                        f"unknown and it is left out of the Δ view"]
    warnings = []
    assert points_mod._pruning_record(str(tmp_path / "nowhere.pt"), run, warnings, 1) is None
    assert warnings == [f"{run}: model.init_from {tmp_path / 'nowhere.pt'} not found: its "
                        f"baseline (the network it was pruned from) is unknown, so it is left "
                        f"out of the Δ view"]


def test_a_point_at_another_resolution_is_named_by_its_label_without_a_model():
    """A points row of `evaluate --factory` has no model: the warning read "None at 16 px"."""
    from fasttrain.compare.literature import get_benchmark
    from fasttrain.compare.points import check_benchmark_fit

    bench = get_benchmark("resnet56-cifar10")
    mine = Point("my net", OTHER, USER, 90.0, 10**7, resolution=16, source="mine.csv:2")
    assert check_benchmark_fit([mine], bench) == [
        f"mine.csv:2: my net at 16 px, but resnet56-cifar10 counts MACs at {bench.resolution} "
        f"px: its MACs are not comparable with the published ones"]


def test_a_relative_init_from_is_not_taken_from_another_prune(tmp_path, monkeypatch):
    """Runs of older versions record model.init_from as given (runs/pruned/x.pt): compare took
    whatever file of that name the current folder held (a user's own prune of the README's
    steps) as the run's baseline, without a word. The run's own checkpoint says where its
    network came from; a file found by name counts only with the run's MACs."""
    from fasttrain.compare import points as points_mod

    run = tmp_path / "runs" / "ft"
    (run / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "pruned").mkdir()
    torch.save({"model": {}, "pruning": {"macs": 500, "source_val_top1": 90.0}},
               tmp_path / "runs" / "pruned" / "x.pt")  # another prune, same name
    monkeypatch.chdir(tmp_path)
    warnings = []
    assert points_mod._pruning_record("runs/pruned/x.pt", run, warnings, macs=400) is None
    assert "found as runs/pruned/x.pt, but its pruned network has 500 MACs and the run's 400" \
        in warnings[0]
    # the run's checkpoints carry the summary of what it was fine-tuned from: that decides
    torch.save({"model": {"w": torch.zeros(3)},
                "pruned_from": {"macs": 400, "source_val_top1": 80.0}},
               run / "checkpoints" / "last.pt")
    warnings = []
    record = points_mod._pruning_record("runs/pruned/x.pt", run, warnings, macs=400)
    assert record["source_val_top1"] == 80.0 and warnings == []


def test_the_plot_draws_the_thin_curve_of_each_model(tmp_path, monkeypatch):
    """The table sets a point against its own model's curve; the plot drew one curve over all
    thin points (a ResNet-18 curve where the ResNet-50 one decided the margin)."""
    from matplotlib.axes import Axes

    from fasttrain.compare import plots

    labels, real = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: (labels.append(k.get("label")),
                                                              real(self, *a, **k))[1])
    pts = [Point(f"{m} {i}", THIN, MEASURED, top1, macs, model=m)
           for m, rows in (("r18", ((1e8, 60.0), (1e9, 70.0))), ("r50", ((2e8, 55.0), (2e9, 65.0))))
           for i, (macs, top1) in enumerate(rows)]
    plots.plot_top1(pts, "macs", tmp_path / "p", title="t")
    assert [l for l in labels if l and "Pareto" in l] == [
        "ThinResNet Pareto curve of r18 (linear in log x)",
        "ThinResNet Pareto curve of r50 (linear in log x)"]


def test_the_delta_plot_draws_the_thin_curve_of_each_model(tmp_path, monkeypatch):
    """The Δ plot joined every thin point of every model in order of reduction (a zigzag between
    ResNet-18s and ResNet-50s, unnamed in the legend); it now draws each model's Pareto curve,
    the points nothing beats (more or equal reduction, higher or equal Δ)."""
    from matplotlib.axes import Axes

    from fasttrain.compare import plots

    drawn, real = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, x, y, *a, **k: (
        drawn.append((k.get("label"), list(x), list(y))), real(self, x, y, *a, **k))[1])
    families = (("r18", 70.0, 1e9, ((1e9, 70.0, 1), (5e8, 66.0, 0.5), (2.5e8, 60.0, 0.25))),
                ("r50", 76.0, 4e9, ((4e9, 76.0, 1), (2e9, 74.0, 0.5), (1e9, 69.0, 0.25),
                                    (1.5e9, 68.0, 0.3))))  # beaten: more MACs, lower top-1
    pts = [Point(f"{m} w{w}", THIN, MEASURED, top1, int(macs), model=m, base_top1=base,
                 base_macs=int(base_macs))
           for m, base, base_macs, rows in families for macs, top1, w in rows]
    plots.plot_delta(pts, tmp_path / "d", title="t")
    curves = {label: (x, y) for label, x, y in drawn if label and "Pareto" in label}
    assert list(curves) == ["ThinResNet Pareto curve of r18", "ThinResNet Pareto curve of r50"]
    x, y = curves["ThinResNet Pareto curve of r50"]
    assert [round(v, 6) for v in x] == [75.0, 50.0, 0.0] and y == [-7.0, -2.0, 0.0]
    x, y = curves["ThinResNet Pareto curve of r18"]
    assert [round(v, 6) for v in x] == [75.0, 50.0, 0.0] and y == [-10.0, -4.0, 0.0]


def test_point_labels_are_spread_apart_and_a_narrow_axis_gets_its_digits(tmp_path, monkeypatch):
    """Published results at nearly one MAC count printed their labels over each other (GReg-2,
    DMC and CCP-AC read "GRDMC..."); a latency axis from 8.1 to 9.9 ms had one label, "10"."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    from fasttrain.compare import plots

    figures, real = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, stem: figures.append(fig) or real(fig, stem))
    pts = [Point(f"p{i}", LITERATURE, PUBLISHED, 70.0 + 0.01 * i, int(2e9 * (1 + 0.003 * i)),
                 method=f"Method{i}") for i in range(5)]
    pts += [Point(f"net {i}", OTHER, USER, 60.0 + i, 10 ** 6, latency_ms=v)
            for i, v in enumerate((8.1, 8.5, 9.9))]
    plots.plot_top1(pts, "macs", tmp_path / "m", title="t")
    plots.plot_top1(pts, "latency", tmp_path / "l", title="t")
    renderer = FigureCanvasAgg(figures[0]).get_renderer()
    labels = [t for t in figures[0].axes[0].texts if t.get_gid() == plots.LABEL]
    for t in labels:
        t.update_positions(renderer)
    # the text alone: a moved label's leader line starts at its point, among the others
    boxes = [Text.get_window_extent(t, renderer) for t in labels]
    assert len(boxes) == 8
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    ax = figures[1].axes[0]
    lo, hi = ax.get_xlim()
    shown = [v for v in ax.xaxis.get_majorticklocs() if lo <= v <= hi]
    assert {8.0, 9.0} <= set(shown), shown


def test_no_point_label_is_struck_through_by_a_thin_curve(tmp_path, monkeypatch):
    """The digits plots' curve ran through "cifar_resnet20 w0.5" beside its point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox
    from matplotlib.text import Text

    from fasttrain.compare import plots

    b = Bbox([[0, 0], [10, 10]])
    for a, c, crosses in (((-5, 5), (15, 5), True), ((-5, 20), (15, 20), False),
                          ((5, -5), (5, 15), True), ((-10, -10), (20, 20), True),
                          ((-10, 11), (1, 22), False), ((11, 0), (30, 0), False),
                          ((2, 2), (3, 3), True)):
        assert plots._crosses(b, a, c) == crosses, (a, c)
    figures, real = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, stem: figures.append(fig) or real(fig, stem))
    pts = [Point(f"cifar_resnet20 w{w}", THIN, MEASURED, top1, macs, model="cifar_resnet20")
           for w, top1, macs in ((0.25, 96.98, 654_496), (0.5, 99.18, 2_562_368))]
    pts += [Point("pruned", PRUNED, MEASURED, 98.9, 645_440, model="cifar_resnet20")]
    plots.plot_top1(pts, "macs", tmp_path / "m", title="t")
    ax = figures[0].axes[0]
    renderer = FigureCanvasAgg(figures[0]).get_renderer()
    (curve,) = [line for line in ax.lines if "Pareto" in str(line.get_label())]
    a, c = curve.get_transform().transform(curve.get_xydata())
    for t in (t for t in ax.texts if t.get_gid() == plots.LABEL):
        t.update_positions(renderer)
        assert not plots._crosses(Text.get_window_extent(t, renderer), a, c), t.get_text()


def test_a_published_method_keeps_its_style_in_every_plot():
    """Styles were given by the methods of each plot: one left off a plot (no parameter count)
    shifted the colours of the others there (CHIP green in one plot, blue in the next), and
    past tab20's 20 colours two methods looked alike."""
    from fasttrain.compare import plots

    class Axes:
        def __init__(self):
            self.styles = {}

        def scatter(self, x, y, marker, color, **kwargs):
            self.styles[x[0]] = (marker, tuple(color))

        def annotate(self, *args, **kwargs):
            pass

    pts = [Point(f"m{i}", LITERATURE, PUBLISHED, 70.0, (i + 1) * 10 ** 6, method=f"M{i:02d}",
                 params=None if i == 0 else 1000 * (i + 1)) for i in range(25)]
    by_macs, by_params = Axes(), Axes()
    plots._literature(by_macs, pts, lambda p: (p.macs, p.top1))
    plots._literature(by_params, pts, lambda p: None if p.params is None else (p.params, p.top1))
    assert len(by_macs.styles) == 25 and len(by_params.styles) == 24  # M00 has no params
    for i in range(1, 25):
        assert by_macs.styles[(i + 1) * 10 ** 6] == by_params.styles[1000 * (i + 1)]
    assert len(set(by_macs.styles.values())) == 25  # no two methods alike


@pytest.mark.parametrize("count", [12, 400])
def test_plots_of_many_points_draw_a_bounded_number_of_artists(tmp_path, monkeypatch, count):
    """One scatter and one label per point: a 1,000-point comparison took ~70 s to plot and
    4,000 ~7 min (legend placement and every draw grew with the artists). Points are drawn as
    one collection per kind; past plots.LABEL_LIMIT they are not labelled, and the plot says so."""
    from fasttrain.compare import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, stem: figures.append(fig) or [])
    pts = [Point(f"net {i}", (THIN, PRUNED, LITERATURE)[i % 3],
                 PUBLISHED if i % 3 == 2 else (MEASURED, USER)[i % 2], 60 + i % 17,
                 int(1e8 * (1 + i % 37)), base_top1=76.0, base_macs=int(4e9),
                 method=f"M{i % 7}" if i % 3 == 2 else None) for i in range(count)]
    plots.plot_top1(pts, "macs", tmp_path / "a", title="t")
    plots.plot_delta(pts, tmp_path / "b", title="t")
    for fig in figures:
        ax = fig.axes[0]
        assert len(ax.collections) <= 7 + 4  # per method + per kind and origin
        assert sum(len(c.get_offsets()) for c in ax.collections) == count
        texts = [t.get_text() for t in ax.texts]
        if count < plots.LABEL_LIMIT:
            assert "net 0" in texts and "M2" in texts
        else:
            assert len(texts) == 1 and texts[0] == (
                f"points not labelled (over {plots.LABEL_LIMIT}; the table names them): "
                f"133 published, 267 of ours")


# --------------------------------------------------------------------------- user CSV files

def test_user_points_csv(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("label,kind,top1,macs,params,base_top1,base_macs,note\n"
                    "R50 w0.5 (my lab),thin,74.1,1.052311552e9,6917640,,,\n"
                    "\n"
                    "my pruned,pruned,73.0,1.1e9,,76.0,4089184256,x\n"
                    "something,,70,9e8,,,,\n")
    a, b, c = points_from_csv(path)
    assert (a.kind, a.origin, a.top1, a.macs, a.params) == (THIN, USER, 74.1, 1_052_311_552,
                                                            6_917_640)
    assert (b.kind, b.base_top1, b.base_macs, b.delta_top1) == (PRUNED, 76.0, 4_089_184_256,
                                                                pytest.approx(-3.0))
    assert c.kind == OTHER and c.source == f"{path}:5"  # file lines, blank line counted


def test_points_at_several_resolutions_without_a_benchmark_get_a_warning(tmp_path):
    """Without --benchmark, a 48 px point and 32 px runs shared one MAC axis and one thin curve
    without a word (check_benchmark_fit covers only comparisons with a benchmark)."""
    path = tmp_path / "mine.csv"
    path.write_text("label,kind,top1,macs,resolution\n"
                    "a,other,70,1e6,32\nb,other,75,2e6,32\nc,other,76,4e6,32\n"
                    "d,pruned,72,2e6,48\ne,other,71,3e6,\n")
    c = report.build_comparison(points_csv=[path])
    assert c.warnings == ["points at several resolutions (32 px: a, b, ...; 48 px: d): their "
                          "top-1 and MACs are set against each other on one axis"]
    same = tmp_path / "same.csv"
    same.write_text("label,kind,top1,macs,resolution\na,other,70,1e6,32\nd,pruned,72,2e6,32\n"
                    "e,other,71,3e6,\n")
    assert report.build_comparison(points_csv=[same]).warnings == []


def test_points_and_latency_options_repeat_and_refuse_one_file_twice(tmp_path, capsys):
    """`--points a.csv --points b.csv` compared b.csv alone (argparse kept the last list), and
    one file given twice was each of its points twice."""
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("label,top1,macs\nmine a,50,1e6\n")
    b.write_text("label,top1,macs\nmine b,60,2e6\n")
    out = tmp_path / "cmp"
    assert compare_tool.main(["--points", str(a), "--points", str(b), "--out", str(out),
                              "--name", "x"]) == 0
    table = (out / "x-table.csv").read_text()
    assert "mine a" in table and "mine b" in table
    capsys.readouterr()
    again = tmp_path / "." / "a.csv"
    for option, path in (("--points", a), ("--latency", tmp_path / "lat.json")):
        assert compare_tool.main(["--points", str(a), option, str(path), str(again) if
                                  option == "--points" else str(path),
                                  "--out", str(tmp_path / "twice")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {option} ") and err.count("\n") == 1
        assert err.rstrip().endswith(f"the same file as {path}"), err
    assert not (tmp_path / "twice").exists()


def test_a_top1_of_zero_is_a_point(tmp_path):
    """tools/evaluate.py writes a diverged network's 0.0000; compare refused the file."""
    path = tmp_path / "pts.csv"
    path.write_text("label,top1,macs,base_top1\ndiverged,0.0000,1e6,0\n")
    (p,) = report.build_comparison(points_csv=[path]).points
    assert (p.top1, p.base_top1, p.delta_top1) == (0.0, 0.0, 0.0)


def test_a_run_of_an_unknown_model_is_named(tmp_path):
    """With several --runs, 'model.name ... is not a registered model' named none of them."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {name: resnet_foo, num_classes: 10}\n")
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_top1": 50.0}) + "\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(run / 'config.yaml'))}: model.name "
                                          r"'resnet_foo' is not a registered model"):
        report.build_comparison(runs=[run])


def test_a_baseline_smaller_than_its_point_is_a_warning(tmp_path):
    """base_macs below macs (the two columns swapped) gave a negative MAC reduction silently."""
    path = tmp_path / "pts.csv"
    path.write_text("label,kind,top1,macs,base_top1,base_macs\n"
                    "swapped,pruned,75,4.1e9,76,2.0e9\nright,pruned,75,2.0e9,76,4.1e9\n")
    c = report.build_comparison(points_csv=[path])
    rows = {r["label"]: r for r in c.rows}
    assert rows["swapped"]["mac_reduction_pct"] < 0 < rows["right"]["mac_reduction_pct"]
    assert c.warnings == [f"{path}:2: swapped has 4,100,000,000 MACs but its baseline "
                          f"(base_macs) only 2,000,000,000: a negative MAC reduction (macs and "
                          f"base_macs swapped?)"]


def test_thin_points_get_a_baseline_of_their_own_model_only(tmp_path):
    """A thin ResNet-18 of a file without a model column got the file's widest thin point, a
    ResNet-50, as its baseline (Δ -15 pp, MAC reduction 87 %), with nothing said."""
    path = tmp_path / "pts.csv"
    path.write_text("label,kind,top1,macs\nthin r18 w0.25,thin,60,0.13e9\n"
                    "thin r50 w0.5,thin,75,1.05e9\n")
    c = report.build_comparison(points_csv=[path])
    rows = {r["label"]: r for r in c.rows}
    assert rows["thin r18 w0.25"]["delta_top1"] is None
    assert c.warnings == ["thin points without a model (thin r18 w0.25, thin r50 w0.5): no Δ "
                          "baseline; give a points CSV a model column (or base_top1/base_macs)"]
    path.write_text("label,kind,top1,macs,model\nthin r18 w0.25,thin,60,0.13e9,r18\n"
                    "thin r18 w1,thin,70,1.8e9,r18\nthin r50 w0.5,thin,75,1.05e9,r50\n")
    c = report.build_comparison(points_csv=[path])
    rows = {r["label"]: r for r in c.rows}
    assert rows["thin r18 w0.25"]["delta_top1"] == pytest.approx(-10.0) and not c.warnings
    assert rows["thin r50 w0.5"]["delta_top1"] == 0


@pytest.mark.parametrize("text, message", [
    ("label,top1,macs\nx,abc,1e6\n", ":2: column top1: expected a number, got 'abc'"),
    ("label,top1,macs\nx,70,1e6\ny,101,1e6\n", ":3: column top1: must be in [0, 100], got 101"),
    ("label,top1,macs\nx,-0.5,1e6\n", ":2: column top1: must be in [0, 100], got -0.5"),
    ("label,top1,macs\nx,70,0\n", ":2: column macs: must be in (0, 1e18], got 0"),
    ("label,top1,macs\nx,70,\n", ":2: column macs: required, but empty"),
    ("label,top1,macs,kind\nx,70,1e6,teacher\n", ":2: column kind: must be one of thin"),
    ("label,top1,macs,flops\nx,70,1e6,1\n", ":1: unknown column 'flops'"),
    ("label,top1\nx,70\n", ":1: missing column 'macs'"),
    ("label,top1,macs\nx,70,1e6,5\n", ":2: more cells than the header's 3 columns"),
    ("label,top1,macs\nx,70,-5\n", ":2: column macs: must be in (0, 1e18], got -5"),
    # finite but absurd: the plots' log axes overflowed (a matplotlib traceback)
    ("label,top1,macs\nx,70,1e300\n", ":2: column macs: must be in (0, 1e18], got 1e300"),
    ("label,top1,macs,params\nx,70,1e6,1e19\n", ":2: column params: must be in (0, 1e18]"),
    # counts that round to 0 used to pass and crash the log axis (math domain error)
    ("label,top1,macs\nx,70,0.4\n", ":2: column macs: must be >= 1 after rounding to a whole "
                                     "count, got 0.4"),
    ("label,top1,macs\nx,70,1e-300\n", ":2: column macs: must be >= 1 after rounding"),
    ("label,top1,macs,params\nx,70,1e6,0.3\n", ":2: column params: must be >= 1 after"),
    ("label,top1,macs,base_macs\nx,70,1e6,0.5\n", ":2: column base_macs: must be >= 1 after"),
    ("label,top1,macs,top1\nx,70,1e6,71\n", ":1: column 'top1' appears more than once"),
    ("label,top1,macs\nA,70,1e6\nB,71,2e6\nA,72,3e6\n",
     ":4: column label: 'A' is already the label of line 2"),
    (b"label,top1,macs\nR\xe9sNet,70,1e6\n", ": not UTF-8 text (byte 0xe9 at offset 17)"),
    ("label,top1,macs\n\"" + "x" * 200_000 + "\",70,1e6\n",
     ": not a readable CSV file (field larger than field limit"),
    ("label,top1,macs\n", ": no points (a header but no rows)"),
    ("label,top1,macs\n\"A,50,1e9\nB,60,2e9\n", ":3: a quoted cell spans lines (an unclosed"),
])
def test_malformed_user_csv_names_file_line_and_column(tmp_path, text, message):
    path = tmp_path / "pts.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CompareError) as e:
        points_from_csv(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value), str(e.value)


def test_user_points_csv_with_a_byte_order_mark(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM; it is not part of the first column's name."""
    path = tmp_path / "excel.csv"
    path.write_text("label,top1,macs\nRésNet w0.5,70,1e6\n", encoding="utf-8-sig")
    (p,) = points_from_csv(path)
    assert (p.label, p.top1, p.macs) == ("RésNet w0.5", 70.0, 1_000_000)


def test_labels_are_unique_across_files(tmp_path):
    """A label shared between files gets the file name; files of the same name in two folders
    are numbered on top of that."""
    for folder in ("a", "b", "c"):
        (tmp_path / folder).mkdir()
        name = "other.csv" if folder == "c" else "pts.csv"
        (tmp_path / folder / name).write_text("label,kind,top1,macs\nA,thin,70,1e6\n"
                                              "B,thin,80,4e6\n")
    c = report.build_comparison(points_csv=[tmp_path / f / n for f, n in
                                            (("a", "pts.csv"), ("b", "pts.csv"),
                                             ("c", "other.csv"))])
    assert [p.label for p in c.points] == ["A [pts.csv]", "B [pts.csv]", "A [pts.csv] #2",
                                           "B [pts.csv] #2", "A [other.csv]", "B [other.csv]"]


# --------------------------------------------------------------------------- latency

def _row(**kw):
    row = {"kind": "latency", "status": "ok", "params": 10, "macs": 1000, "resolution": 16,
           "batch_size": 1, "latency_ms_p50": 2.0, "device_name": "cpu X", "threads": 1,
           "precision": "fp32", "layout": "channels_last", "mode": "eager",
           "torch_version": "2.x"}
    return {**row, **kw}


def test_latency_is_matched_by_architecture(tmp_path):
    rows = [_row(), _row(batch_size=8, latency_ms_p50=9.0), _row(params=20, macs=500,
                                                                 latency_ms_p50=1.0),
            _row(latency_ms_p50=2.5),  # appended later: wins
            _row(params=30, status="oom", latency_ms_p50=None)]
    path = tmp_path / "lat.json"
    path.write_text(json.dumps(rows))
    pts = [Point("a", THIN, "measured here", 50, 1000, 10, resolution=16),
           Point("b", PRUNED, "measured here", 50, 500, 20, resolution=16),
           Point("c", THIN, "measured here", 50, 1000, 10, resolution=32)]
    cond = attach_latency(pts, [path])
    assert [p.latency_ms for p in pts] == [2.5, 1.0, None]
    assert cond.batch_size == 1 and cond.threads == 1 and cond.files == (str(path),)
    attach_latency(pts, [path], batch_size=8)
    assert pts[0].latency_ms == 9.0
    # a --train record (images/s, no latency fields) is no latency file: said so, not
    # "missing field 'latency_ms_p50'"
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"kind": "train", "status": "ok", "images_per_s": 9.0}]))
    with pytest.raises(CompareError, match=f"^{train}: no successful inference rows$"):
        attach_latency(pts, [train])
    with pytest.raises(CompareError, match="no latency rows at batch size 4"):
        attach_latency(pts, [path], batch_size=4)
    path.write_text(json.dumps([_row(), _row(params=20, macs=500, threads=2)]))
    with pytest.raises(CompareError, match="different conditions: threads 1 and 2"):
        attach_latency(pts, [path])
    # fused, native and folded networks count alike but do not run alike
    path.write_text(json.dumps([_row(params=20, macs=500, norm_act="native"),
                                _row(norm_act="folded")]))
    with pytest.raises(CompareError, match="different conditions: norm_act 'folded' and "):
        attach_latency(pts, [path])
    path.write_text(json.dumps([_row(norm_act="native"), _row(norm_act="folded")]))
    with pytest.raises(CompareError, match="^a: latency rows of its network .* norm_act "
                                           "'native' and 'folded'; compare one"):
        attach_latency(pts, [path])
    # ... but networks no point has are no reason to refuse the file
    path.write_text(json.dumps([_row(norm_act="native"), _row(params=7, norm_act="native"),
                                _row(params=7, norm_act="folded")]))
    assert attach_latency(pts, [path]) is not None and pts[0].latency_ms == 2.0
    path.write_text(json.dumps([_row(), _row(params=20, macs=500, norm_act="native")]))
    with pytest.raises(CompareError, match="norm_act None and 'native'"):  # an older file
        attach_latency(pts, [path])
    # one network measured eager (its checkpoint) and torchscript (its exported file), in two
    # files: the file given last won, in silence
    scripted = tmp_path / "ts.json"
    scripted.write_text(json.dumps([_row(mode="torchscript", latency_ms_p50=0.9)]))
    path.write_text(json.dumps([_row()]))
    for files in ([path, scripted], [scripted, path]):
        with pytest.raises(CompareError, match="^a: latency rows of its network .* mode "
                                               "'(eager|torchscript)' and "
                                               "'(eager|torchscript)'; compare one"):
            attach_latency(pts, files)
    path.write_text(json.dumps([{"kind": "latency"}]))
    with pytest.raises(CompareError, match="row 1: missing field 'status'"):
        attach_latency(pts, [path])


# --------------------------------------------------------------------------- literature view

def test_a_closed_stdout_still_writes_the_outputs_and_exits_141(tmp_path, monkeypatch):
    """`compare.py ... | head -3`: rich turned the broken pipe into a silent exit 1."""
    pts = tmp_path / "mine.csv"
    pts.write_text("label,kind,top1,macs\nR56 w0.5,thin,92.0,31482176\n")
    monkeypatch.setattr(sys, "stdout", ReaderGone())
    assert compare_tool.main(["--points", str(pts), "--out", str(tmp_path / "out")]) == 141
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "compare-table.md" in written and "compare-table.csv" in written, written


def test_the_terminal_table_never_cuts_or_folds_a_number(tmp_path, monkeypatch, capsys):
    """At 80 columns the numbers were folded inside their cells (`10.1` over `6`)."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # the tool: a terminal
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: one too
    monkeypatch.setenv("COLUMNS", "80")
    pts = tmp_path / "mine.csv"
    pts.write_text("label,kind,top1,macs,params\n"
                   "R56 w0.5,thin,92.0,31482176,214546\nR56 w1,thin,94.0,125485696,853018\n")
    assert compare_tool.main(["--benchmark", "resnet56-cifar10", "--points", str(pts),
                              "--out", str(tmp_path / "out")]) == 0
    printed = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    c = report.build_comparison("resnet56-cifar10", points_csv=[str(pts)])
    header, cells = report.display_rows(c)
    numbers = [cell for row in cells for h, cell in zip(header, row)
               if h not in ("point", "kind", "origin", "from thin points") and cell]
    assert len(numbers) > 50
    for cell in numbers:
        assert re.search(rf"│ +{re.escape(cell)} +│", printed), (cell, printed)


def test_an_ascii_stdout_gets_ascii_stand_ins_and_an_aligned_table(tmp_path, monkeypatch):
    """PYTHONIOENCODING=ascii: `thin \\u2212 point` and `\\u0394 vs own base` widened the rows
    past rich's ASCII frame."""
    pts = tmp_path / "mine.csv"
    pts.write_text("label,kind,top1,macs,params\n"
                   "R56 w0.5,thin,92.0,31482176,214546\nR56 w1,thin,94.0,125485696,853018\n")
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert compare_tool.main(["--benchmark", "resnet56-cifar10", "--points", str(pts),
                              "--out", str(tmp_path / "out")]) == 0
    stdout.flush()
    printed = stdout.buffer.getvalue().decode("ascii")
    assert "thin - point > 0" in printed and "delta vs own base" in printed, printed
    assert "\\u" not in printed and "\\x" not in printed
    table = [line for line in printed.splitlines() if line[:1] in "+|"]
    assert len(table) >= 5 and len({len(line) for line in table}) == 1, printed


def test_literature_benchmark_plots_and_table(tmp_path):
    import matplotlib

    pts = tmp_path / "mine.csv"
    pts.write_text("label,kind,top1,macs,params\n"
                   "R56 w0.5,thin,92.0,31482176,214546\nR56 w1,thin,94.0,125485696,853018\n")
    salt = matplotlib.rcParams["svg.hashsalt"]
    assert compare_tool.main(["--benchmark", "resnet56-cifar10", "--points", str(pts),
                              "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert_images(out.glob("*.png"))
    assert_images(out.glob("*.svg"))
    # the SVGs' ids are stable (regenerated files diff clean) and the process's setting stays
    # (a notebook's own SVGs kept fasttrain's salt)
    first = {p.name: p.read_bytes() for p in out.glob("*.svg")}
    assert compare_tool.main(["--benchmark", "resnet56-cifar10", "--points", str(pts),
                              "--out", str(tmp_path / "out")]) == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.svg")} == first
    assert matplotlib.rcParams["svg.hashsalt"] == salt
    assert sorted(p.name for p in out.glob("*.png")) == [
        "resnet56-cifar10-delta-vs-reduction.png", "resnet56-cifar10-top1-vs-macs.png",
        "resnet56-cifar10-top1-vs-params.png"]
    rows = list(csv.DictReader(open(out / "resnet56-cifar10-table.csv")))
    lit = [r for r in rows if r["kind"] == "literature"]
    assert len(lit) == 23 and len(rows) == 25
    hrank = next(r for r in lit if r["label"] == "HRank (CVPR 2020)" and r["macs"] == "62720000")
    # user thin curve: 92 % at 31.48 M, 94 % at 125.49 M; HRank at 62.72 M, linear in log MACs
    t = math.log(62_720_000 / 31_482_176) / math.log(125_485_696 / 31_482_176)
    assert float(hrank["thin_top1_at_macs"]) == pytest.approx(92.0 + 2.0 * t)
    assert float(hrank["thin_minus_point"]) == pytest.approx(92.0 + 2.0 * t - 93.17)
    assert float(hrank["delta_top1"]) == pytest.approx(-0.09)
    md = (out / "resnet56-cifar10-table.md").read_text()
    assert "| HRank (CVPR 2020) | literature | published |" in md
    assert "R56 w0.5 | thin | user-provided" in md


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("argv, message", [
    (["--benchmark", "resnet18-imagenet"], "unknown benchmark 'resnet18-imagenet'"),
    (["--runs", "/no/such/run"], "/no/such/run: run directory not found"),
    # an existing checkpoint given for its run was "run directory not found"
    (["--runs", __file__], f"{__file__}: a file, not a run directory (give the folder"),
    ([], "nothing to compare"),
    (["--benchmark", "resnet56-cifar10", "--tolerance", "2"], "fraction in [0, 1)"),
    (["--benchmark", "resnet56-cifar10", "--latency", "/no/lat.json"], "cannot read latency"),
    # --name is a file-name stem: '../x' wrote outside --out, 'a/b' made a sub-folder
    *[(["--benchmark", "resnet56-cifar10", "--name", name],
       f"argument --name: name {name!r} is not a plain file-name stem")
      for name in ("../x", "a/b", "x/", "..", ".", "")],
    (["--benchmark", "resnet56-cifar10", "--out", ""], "argument --out: empty path"),
    (["--benchmark", ""], "argument --benchmark: empty value"),  # was "nothing to compare"
])
def test_cli_user_errors_exit_2_with_one_line(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    try:
        code = compare_tool.main(argv + ["--out", str(out)])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing written, in --out or beside it


def test_write_outputs_refuses_a_name_with_a_folder(tmp_path):
    c = report.build_comparison("resnet56-cifar10")
    with pytest.raises(CompareError, match="'sub/x' is not a plain file-name stem"):
        report.write_outputs(c, tmp_path / "out", "sub/x")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["a_file/plots", "a_file"])
def test_unwritable_out_folder_exits_2_with_one_line_before_any_work(tmp_path, capsys, out):
    """Checked before the points are gathered: a bad --runs folder is not reached."""
    (tmp_path / "a_file").write_text("kept")
    out = str(tmp_path / out)
    code = compare_tool.main(["--benchmark", "resnet56-cifar10", "--runs", str(tmp_path / "no"),
                              "--out", out])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --out {out}: {tmp_path / 'a_file'} is not a folder"
                          if out.endswith("plots") else
                          f"error: --out {out}: exists and is not a folder"), err
    assert (tmp_path / "a_file").read_text() == "kept"


def test_write_failure_names_the_folder(tmp_path, monkeypatch):
    """A failure while writing (disk full, folder removed meanwhile) still names the folder."""
    c = report.build_comparison("resnet56-cifar10")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(report.plots, "plot_top1", full)
    with pytest.raises(CompareError, match=rf"^{re.escape(str(tmp_path))}: cannot write the "
                                           rf"comparison \(No space left on device\)$"):
        report.write_outputs(c, tmp_path, None)


def test_a_full_disk_leaves_every_earlier_output_whole_and_names_the_file(tmp_path,
                                                                         monkeypatch):
    """The plots and tables were written in place: a full disk left a truncated PNG beside the
    earlier comparison's tables. Each file now replaces its earlier one only when whole."""
    from matplotlib.figure import Figure

    c = report.build_comparison("resnet56-cifar10")
    written = report.write_outputs(c, tmp_path, None)
    before = {p: p.read_bytes() for p in written}
    real = Figure.savefig

    def fills_the_disk(fig, fname, **kwargs):
        if kwargs.get("format") == "svg" or str(fname).endswith(".svg"):
            real(fig, fname, **kwargs)
            return
        partial = b"\x89PNG partial"
        if isinstance(fname, (str, os.PathLike)):
            with open(fname, "wb") as f:
                f.write(partial)
        else:
            fname.write(partial)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Figure, "savefig", fills_the_disk)
    png = tmp_path / "resnet56-cifar10-top1-vs-macs.png"
    with pytest.raises(CompareError, match=rf"^{re.escape(str(png))}: cannot write \(No space "
                                           rf"left on device\); the file is as it was$"):
        report.write_outputs(c, tmp_path, None)
    assert {p: p.read_bytes() for p in written} == before
    assert sorted(tmp_path.iterdir()) == sorted(written)  # no temporary file left


def test_an_output_file_that_is_a_link_folder_or_input_is_refused_first(tmp_path, capsys):
    """A symbolic link among the outputs was replaced by a plain file (one to /dev/null became
    a world-writable file), where every other tool refuses it."""
    points = tmp_path / "pts.csv"
    points.write_text("label,top1,macs\nmine,50,1e6\n")
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "target.md"
    target.write_text("kept")
    (out / "mine-table.md").symlink_to(target)
    (out / "compare-top1-vs-latency.svg").mkdir()
    cases = [(["--name", "mine"], f"--out {out}: mine-table.md: is a symbolic link (to "
                                  f"{target}); name the file itself"),
             ([], f"--out {out}: compare-top1-vs-latency.svg: is a folder"),
             (["--name", "p", "--points", str(out / "p-table.csv")],
              f"--out {out}: p-table.csv: is the input {out / 'p-table.csv'}")]
    (out / "p-table.csv").write_text("label,top1,macs\nmine,50,1e6\n")
    for argv, message in cases:
        code = compare_tool.main(["--points", str(points), "--out", str(out)] + argv)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {message}"), err
    assert sorted(p.name for p in out.iterdir()) == ["compare-top1-vs-latency.svg",
                                                     "mine-table.md", "p-table.csv"]
    assert target.read_text() == "kept" and (out / "mine-table.md").is_symlink()


def test_a_failed_write_keeps_the_earlier_latency_plot(tmp_path, monkeypatch):
    """The earlier comparison's latency plot was removed before the tables were written: a
    table write failing then lost it, though the error said the files were as they were."""
    c = report.build_comparison("resnet56-cifar10")
    stale = tmp_path / "resnet56-cifar10-top1-vs-latency.png"
    stale.write_bytes(b"earlier plot")

    def full(*args, **kwargs):
        raise CompareError("table: cannot write (No space left on device)")
    monkeypatch.setattr(report, "write_csv", full)
    with pytest.raises(CompareError, match="No space left"):
        report.write_outputs(c, tmp_path, None)
    assert stale.read_bytes() == b"earlier plot"
    monkeypatch.undo()
    report.write_outputs(c, tmp_path, None)
    assert not stale.exists()  # a comparison without latency removes it once written


def test_names_that_are_not_utf8_are_escaped_in_every_output(tmp_path, capsys):
    """A run folder or points file named in Latin-1 (Linux names are bytes): the CSV writer
    raised UnicodeEncodeError half-way (the table half-written), matplotlib a TypeError."""
    runs = []
    for name, top1 in ((b"r\xe9n", 60.0), (b"other", 70.0)):
        run = Path(os.fsdecode(bytes(tmp_path) + b"/" + name))
        run.mkdir()
        (run / "config.yaml").write_text("model: {name: cifar_resnet20, num_classes: 10, "
                                         "width: 0.25}\ndata: {val_res: 16}\n")
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_top1": top1}) + "\n")
        runs.append(str(run))
    points = Path(os.fsdecode(bytes(tmp_path) + b"/p\xe9.csv"))
    points.write_text("label,top1,macs\nmine,50,1e6\n")
    out = tmp_path / "cmp"
    assert compare_tool.main(["--runs", *runs, "--points", str(points), "--out", str(out),
                              "--name", "x"]) == 0
    table = (out / "x-table.csv").read_text()
    assert "r\\udce9n" in table and "p\\udce9.csv:2" in table
    markdown = (out / "x-table.md").read_text()
    assert "r\\udce9n" in markdown
    # runs are in it: the table says which top-1 a run's is
    assert ("top-1 of a run: its last complete epoch's validation top-1 of the model "
            "weights") in markdown
    # one run given twice was two points of one network ("#2")
    again = str(Path(runs[0]).parent / "." / Path(runs[0]).name)
    assert compare_tool.main(["--runs", runs[0], again, "--out", str(tmp_path / "twice")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --runs ") and err.count("\n") == 1
    assert err.rstrip().endswith("the same run directory as " + runs[0].replace("\udce9",
                                                                               "\\udce9"))
    assert not (tmp_path / "twice").exists()


def test_a_run_cut_inside_an_epoch_is_compared_by_its_last_complete_one(tmp_path):
    """A last metrics line of an epoch cut by train.max_steps (8 of 22 steps) was taken as the
    run's result, with nothing said; so was a run short of its schedule."""
    run = tmp_path / "cut"
    run.mkdir()
    (run / "config.yaml").write_text("model: {name: cifar_resnet20, num_classes: 10, width: "
                                     "0.25}\ndata: {val_res: 16}\nschedule: {epochs: 3}\n")
    (run / "metrics.jsonl").write_text(
        json.dumps({"epoch": 1, "val_top1": 50.0}) + "\n"
        + json.dumps({"epoch": 2, "val_top1": 60.0, "epoch_step": 8}) + "\n")
    warnings = []
    assert point_from_run(run, warnings).top1 == 50.0
    assert warnings == [f"{run}: epoch 2 was cut after 8 steps (train.max_steps): the last "
                        f"complete epoch's top-1 is used",
                        f"{run}: trained 1 of its 3 epochs: its top-1 is not its schedule's "
                        f"final one"]
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_top1": 5.0,
                                                   "epoch_step": 8}) + "\n")
    warnings = []
    assert point_from_run(run, warnings).top1 == 5.0
    assert "its partial epoch's top-1 is all there is" in warnings[0]
    assert warnings[1].startswith(f"{run}: trained 0 of its 3 epochs")
    # A full disk cut the third line short: compare refused the run ("not a metrics line"),
    # which still has two complete epochs and their checkpoint.
    (run / "metrics.jsonl").write_text(
        json.dumps({"epoch": 1, "val_top1": 50.0}) + "\n"
        + json.dumps({"epoch": 2, "val_top1": 60.0}) + "\n" + '{"epoch": 3, "val_to')
    warnings = []
    assert point_from_run(run, warnings).top1 == 60.0
    assert warnings[0] == (f"{run / 'metrics.jsonl'}: its last line is cut short (a write "
                           f"stopped by a crash or a full disk): passed over")
    # a complete line without its newline is a line
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 3, "val_top1": 70.0}))
    assert point_from_run(run, []).top1 == 70.0
    # a NaN (a hand edit: the trainer writes strict JSON) was a point, and the thin curve
    for bad in ("NaN", "1e999", "-1", "101"):
        (run / "metrics.jsonl").write_text('{"epoch": 3, "val_top1": %s}\n' % bad)
        with pytest.raises(CompareError, match=r"metrics.jsonl:1: val_top1 must be a "
                                               r"percentage in \[0, 100\], got "):
            point_from_run(run, [])


def test_runs_of_one_architecture_are_counted_once(tmp_path, monkeypatch):
    """Every run's model was built and its MACs traced again (~0.6 s a ResNet-50 run): a sweep
    of seeds spent most of a comparison recounting the same network."""
    import fasttrain.measure
    from fasttrain.compare import points as points_mod

    counted, real = [], fasttrain.measure.count_macs
    monkeypatch.setattr(points_mod, "_COUNTS", {}, raising=False)
    monkeypatch.setattr(fasttrain.measure, "count_macs",
                        lambda model, res: counted.append(res) or real(model, res))
    found = []
    for name, width, res in (("a", 0.25, 16), ("b", 0.25, 16), ("c", 0.5, 16), ("d", 0.25, 24)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(f"model: {{name: cifar_resnet20, num_classes: 10, "
                                         f"width: {width}, init_from: ''}}\n"
                                         f"data: {{val_res: {res}}}\n")
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_top1": 50.0}) + "\n")
        point = point_from_run(run, [])
        found.append((point.macs, point.params))
    assert counted == [16, 16, 24]
    assert found[0] == found[1] and len(set(found)) == 3
    assert found[2][1] > found[0][1] and found[3][1] == found[0][1]


def test_bad_points_file_and_run_directory_exit_2(tmp_path, capsys):
    bad = tmp_path / "p.csv"
    bad.write_text("label,top1,macs\nok,50,1e6\nbroken,fifty,1e6\n")
    assert compare_tool.main(["--points", str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {bad}:3: column top1: expected a number, got 'fifty'\n"
    run = tmp_path / "run"
    run.mkdir()
    assert compare_tool.main(["--runs", str(run), "--out", str(tmp_path)]) == 2
    assert "no config.yaml (not a fasttrain run directory)" in capsys.readouterr().err
    (run / "config.yaml").write_text("model: {name: cifar_resnet20, num_classes: 10}\n")
    assert compare_tool.main(["--runs", str(run), "--out", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (run / "metrics.jsonl").write_bytes(b'{"epoch": 1}\n\xff\n')
    assert compare_tool.main(["--runs", str(run), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: {run / 'metrics.jsonl'}: not UTF-8 text "
                                       f"(byte 0xff at offset 13)\n")
    latency = tmp_path / "lat.json"
    latency.write_bytes(b"\xff\xfe[]")
    (tmp_path / "ok.csv").write_text("label,top1,macs\nok,50,1e6\n")
    assert compare_tool.main(["--points", str(tmp_path / "ok.csv"), "--latency", str(latency),
                              "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.endswith(f"{latency}: not UTF-8 text (byte 0xff at offset "
                                            f"0)\n")


def test_labels_and_paths_are_printed_as_they_are(tmp_path, capsys):
    """Rich markup in the terminal output ate '[...]' (the run-folder suffix that tells equal
    labels apart) and raised MarkupError on '[/x]' after the files were written."""
    points = tmp_path / "p.csv"
    points.write_text("label,top1,macs\n[/x],60,1e9\nnet [run-a],61,2e9\n")
    out = tmp_path / "out[red]"
    assert compare_tool.main(["--points", str(points), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[/x]" in printed and "net [run-a]" in printed and f"wrote {out}" in printed


# --------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_thin_vs_pruned_end_to_end(data_root, tmp_path, monkeypatch, capsys):
    """Train two widths, prune the wider to the narrower's MACs, fine-tune one epoch, benchmark
    both, compare; every number in the table traced back to its input."""
    pytest.importorskip("torch_pruning")
    train_tool, prune_tool, bench_tool = (load_tool(n) for n in ("train", "prune", "benchmark"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTTRAIN_DATA", str(data_root))
    common = [str(QUICKSTART), "--log.dir=runs", "--log.progress=plain", "--train.threads=1",
              "--schedule.warmup_epochs=0"]
    assert train_tool.main(common + ["--log.name=w05", "--schedule.epochs=1",
                                     "--train.max_steps=8"]) == 0
    assert train_tool.main(common + ["--log.name=w025", "--model.width=0.25",
                                     "--schedule.epochs=1", "--train.max_steps=8"]) == 0
    assert prune_tool.main(["runs/w05/checkpoints/last.pt", "--out", "pruned.pt",
                            "--target-width", "0.25"]) == 0
    assert train_tool.main(common + ["--log.name=ft", "--model.init_from=pruned.pt",
                                     "--schedule.epochs=1", "--optim.lr=0.05"]) == 0
    # the fine-tuned network's export still says what it was pruned from (it said nothing)
    assert load_tool("export").main(["--checkpoint", "runs/ft/checkpoints/last.pt", "--out",
                                     "ft.pt"]) == 0
    from fasttrain.export import load_exported
    lineage = load_exported("ft.pt")[1]["pruning"]
    assert lineage["fine_tuned_from"] == str(tmp_path / "pruned.pt")
    assert lineage["source"] == str(tmp_path / "runs" / "w05" / "checkpoints" / "last.pt")
    for run in ("w025", "ft"):
        assert bench_tool.main(["--checkpoint", f"runs/{run}/checkpoints/last.pt", "--device",
                                "cpu", "--threads", "1", "--batch-size", "1", "--iters", "5",
                                "--warmup", "1", "--save", "--results-dir", "res"]) == 0
    (lat_file,) = Path("res").glob("latency-cpu1t-fp32-*-16px.json")
    capsys.readouterr()
    assert compare_tool.main(["--runs", "runs/w05", "runs/w025", "runs/ft", "--latency",
                              str(lat_file), "--out", "cmp", "--name", "digits"]) == 0
    printed = capsys.readouterr().out
    # the data set and resolution in the title: a plot passed around alone did not say them
    assert "ThinResNet vs pruned (digits, 16 px)" in printed, printed
    assert "cifar_resnet20 w0.25" in printed  # rich

    written = sorted(Path("cmp").iterdir())
    assert [p.name for p in written if p.suffix == ".png"] == [
        "digits-delta-vs-reduction.png", "digits-top1-vs-latency.png",
        "digits-top1-vs-macs.png", "digits-top1-vs-params.png"]
    assert_images(written)

    rows = {r["label"]: r for r in csv.DictReader(open("cmp/digits-table.csv"))}
    thin05, thin025 = rows["cifar_resnet20 w0.5"], rows["cifar_resnet20 w0.25"]
    pruned = rows["cifar_resnet20 w0.5 pruned (l1, global)"]
    lat = {r["source"]: r for r in json.loads(lat_file.read_text())}

    def last_top1(run):
        return json.loads(Path(f"runs/{run}/metrics.jsonl").read_text().splitlines()[-1])[
            "val_top1"]

    record = torch.load("pruned.pt", weights_only=True)["pruning"]
    assert float(thin025["top1"]) == pytest.approx(last_top1("w025"))
    assert float(thin05["top1"]) == pytest.approx(last_top1("w05"))
    assert float(pruned["top1"]) == pytest.approx(last_top1("ft"))
    assert (int(thin025["macs"]), int(thin025["params"])) == (654_496, 17_326)
    assert int(thin05["macs"]) == 2_562_368 and int(pruned["macs"]) == record["macs"]
    assert abs(int(pruned["macs"]) / 654_496 - 1) <= 0.05  # equal MACs within 5 %
    assert int(pruned["params"]) == record["params"] < 68_050
    assert float(thin025["latency_ms_p50"]) == pytest.approx(
        lat["runs/w025/checkpoints/last.pt"]["latency_ms_p50"])
    assert float(pruned["latency_ms_p50"]) == pytest.approx(
        lat["runs/ft/checkpoints/last.pt"]["latency_ms_p50"])
    assert thin05["latency_ms_p50"] == ""  # not benchmarked
    # The pruned point's baseline is the checkpoint it came from.
    assert float(pruned["base_top1"]) == pytest.approx(record["source_val_top1"])
    assert float(pruned["mac_reduction_pct"]) == pytest.approx(
        100 * (1 - record["macs"] / 2_562_368))
    # The thin curve at the pruned MACs, from the two thin points as the test computes it.
    front = pareto_front([(654_496, last_top1("w025")), (2_562_368, last_top1("w05"))])
    want, how = curve_value(front, record["macs"])
    if want is None:
        assert pruned["thin_top1_at_macs"] == ""
    else:
        assert pruned["thin_match"] == how
        assert float(pruned["thin_top1_at_macs"]) == pytest.approx(want)
        assert float(pruned["thin_minus_point"]) == pytest.approx(want - last_top1("ft"))
    md = Path("cmp/digits-table.md").read_text()
    assert "latency p50 ms (batch 1)" in md and "1 thread" in md
    # Again without latency into the same folder: the old latency plot (of these points, or of
    # others) must not stay beside the new comparison.
    assert compare_tool.main(["--runs", "runs/w025", "runs/ft", "--out", "cmp",
                              "--name", "digits"]) == 0
    assert not list(Path("cmp").glob("digits-top1-vs-latency.*"))
    # A digits run set against a CIFAR-10 benchmark at equal MACs: refused, not tabulated.
    capsys.readouterr()
    assert compare_tool.main(["--runs", "runs/w025", "--benchmark", "resnet56-cifar10",
                              "--out", "cmp2"]) == 2
    assert capsys.readouterr().err == ("error: runs/w025: trained on data.dataset=digits, but "
                                       "resnet56-cifar10 is on cifar10 (data.dataset=cifar10); "
                                       "compare it without --benchmark\n")


def test_table_cells_that_a_spreadsheet_would_run_are_made_inert(tmp_path):
    points = tmp_path / "p.csv"
    points.write_text('label,top1,macs\n"=HYPERLINK(""http://x/?""&A1)",50,1e6\n@SUM(1),51,2e6\n'
                      "plain,52,3e6\n")
    out = tmp_path / "cmp"
    assert compare_tool.main(["--points", str(points), "--out", str(out), "--name", "x"]) == 0
    labels = [r["label"] for r in csv.DictReader(open(out / "x-table.csv"))]
    assert sorted(labels) == ["'=HYPERLINK(\"http://x/?\"&A1)", "'@SUM(1)", "plain"], labels


def test_option_b_cifar_runs_are_another_model_than_option_a(tmp_path):
    """Option-A and option-B CIFAR ResNets were one thin model: an option-A w0.25 run's Δ was
    measured against an option-B w0.5 run, and both formed one thin curve."""
    from fasttrain import config as config_mod
    from fasttrain.compare.points import assign_thin_baselines, point_from_run
    from fasttrain.config import Config

    def run(name, shortcut, width, top1):
        cfg = Config()
        cfg.model.name, cfg.model.width, cfg.model.num_classes = "cifar_resnet20", width, 10
        cfg.model.shortcut = shortcut
        cfg.data.val_res = cfg.data.train_res = cfg.data.val_resize = 16
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.yaml").write_text(config_mod.dump(cfg))
        (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 90, "val_top1": top1}) + "\n")
        return point_from_run(folder, [])

    a_thin, a_wide, b_wide = (run("a25", "A", 0.25, 90.0), run("a50", "A", 0.5, 93.0),
                              run("b100", "B", 1.0, 97.0))
    assert (a_thin.model, b_wide.model) == ("cifar_resnet20", "cifar_resnet20 (shortcut B)")
    assert b_wide.label == "cifar_resnet20 (shortcut B) w1"
    assert assign_thin_baselines([a_thin, a_wide, b_wide]) == []
    assert (a_thin.base_top1, a_thin.base_macs) == (93.0, a_wide.macs)
    assert (b_wide.base_top1, b_wide.base_macs) == (97.0, b_wide.macs)


def test_published_cifar_points_are_set_against_the_option_a_thin_curve(tmp_path):
    """The literature's ResNet-56 has option-A shortcuts: with option-B thin points in the
    comparison, published points were measured against a curve of both."""
    csv_path = tmp_path / "ab.csv"
    csv_path.write_text("label,kind,model,width,top1,macs\n"
                        "A w0.5,thin,cifar_resnet56,0.5,91.0,32000000\n"
                        "A w1,thin,cifar_resnet56,1.0,93.0,125000000\n"
                        "B w0.5,thin,cifar_resnet56 (shortcut B),0.5,92.5,33000000\n"
                        "B w1,thin,cifar_resnet56 (shortcut B),1.0,94.0,127000000\n")
    c = report.build_comparison("resnet56-cifar10", points_csv=[csv_path])
    published = [r for r in c.rows if r["kind"] == LITERATURE and r["thin_points"]]
    assert published and all(r["model"] == "cifar_resnet56" for r in published)
    assert {r["thin_points"] for r in published} <= {"A w0.5", "A w1", "A w0.5 – A w1"}


def test_the_title_names_the_data_sets_and_resolutions_of_its_points():
    def point(dataset, resolution):
        return Point(label=f"{dataset}{resolution}", kind=THIN, origin=MEASURED, top1=90.0,
                     macs=10, dataset=dataset, resolution=resolution)

    def title(*points):
        return report.title(report.Comparison(None, list(points), [], [], None, 0.0))

    assert title(point("digits", 16), point("digits", 16)) == \
        "ThinResNet vs pruned (digits, 16 px)"
    assert title(point("imagenet", 224), point("imagenet", 160), point(None, None)) == \
        "ThinResNet vs pruned (imagenet, 160-224 px)"
    assert title(point("cifar10", None), point("digits", 32)) == \
        "ThinResNet vs pruned (cifar10, digits, 32 px)"
    assert title(point(None, None)) == "ThinResNet vs pruned"


def test_the_accuracy_change_carries_no_float_noise():
    """HRank's 93.26 - 90.72 was written to the table's CSV as -2.5400000000000063."""
    point = Point(label="p", kind=PRUNED, origin=USER, top1=90.72, macs=10, base_top1=93.26)
    assert point.delta_top1 == -2.54 and repr(point.delta_top1) == "-2.54"
    assert Point(label="t", kind=THIN, origin=USER, top1=1.0, macs=1).delta_top1 is None

