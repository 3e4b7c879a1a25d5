"""tools/evaluate.py and its library parts (fasttrain.measure.accuracy, build_val_loader):
a checkpoint evaluates to the top-1 its run recorded, exports and factories score alike, the
class order is the model's, and the points CSV it writes is the one compare reads."""
import importlib.util
import json
import os
import shutil
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from conftest import ROOT, ReaderGone, load_tool
from fasttrain.compare.points import points_from_csv
from fasttrain.config import load
from fasttrain.data import DatasetError, build_val_loader
from fasttrain.engine import train

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
evaluate_tool = load_tool("evaluate")


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory) -> Path:
    """A 2-epoch quickstart run with an EMA: checkpoints whose metrics record both top-1s."""
    log_dir = tmp_path_factory.mktemp("runs")
    cfg = load(QUICKSTART, [f"--data.path={data_root / 'digits'}", f"--log.dir={log_dir}",
                            "--log.progress=plain", "--log.name=ev", "--model.width=0.25",
                            "--schedule.epochs=2", "--schedule.warmup_epochs=0",
                            "--train.ema=true", "--train.ema_steps=1"])
    train(cfg, recipe=str(QUICKSTART))
    return log_dir / "ev"


def _last_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def _linear_factory(folder: Path, module: str, outputs: int, monkeypatch) -> None:
    """`module:build`, a linear classifier of 16x16 RGB images, importable from `folder`."""
    (folder / f"{module}.py").write_text(
        "import torch\n"
        "def build():\n"
        f"    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(768, {outputs}))\n")
    monkeypatch.chdir(folder)


def _evaluate(capsys, *args: str) -> tuple[int, str, str]:
    code = evaluate_tool.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("weights", ["model", "ema"])
def test_a_checkpoint_evaluates_to_the_top1_its_run_recorded(run, weights, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, out, err = _evaluate(capsys, "--checkpoint", run / "checkpoints" / "last.pt",
                               "--weights", weights, "--json", out_json)
    assert code == 0, err
    record = json.loads(out_json.read_text())
    metrics = _last_metrics(run)
    suffix = "" if weights == "model" else "_ema"
    # the run validated through the resident backend; this through the torch pipeline
    assert record["val_top1"] == metrics[f"val_top1{suffix}"]
    assert record["val_loss"] == pytest.approx(metrics[f"val_loss{suffix}"], rel=1e-6)
    assert record["images"] == 364 and record["classes"] == 10 and record["skipped"] == 0
    assert record["weights"] == weights and record["val_res"] == 16
    assert record["recorded"] == {"val_top1": metrics[f"val_top1{suffix}"], "epoch": 2,
                                  "epoch_step": None, "differences": [],
                                  "same_settings": True}
    assert record["val_classes"] == 10 and record["notes"] == []
    assert record["macs"] > 0 and record["params"] > 0 and record["device"] == "cpu"
    assert "(same settings)" in out and "top-1" in out
    # counts below a million exactly: a small network's were "0.068 M params, 0.7 M MACs"
    assert f"{record['params']:,} params, {record['macs']:,} MACs at 16px" in out, out


def test_a_cut_epoch_of_an_older_checkpoint_is_named(run, tmp_path, capsys):
    # before metrics lines carried epoch_step, a cut epoch's record read as a complete one
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    saved["train_state"].update(epoch=1, epoch_step=8)
    torch.save(saved, tmp_path / "cut.pt")
    saved["train_state"].update(epoch=2, epoch_step=3)  # checkpoint_every: inside epoch 3
    torch.save(saved, tmp_path / "inside.pt")
    code, out, err = _evaluate(capsys, "--checkpoint", tmp_path / "cut.pt")
    assert code == 0 and "after step 8 of epoch 2 (an epoch cut by train.max_steps)" in out
    code, out, err = _evaluate(capsys, "--checkpoint", tmp_path / "inside.pt")
    assert code == 0 and "after epoch 2: top-1" in out, out


def test_a_closed_stdout_still_writes_the_record_and_exits_141(run, tmp_path, monkeypatch):
    """`evaluate.py ... | head -1`: the result lines' BrokenPipeError was a traceback and
    --json was never written."""
    monkeypatch.setattr(sys, "stdout", ReaderGone())
    assert evaluate_tool.main(["--checkpoint", str(run / "checkpoints" / "last.pt"), "--json",
                               str(tmp_path / "r.json")]) == 141
    assert json.loads((tmp_path / "r.json").read_text())["images"] == 364


def test_overrides_change_the_measurement_and_the_output_says_so(run, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, out, err = _evaluate(capsys, "--checkpoint", run / "checkpoints" / "last.pt",
                               "--data.val_res=12", "--data.val_resize=14",
                               "--aug.test_flip=true", "--json", out_json)
    assert code == 0, err
    record = json.loads(out_json.read_text())
    assert (record["val_res"], record["val_resize"], record["test_flip"]) == (12, 14, True)
    assert record["recorded"]["same_settings"] is False
    assert "measured differently (data.val_res, data.val_resize, aug.test_flip)" in out


def test_an_export_and_a_factory_score_like_their_checkpoint(run, data_root, tmp_path, capsys,
                                                            monkeypatch):
    from fasttrain import export as ex

    last = run / "checkpoints" / "last.pt"
    model, meta = ex.model_from_checkpoint(last)
    script = tmp_path / "net.pt"
    ex.export_model(model, meta, "torchscript", script)
    (tmp_path / "myfactory.py").write_text(
        "from fasttrain.export import model_from_checkpoint\n"
        f"def build():\n    return model_from_checkpoint({str(last)!r})[0]\n")
    monkeypatch.chdir(tmp_path)
    data = [f"--data.path={data_root / 'digits'}"]
    top1 = _last_metrics(run)["val_top1"]
    exported = tmp_path / "net.pt2"  # torch.export: its mode is fixed (eval() raises)
    ex.export_model(model, meta, "export", exported)
    for source in (["--file", script], ["--file", exported], ["--factory", "myfactory:build"]):
        out_json = tmp_path / "r.json"
        code, _, err = _evaluate(capsys, *source, QUICKSTART, *data, "--json", out_json)
        assert code == 0, err
        record = json.loads(out_json.read_text())
        # BatchNorm folded into the convolutions moves logits by rounding only: at most one
        # near-tied image may change its answer
        assert abs(record["val_top1"] - top1) <= 100 / 364 + 1e-9, source
    assert record["val_top1"] == top1  # the factory's module is the checkpoint's network


@pytest.mark.skipif(importlib.util.find_spec("torch_pruning") is None,
                    reason="needs the [prune] extra")
def test_a_pruned_networks_row_sets_its_source_at_its_own_resolution(run, data_root, tmp_path,
                                                                     capsys):
    """Evaluated at 32 px, a pruned checkpoint's row took its source's MACs counted at the
    pruning's 16 px (compare: a -100 % MAC reduction); an exported pruned file's row had no
    baseline at all, though its metadata holds the pruning record."""
    from fasttrain import export as ex
    from fasttrain.compare import prune
    from fasttrain.measure import count_macs
    from fasttrain.models import create_model

    pruned = tmp_path / "pruned.pt"
    prune.prune_checkpoint(run / "checkpoints" / "last.pt", pruned, target_width=0.125)
    script = tmp_path / "pruned-script.pt"
    ex.export_model(*ex.model_from_checkpoint(pruned), "torchscript", script)
    points = tmp_path / "p.csv"
    at32 = ["--data.val_res=32", "--data.val_resize=32"]
    for label, source in (("at16", ["--checkpoint", pruned]),
                          ("at32", ["--checkpoint", pruned, *at32]),
                          ("file", ["--file", script, QUICKSTART,
                                    f"--data.path={data_root / 'digits'}"])):
        code, _, err = _evaluate(capsys, *source, "--points", points, "--label", label)
        assert code == 0, (label, err)
    rows = {p.label: p for p in points_from_csv(points)}
    source = create_model("cifar_resnet20", width=0.25, num_classes=10)
    assert rows["at16"].base_macs == count_macs(source, 16).conv_fc
    assert rows["at32"].base_macs == count_macs(source, 32).conv_fc
    assert rows["at32"].macs < rows["at32"].base_macs  # fewer than its source, at 32 px too
    import csv

    notes = {r["label"]: r["note"] for r in csv.DictReader(points.open(encoding="utf-8"))}
    assert "base top-1 measured at the pruning's resolution" in notes["at32"]
    assert "base top-1" not in notes["at16"] + notes["file"]
    assert (rows["file"].kind, rows["file"].base_macs, rows["file"].base_top1) == (
        "pruned", rows["at16"].base_macs, rows["at16"].base_top1)
    assert rows["file"].base_top1 == pytest.approx(_last_metrics(run)["val_top1"], abs=1e-4)


def test_a_file_evaluated_with_other_preprocessing_than_its_metadata_says_is_warned(
        run, data_root, tmp_path, capsys):
    """The recipe decides how --file's images are prepared: a recipe at 32 px for a network
    exported at 16 px gave 40 % instead of 99 % without a word."""
    from fasttrain import export as ex

    script = tmp_path / "net.pt"
    ex.export_model(*ex.model_from_checkpoint(run / "checkpoints" / "last.pt"), "torchscript",
                    script)
    data = f"--data.path={data_root / 'digits'}"
    code, _, err = _evaluate(capsys, "--file", script, QUICKSTART, data)
    assert code == 0 and "warning" not in err, err
    code, _, err = _evaluate(capsys, "--file", script, QUICKSTART, data, "--data.val_res=32",
                             "--data.val_resize=32", "--data.mean=[0.485,0.456,0.406]")
    assert code == 0, err
    lines = [l for l in err.splitlines() if l.startswith("warning:")]
    assert [l.split(" was exported for ")[1].split("=")[0] for l in lines] == [
        "data.val_res", "data.val_resize", "data.mean"], err
    assert lines[0] == (f"warning: {script} was exported for data.val_res=16, this evaluation "
                        f"uses 32 (the recipe's): its top-1 may not be the network's")
    # the metadata says whether the recorded top-1 averaged each image with its mirror
    _, meta = ex.model_from_checkpoint(run / "checkpoints" / "last.pt")
    assert meta["test_flip"] is False
    code, _, err = _evaluate(capsys, "--file", script, QUICKSTART, data, "--aug.test_flip=true")
    assert code == 0 and err.count("note: ") == 1, err
    assert "training validated with aug.test_flip=false, this evaluation uses true" in err


def test_a_file_or_factory_without_a_recipe_is_refused(tmp_path, capsys):
    code, _, err = _evaluate(capsys, "--factory", "mod:fn")
    assert code == 2 and err.count("\n") == 1 and "give the recipe" in err


def test_a_network_with_fewer_outputs_than_classes_is_refused(data_root, tmp_path, capsys,
                                                             monkeypatch):
    _linear_factory(tmp_path, "three", 3, monkeypatch)
    code, _, err = _evaluate(capsys, "--factory", "three:build", QUICKSTART,
                             f"--data.path={data_root / 'digits'}")
    assert code == 2 and err.count("\n") == 1
    assert "has 3 outputs" in err and "10 classes" in err


def test_points_rows_are_added_for_compare_and_a_repeated_label_is_refused(run, tmp_path,
                                                                          capsys):
    points = tmp_path / "mine.csv"
    ckpt = run / "checkpoints" / "last.pt"
    assert _evaluate(capsys, "--checkpoint", ckpt, "--points", points)[0] == 0
    code, _, err = _evaluate(capsys, "--checkpoint", ckpt, "--weights", "ema", "--points",
                             points, "--label", "mine ema", "--kind", "other")
    assert code == 0, err
    read = points_from_csv(points)
    assert [p.label for p in read] == ["ev", "mine ema"]
    metrics = _last_metrics(run)
    assert read[0].top1 == pytest.approx(metrics["val_top1"], abs=1e-4)
    assert read[1].top1 == pytest.approx(metrics["val_top1_ema"], abs=1e-4)
    assert (read[0].kind, read[0].model, read[0].width) == ("thin", "cifar_resnet20", 0.25)
    assert read[1].kind == "other" and read[0].macs == read[1].macs > 0
    before = points.read_bytes()
    code, _, err = _evaluate(capsys, "--checkpoint", ckpt, "--points", points)
    assert code == 2 and "labelled 'ev' exists" in err and points.read_bytes() == before
    other = tmp_path / "other.csv"
    other.write_text("name,score\nx,1\n")
    code, _, err = _evaluate(capsys, "--checkpoint", ckpt, "--points", other)
    assert code == 2 and "not a points CSV" in err and other.read_text() == "name,score\nx,1\n"
    # what compare refuses is refused here, not written: " ev" duplicated "ev" there, a label
    # of two lines spanned lines, a header name with a space was no column
    for label, why in ((" ev", "labelled 'ev' exists"),
                       ("a\nb", "--label 'a\\nb': a label is one non-empty line")):
        code, _, err = _evaluate(capsys, "--checkpoint", ckpt, "--points", points,
                                 "--label", label)
        assert code == 2 and why in err and points.read_bytes() == before, err
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("label, top1,macs\nx,50,1000\n")
    code, _, err = _evaluate(capsys, "--checkpoint", ckpt, "--points", spaced)
    assert code == 2 and "not a points CSV" in err
    # a file of the three required columns lost the row's kind, params and model; and a
    # private file became world-readable
    short = tmp_path / "short.csv"
    short.write_text("label,top1,macs\nx,50,1000\n")
    short.chmod(0o600)
    code, _, err = _evaluate(capsys, "--checkpoint", ckpt, "--points", short, "--kind", "other")
    assert code == 0, err
    x, ev = points_from_csv(short)
    assert (x.label, x.kind, x.params) == ("x", "other", None)
    assert (ev.kind, ev.model, ev.params) == ("other", "cifar_resnet20", read[0].params)
    assert short.read_text().splitlines()[0] == ("label,top1,macs,params,kind,model,width,"
                                                 "resolution,note")
    assert short.stat().st_mode & 0o777 == 0o600


def test_evaluations_adding_to_one_points_file_at_once_keep_every_row(tmp_path, monkeypatch):
    """Each evaluation reads the CSV and writes it back: two finishing together (xargs -P)
    both said "added", and the later write dropped the other's row. A waits inside its write
    until B has either written (no lock: B's row is then lost) or waits for A's lock."""
    import threading
    from argparse import Namespace

    from fasttrain.engine import checkpoint

    tool = load_tool("evaluate")
    points = tmp_path / "mine.csv"
    record = {"name": "cifar_resnet20", "width": 0.25, "val_top1": 50.0, "macs": 100,
              "params": 10, "val_res": 16, "source": "x.pt", "precision": "fp32",
              "test_flip": False, "commit": "abc"}
    a_writes, b_wrote, b_waits = threading.Event(), threading.Event(), threading.Event()
    real_write, real_lock = checkpoint.write_atomic, checkpoint.lock_folder

    def write_atomic(path, write, mode="wb"):
        if threading.current_thread().name == "A":
            a_writes.set()
            for _ in range(300):
                if b_wrote.is_set() or b_waits.is_set():
                    break
                threading.Event().wait(0.1)
        real_write(path, write, mode)
        if threading.current_thread().name == "B":
            b_wrote.set()

    def lock_folder(folder, *, wait):
        if wait and threading.current_thread().name == "B":
            b_waits.set()
        return real_lock(folder, wait=wait)

    monkeypatch.setattr(checkpoint, "write_atomic", write_atomic)
    monkeypatch.setattr(checkpoint, "lock_folder", lock_folder)
    errors = []

    def evaluate(label):
        args = Namespace(json=None, points=str(points), kind=None, file=None, label=label)
        try:
            tool._write(args, record, SimpleNamespace(meta={}), label)
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    a = threading.Thread(target=evaluate, args=("a",), name="A")
    a.start()
    assert a_writes.wait(60)
    b = threading.Thread(target=evaluate, args=("b",), name="B")
    b.start()
    a.join(60)
    b.join(60)
    assert not errors
    assert sorted(p.label for p in points_from_csv(points)) == ["a", "b"]


@pytest.mark.parametrize("header", [
    "label,top1,macs,params,kind,model,width,resolution,note",
    "label,top1,macs"])  # the short one is rewritten with the missing columns
def test_a_points_row_keeps_a_windows_files_line_ends(tmp_path, header):
    """A spreadsheet's CSV (byte-order mark, CRLF) was rewritten with LF line ends."""
    from argparse import Namespace

    tool = load_tool("evaluate")
    points = tmp_path / "excel.csv"
    cells = ",".join(["x", "50", "1000"] + [""] * (header.count(",") - 2))
    points.write_bytes(f"\ufeff{header}\r\n{cells}".encode())  # no final line end either
    row = {"label": "ev", "top1": "60.0000", "macs": 2000, "params": 10, "kind": "thin"}
    tool._add_point(Namespace(points=str(points)), points, row)
    data = points.read_bytes()
    assert data.startswith("\ufeff".encode()) and data.endswith(b"\r\n")
    assert data.count(b"\r\n") == data.count(b"\n") == 3
    assert [p.label for p in points_from_csv(points)] == ["x", "ev"]


def test_a_pruned_checkpoints_row_carries_its_baseline():
    meta = {"model_config": {"name": "thin_resnet50", "channels": {"stem": 8}},
            "pruning": {"source_val_top1": 76.1, "source_macs": 4_100_000_000}}
    record = {"name": "thin_resnet50 (pruned)", "width": None, "val_top1": 70.0,
              "macs": 2_000_000_000, "params": 10, "val_res": 224, "source": "p.pt",
              "precision": "bf16", "test_flip": False, "commit": "abc"}
    args = evaluate_tool.build_parser().parse_args(["--checkpoint", "p.pt"])
    row = evaluate_tool._point_row(args, record, SimpleNamespace(meta=meta), "p")
    assert (row["kind"], row["model"], row["base_top1"], row["base_macs"]) == (
        "pruned", "thin_resnet50", "76.1000", 4_100_000_000)
    meta = {"model_config": {"name": "cifar_resnet20", "width": 0.5, "shortcut": "B"}}
    record.update(name="cifar_resnet20", width=0.5)
    row = evaluate_tool._point_row(args, record, SimpleNamespace(meta=meta), "b")
    assert (row["kind"], row["model"]) == ("thin", "cifar_resnet20 (shortcut B)")  # its own


def test_the_same_data_folder_written_otherwise_is_the_same_setting(run, data_root, capsys,
                                                                   monkeypatch):
    monkeypatch.chdir(data_root)
    for path in (f"{data_root / 'digits'}/", "digits"):
        code, out, err = _evaluate(capsys, "--checkpoint", run / "checkpoints" / "last.pt",
                                   f"--data.path={path}")
        assert code == 0 and "(same settings)" in out, (path, out, err)


def test_a_dash_for_an_output_is_refused_not_written_as_a_file(tmp_path, monkeypatch, capsys):
    """`--json -` wrote a file named `-`; stdout shows the results, so `-` is refused."""
    monkeypatch.chdir(tmp_path)
    for flag in ("--json", "--points"):
        assert evaluate_tool.main(["--checkpoint", "c.pt", flag, "-"]) == 2
        assert capsys.readouterr().err == (f"error: {flag} -: writes a file, not stdout (where "
                                           f"the results are printed); name a file\n")
    assert list(tmp_path.iterdir()) == []


def test_an_output_that_is_the_factorys_module_is_refused(tmp_path, monkeypatch, capsys):
    """`--factory nets:build RECIPE --json nets.py` would replace the user's code."""
    _linear_factory(tmp_path, "nets", 10, monkeypatch)
    code = (tmp_path / "nets.py").read_text()
    for flag in ("--json", "--points"):
        assert evaluate_tool.main(["--factory", "nets:build", str(QUICKSTART), flag,
                                   "nets.py"]) == 2
        assert capsys.readouterr().err == (f"error: {flag} nets.py: is the input "
                                           f"{tmp_path / 'nets.py'}; name another file to "
                                           f"write\n")
    assert (tmp_path / "nets.py").read_text() == code


def test_bad_arguments_exit_2_with_one_line(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        evaluate_tool.main(["--file", "x.pt", "--weights", "ema"])
    assert e.value.code == 2 and "only a checkpoint holds EMA" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # it said "empty path"
        evaluate_tool.main(["--checkpoint", "x.pt", "--points", "p.csv", "--label", " "])
    assert capsys.readouterr().err == "error: argument --label: empty label\n"
    with pytest.raises(SystemExit) as e:
        evaluate_tool.main(["--file", "x.pt", "r.yaml", "stray"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:  # the 1 was taken for the recipe
        evaluate_tool.main(["--checkpoint", "c.pt", "--train.threads", "1"])
    assert e.value.code == 2
    assert "override '--train.threads': expected --section.key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        evaluate_tool.main(["--checkpoint", "c.pt", "--json", "o", "--points", "./o"])
    assert e.value.code == 2 and "name the same file" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = _evaluate(capsys, "--file", "x.pt", "r.yaml")
    assert code == 2 and "not torchrun" in err
    monkeypatch.setenv("RANK", "1")  # the other ranks exit 2 without repeating the line
    code, _, err = _evaluate(capsys, "--file", "x.pt", "r.yaml")
    assert (code, err) == (2, "")


def _folder(root: Path, split: str, classes: list[str]) -> None:
    for i, name in enumerate(classes):
        (root / split / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(root / split / name / f"{i}.jpg")


def test_the_validation_loader_labels_images_in_the_models_class_order(tmp_path):
    _folder(tmp_path, "train", ["a", "b", "c"])
    _folder(tmp_path, "val", ["b", "c"])
    cfg = load(None, ["--data.dataset=imagefolder", f"--data.path={tmp_path}",
                      "--data.num_workers=0", "--data.batch_size=4", "--data.val_res=8",
                      "--data.val_resize=8"])

    def labels(classes):
        loader, found, _ = build_val_loader(cfg.data, classes=classes)
        got = torch.cat([y for _, y in loader]).tolist()
        return found, got

    assert labels(None) == (["a", "b", "c"], [1, 2])  # train/'s sorted folders, as training
    assert labels(["c", "b", "a"]) == (["c", "b", "a"], [1, 0])
    with pytest.raises(DatasetError, match="classes the model was not trained on: b"):
        build_val_loader(cfg.data, classes=["a", "c"])
    for image in (tmp_path / "train").rglob("*.jpg"):
        image.unlink()
    for folder in (tmp_path / "train").iterdir():
        folder.rmdir()
    (tmp_path / "train").rmdir()
    assert labels(None) == (["b", "c"], [0, 1])  # no train/: val/'s own order


def test_outputs_that_are_not_regular_files_are_refused_before_evaluating(run, tmp_path,
                                                                         capsys):
    # written by a rename over the path: a pipe or a device (/dev/null) became a plain file
    pipe, kept, link = tmp_path / "pipe", tmp_path / "log.txt", tmp_path / "stdout"
    os.mkfifo(pipe)
    kept.write_text("a log\n")
    link.symlink_to(kept)  # as /dev/stdout -> /proc/self/fd/1 with stdout sent to a file
    for flag in ("--json", "--points"):
        for path, words in ((pipe, "exists and is not a regular file"),
                            (link, "is a symbolic link")):
            code, out, err = _evaluate(capsys, "--checkpoint",
                                       run / "checkpoints" / "last.pt", flag, path)
            assert code == 2 and words in err and out == ""
    assert stat.S_ISFIFO(os.stat(pipe).st_mode) and link.is_symlink()
    assert kept.read_text() == "a log\n"
    checkpoint = tmp_path / "last.pt"  # `--json` over the checkpoint evaluated replaced it
    shutil.copy(run / "checkpoints" / "last.pt", checkpoint)
    (tmp_path / "link.pt").symlink_to(checkpoint)
    for flag, path in (("--json", tmp_path / "." / "last.pt"), ("--points", checkpoint)):
        code, out, err = _evaluate(capsys, "--checkpoint", tmp_path / "link.pt", flag, path)
        assert code == 2 and out == "" and "is the input" in err, err
    assert checkpoint.read_bytes() == (run / "checkpoints" / "last.pt").read_bytes()
    recipe = tmp_path / "r.yaml"  # the recipe read: replaced by the JSON record
    shutil.copy(QUICKSTART, recipe)
    code, out, err = _evaluate(capsys, recipe, "--checkpoint", checkpoint, "--json", recipe)
    assert code == 2 and "is the input" in err and recipe.read_text() == QUICKSTART.read_text()


def test_a_partial_view_of_the_data_is_said(run, data_root, tmp_path, capsys):
    # two classes of the digits' validation images, no train/: the checkpoint's order labels
    # them; the output says how many classes the images cover and that data.path differs
    for name in ("3", "7"):
        shutil.copytree(data_root / "digits" / "val" / name, tmp_path / "sub" / "val" / name)
    code, out, err = _evaluate(capsys, "--checkpoint", run / "checkpoints" / "last.pt",
                               f"--data.path={tmp_path / 'sub'}", "--json", tmp_path / "c.json")
    assert code == 0, err
    assert "images of 2 of the model's 10 classes" in out
    assert "measured differently (data.path)" in out
    # an exported file carries the class names too: its labels are the checkpoint's
    from fasttrain import export as ex

    model, meta = ex.model_from_checkpoint(run / "checkpoints" / "last.pt")
    ex.export_model(model, meta, "torchscript", tmp_path / "net.pt")
    code, out, err = _evaluate(capsys, "--file", tmp_path / "net.pt", QUICKSTART,
                               f"--data.path={tmp_path / 'sub'}", "--json", tmp_path / "f.json")
    assert code == 0 and "warning" not in out, (out, err)
    checkpoint, exported = (json.loads((tmp_path / f).read_text()) for f in ("c.json", "f.json"))
    assert abs(exported["val_top1"] - checkpoint["val_top1"]) <= 100 / exported["images"] + 1e-9


def test_a_model_without_class_names_whose_outputs_differ_gets_a_warning(data_root, tmp_path,
                                                                        capsys, monkeypatch):
    _linear_factory(tmp_path, "twelve", 12, monkeypatch)
    code, out, err = _evaluate(capsys, "--factory", "twelve:build", QUICKSTART,
                               f"--data.path={data_root / 'digits'}")
    assert code == 0, err
    assert ("warning: the model has 12 outputs and no class names: labels follow the 10 sorted "
            "class folders") in out


def test_progress_is_reported_after_every_batch(run, capsys):
    from fasttrain.config import load_mapping
    from fasttrain.engine import checkpoint as ckpt
    from fasttrain.measure import sources
    from fasttrain.measure.accuracy import measure_accuracy

    path = run / "checkpoints" / "last.pt"
    state = ckpt.load(path)
    cfg = load_mapping(state["config"], "stored", ["--data.val_batch_size=100"])
    calls = []
    record = measure_accuracy(sources.from_checkpoint(path, state=state), cfg,
                              state["classes"], progress=lambda *a: calls.append(a))
    assert calls == [(100, 364), (200, 364), (300, 364), (364, 364)]
    assert record["val_top1"] == _last_metrics(run)["val_top1"]


def test_a_diverged_checkpoint_scores_0_as_compare_reads_it(run, tmp_path, capsys):
    """NaN weights give NaN logits, which topk ranks first: such a network scored ~10 % on the
    digits, a point compare would plot as a real result."""
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    saved["model"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v
                      for k, v in saved["model"].items()}
    torch.save(saved, tmp_path / "nan.pt")
    code, out, err = _evaluate(capsys, "--checkpoint", tmp_path / "nan.pt", "--json",
                               tmp_path / "r.json", "--points", tmp_path / "points.csv")
    assert code == 0, err
    record = json.loads((tmp_path / "r.json").read_text())
    assert (record["val_top1"], record["val_top5"], record["val_loss"]) == (0, 0, None)
    assert record["notes"] == ["the loss is not finite: images whose logits are NaN or inf "
                               "count as misses (NaN/inf weights or BatchNorm statistics: a "
                               "diverged run?)"]
    assert "warning: the loss is not finite" in out
    row = (tmp_path / "points.csv").read_text().splitlines()[1].split(",")
    header = (tmp_path / "points.csv").read_text().splitlines()[0].split(",")
    assert float(row[header.index("top1")]) == 0


def test_the_json_record_is_strict_even_for_a_diverged_network():
    record = {"val_loss": float("inf"), "mean": [0.5, float("nan")], "nested": {"x": 1.5}}
    assert evaluate_tool._finite(record) == {"val_loss": None, "mean": [0.5, None],
                                             "nested": {"x": 1.5}}
