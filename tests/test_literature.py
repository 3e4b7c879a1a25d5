"""The literature database (package data): every row parses, every derived number is right,
inconsistent rows are reported, malformed rows are one-line errors naming file, line, column."""
from __future__ import annotations

import csv
import filecmp
from pathlib import Path

import pytest

from fasttrain.compare import literature as lit

from conftest import REFERENCE

BASE = {"resnet50-imagenet": (4_089_184_256, 25_557_032),   # thinresnet_counts.csv, w1.0
        "resnet56-cifar10": (125_485_696, 853_018)}


def raw_rows():
    with open(lit.LITERATURE_CSV, newline="") as f:
        return [(i, r) for i, r in enumerate(csv.DictReader(f), start=2)]


def num(text):
    return float(text) if text.strip() else None


def test_package_data_are_the_reference_files():
    for name in ("pruning_literature.csv", "thinresnet_counts.csv"):
        if not (REFERENCE / name).exists():
            pytest.skip("../shared/reference is not next to this checkout")
        assert filecmp.cmp(lit.DATA / name, REFERENCE / name, shallow=False), name
    assert filecmp.cmp(lit.COUNTS_CSV, Path(__file__).parent / "data" / "thinresnet_counts.csv",
                       shallow=False)


def test_benchmarks_take_their_base_from_the_counts_table():
    assert lit.benchmark_names() == ["resnet50-imagenet", "resnet56-cifar10"]
    for name, (macs, params) in BASE.items():
        b = lit.get_benchmark(name)
        assert (b.base_macs, b.base_params) == (macs, params)
    r50 = lit.get_benchmark("resnet50-imagenet")
    assert (r50.model, r50.dataset, r50.resolution) == ("thin_resnet50", "imagenet", 224)
    assert [c.width for c in lit.thin_counts("cifar_resnet56")] == [0.25, 0.5, 0.75, 1.0]
    with pytest.raises(lit.CompareError, match="unknown benchmark 'resnet18-imagenet'; known: "
                                               "resnet50-imagenet, resnet56-cifar10"):
        lit.get_benchmark("resnet18-imagenet")


def test_every_row_parses_and_every_derived_number_is_right():
    loaded = lit.load_literature()
    rows = raw_rows()
    assert len(loaded.points) == len(rows) > 0  # nothing dropped
    for (line, r), p in zip(rows, loaded.points):
        base, base_params = BASE[r["benchmark"]]
        g, red, sp = num(r["pruned_gmacs"]), num(r["macs_reduction_pct"]), num(r["speedup"])
        assert p.line == line and p.method == r["method"] and p.top1 == float(r["pruned_top1"])
        assert p.benchmark == r["benchmark"] and p.source == r["source"]
        # MACs: stated GMACs, else from the reduction, else from the speed-up.
        want_macs = (round(g * 1e9) if g is not None else
                     round(base * (1 - red / 100)) if red is not None else
                     round(base / sp) if sp is not None else None)
        assert p.macs == want_macs, line
        # Reduction: stated, else from stated GMACs, else from the speed-up.
        want_red = (red if red is not None else
                    100 * (1 - g * 1e9 / base) if g is not None else
                    100 * (1 - 1 / sp) if sp is not None else None)
        assert p.macs_reduction_pct == (None if want_red is None else
                                        pytest.approx(want_red, rel=1e-12)), line
        # Speed-up: stated, else from the stated reduction, else base / GMACs.
        want_sp = (sp if sp is not None else
                   1 / (1 - red / 100) if red is not None else
                   base / (g * 1e9) if g is not None else None)
        assert p.speedup == (None if want_sp is None else pytest.approx(want_sp, rel=1e-12))
        b = num(r["base_top1"])
        assert p.base_top1 == b
        assert p.delta_top1 == (None if b is None else pytest.approx(p.top1 - b, abs=1e-9))
        params = num(r["pruned_params_m"])
        assert p.params == (None if params is None else round(params * 1e6))
        assert p.params is None or 0 < p.params < base_params
        assert p.macs is None or 0 < p.macs < base
        assert set(p.derived) == ({"macs"} if g is None and (red or sp) else set()) | \
            ({"macs_reduction_pct"} if red is None and p.macs else set()) | \
            ({"speedup"} if sp is None and p.macs else set()) | \
            ({"delta_top1"} if b is not None else set())


def test_hand_computed_rows():
    by_line = {p.line: p for p in lit.load_literature().points}
    sfp = by_line[2]  # reduction and speed-up stated; MACs from the reduction
    assert sfp.macs == 2_375_816_053 and sfp.stated == ("reduction", "speedup")
    assert sfp.delta_top1 == pytest.approx(-1.54)
    gal = by_line[20]  # only GMACs: reduction and speed-up from the base 4.089 G
    assert gal.macs == 2_330_000_000 and gal.base_top1 is None and gal.delta_top1 is None
    assert gal.macs_reduction_pct == pytest.approx(43.0204, abs=1e-4)
    assert gal.speedup == pytest.approx(1.75501, abs=1e-5)
    kse = by_line[58]  # GMACs and speed-up stated (ResNet-56)
    assert kse.macs == 60_000_000 and kse.speedup == 2.09
    assert kse.macs_reduction_pct == pytest.approx(52.186, abs=1e-3)
    assert by_line[40].macs is None and by_line[40].top1 == 75.14  # ThiNet: no MAC figure


def test_inconsistent_and_incomplete_rows_are_warned_about_by_line():
    loaded = lit.load_literature()
    lines = sorted(int(w.split(":")[1]) for w in loaded.warnings)
    # CHIP r50 2.19 G vs 48.7 % (+4.4 %); HRankPlus and CHIP r56 0.03478 G vs 74.1 % (+7.0 %);
    # ThiNet-70 scratch-B states no MAC figure. Every other row agrees within 1 %.
    assert lines == [29, 40, 61, 63]
    assert "+4.4%" in loaded.warnings[0] and "pruned_gmacs=2.19" in loaded.warnings[0]
    assert "no MAC figure" in loaded.warnings[1]
    c56 = lit.load_literature(benchmark="resnet56-cifar10")
    assert {p.benchmark for p in c56.points} == {"resnet56-cifar10"}
    assert sorted(int(w.split(":")[1]) for w in c56.warnings) == [61, 63]
    assert lit.load_literature(tolerance=0.10).warnings == [loaded.warnings[1]]


GOOD = ("resnet56-cifar10,X,Y 2020,93.0,92.5,0.06,,,0.4,somewhere,")


@pytest.mark.parametrize("row, message", [
    ("resnet56-cifar10,X,Y 2020,93.0,abc,0.06,,,0.4,somewhere,",
     ":3: column pruned_top1: expected a number, got 'abc'"),
    ("resnet18-imagenet,X,Y 2020,93.0,92.5,0.06,,,0.4,somewhere,",
     ":3: column benchmark: unknown benchmark 'resnet18-imagenet'"),
    ("resnet56-cifar10,X,Y 2020,93.0,101,0.06,,,,somewhere,",
     ":3: column pruned_top1: must be <= 100, got 101"),
    ("resnet56-cifar10,X,Y 2020,93.0,92.5,0.2,,,,somewhere,",
     ":3: column pruned_gmacs: must be < 0.125486, got 0.2"),
    ("resnet56-cifar10,X,Y 2020,93.0,92.5,,100,,,somewhere,",
     ":3: column macs_reduction_pct: must be < 100, got 100"),
    ("resnet56-cifar10,X,Y 2020,93.0,92.5,,,0.9,,somewhere,",
     ":3: column speedup: must be > 1, got 0.9"),
    ("resnet56-cifar10,,Y 2020,93.0,92.5,0.06,,,,somewhere,", ":3: column method: required"),
    ("resnet56-cifar10,X,Y 2020,93.0,92.5,0.06,,,,somewhere,,extra",
     ":3: more cells than the 11 columns"),
])
def test_malformed_rows_name_file_line_and_column(tmp_path, row, message):
    path = tmp_path / "lit.csv"
    path.write_text(",".join(lit.COLUMNS) + "\n" + GOOD + "\n" + row + "\n")
    with pytest.raises(lit.LiteratureError) as e:
        lit.load_literature(path)
    assert str(e.value).startswith(f"{path}:3") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_header_and_missing_file(tmp_path):
    path = tmp_path / "lit.csv"
    path.write_text("benchmark,method,top1\n")
    with pytest.raises(lit.LiteratureError, match=r"lit.csv:1: header must be .*missing venue"):
        lit.load_literature(path)
    with pytest.raises(lit.LiteratureError, match="cannot read literature CSV"):
        lit.load_literature(tmp_path / "none.csv")
    path.write_text(",".join(lit.COLUMNS) + "\n" + GOOD + "\n\n")
    (p,) = lit.load_literature(path).points  # blank lines are skipped
    assert p.macs == 60_000_000 and p.params == 400_000
