"""fasttrain.export, tools/export.py and hubconf.py: BatchNorm folding, export parity for
TorchScript / torch.export / ONNX, metadata, loading in a fresh process with plain torch."""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import io
import json
import os
import pickle
import re
import stat
import subprocess
import sys
import textwrap
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from fasttrain import export as ex

from conftest import ReaderGone, load_tool
from fasttrain.config import ModelConfig
from fasttrain.models import NORM_ACT_LAYERS, BatchNormReLU2d, list_models

ROOT = Path(__file__).resolve().parents[1]


export_tool = load_tool("export")


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding has something to fold
    (fresh BNs are the identity, and zero-init residual gammas would hide the residual convs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.3)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def small_model(name="cifar_resnet20", width=0.25, **kw):
    model, meta = ex.model_from_name(name, width, resolution=16, **kw)
    return randomize_bn(model), meta


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --------------------------------------------------------------------------- folding

@pytest.mark.parametrize("name", list_models())
def test_folding_equals_the_unfolded_network(name):
    model, _ = ex.model_from_name(name, 0.5)
    randomize_bn(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    n_bn_relu = sum(isinstance(m, BatchNormReLU2d) for m in model.modules())
    relus_before = sum(type(m) is nn.ReLU for m in model.modules())
    folded, n = ex.fold_bn(model)
    assert n == n_bn  # every norm of a ThinResNet follows a conv, downsample branches included
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(type(m) is nn.ReLU for m in folded.modules()) == relus_before + n_bn_relu
    assert any(isinstance(m, BatchNormReLU2d) for m in model.modules())  # input untouched
    res = 16 if name.startswith("cifar_") else 32
    x = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model.eval()(x), folded(x)
    assert max_rel(got, want) < 1e-5


@pytest.mark.parametrize("norm_act", sorted(NORM_ACT_LAYERS))
def test_folding_turns_every_norm_act_choice_into_relu(norm_act):
    model, meta = small_model(norm_act=norm_act)
    assert meta["norm_act"] == norm_act
    folded, n = ex.fold_bn(model)
    assert n == 19 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert max_rel(folded(x), model(x)) < 1e-5


def test_folding_covers_option_b_shortcuts_and_leaves_shared_convs_alone():
    model, _ = small_model(shortcut="B")
    folded, n = ex.fold_bn(model)
    assert n == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert max_rel(folded(x), model(x)) < 1e-5

    class TwoUses(nn.Module):  # the conv's output also feeds the sum: folding would change it
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    net = randomize_bn(TwoUses()).eval()
    folded, n = ex.fold_bn(net)
    assert n == 0 and isinstance(folded.bn, nn.BatchNorm2d)


# --------------------------------------------------------------------------- export and parity

@pytest.mark.parametrize("fmt", ["torchscript", "export", "onnx"])
def test_export_parity_and_metadata(fmt, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    model, meta = small_model()
    out = tmp_path / f"net{ex.FORMATS[fmt]}"
    parity, written = ex.export_model(model, meta, fmt, out)
    assert parity.ok and parity.batch_sizes == (1, 3) and parity.max_rel < 1e-5
    assert written["bn_folded"] == 19 and written["format"] == fmt
    run, stored = ex.load_exported(out)
    for key in ("model", "width", "num_classes", "input_size", "mean", "std", "training_commit",
                "bn_folded", "export_commit", "torch_version"):
        assert stored[key] == written[key], key
    assert stored["model"] == "cifar_resnet20" and stored["input_size"] == [3, 16, 16]
    if fmt == "onnx":
        assert stored["onnx_opset"] == ex.ONNX_OPSET
    x = torch.randn(5, 3, 16, 16)  # a batch size the parity check did not use
    with torch.no_grad():
        assert max_rel(run(x), model(x)) < 1e-5
    # The architecture can be rebuilt from the metadata alone (the benchmark counts MACs so).
    assert sum(p.numel() for p in ex.model_from_metadata(stored).parameters()) == \
        sum(p.numel() for p in ex.fold_bn(model)[0].parameters())


def test_an_onnx_export_without_folding_keeps_its_batchnorm_nodes(tmp_path):
    """--no-fold wrote an ONNX graph without one BatchNormalization node (the exporter's
    optimizer fused them) while its metadata said none was folded."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    model, meta = small_model()
    ops = {}
    for fold in (True, False):
        out = tmp_path / f"fold{fold}.onnx"
        parity, written = ex.export_model(model, meta, "onnx", out, fold=fold)
        assert parity.ok and written["bn_folded"] == (19 if fold else 0)
        ops[fold] = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert ops[True]["BatchNormalization"] == 0 and ops[False]["BatchNormalization"] == 19
    # constants still folded: 87 nodes here against 56 folded; the unoptimised graph had 240
    assert sum(ops[False].values()) < 100, ops[False]


@pytest.mark.slow
def test_torchscript_file_loads_in_a_fresh_process_without_fasttrain(tmp_path):
    model, meta = small_model()
    path = tmp_path / "net.pt"
    ex.export_model(model, meta, "torchscript", path)
    x = torch.randn(2, 3, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    code = textwrap.dedent(f"""
        import json, sys, torch
        extra = {{"fasttrain.json": ""}}
        model = torch.jit.load({str(path)!r}, _extra_files=extra)
        meta = json.loads(extra["fasttrain.json"])
        with torch.no_grad():
            out = model(torch.load({str(tmp_path / 'x.pt')!r}))
        torch.save(out, {str(tmp_path / 'out.pt')!r})
        print(json.dumps({{"fasttrain_imported": any(m.split(".")[0] == "fasttrain"
                                                     for m in sys.modules),
                           "model": meta["model"], "mean": meta["mean"]}}))
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report == {"fasttrain_imported": False, "model": "cifar_resnet20",
                      "mean": [0.485, 0.456, 0.406]}
    with torch.no_grad():
        assert max_rel(torch.load(tmp_path / "out.pt"), model(x)) < 1e-5


def test_a_model_with_nan_weights_is_refused_before_exporting(tmp_path, monkeypatch):
    """A diverged run's NaN weights were reported as a failed parity check, blamed on the
    export, and no failed file was kept although the message's kind promises one."""
    model, meta = small_model()
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    with pytest.raises(ex.ExportError, match=r"^the model's own output is not finite \(NaN or "
                                             r"inf weights or BatchNorm statistics"):
        ex.export_model(model, meta, "torchscript", tmp_path / "net.pt")
    assert list(tmp_path.iterdir()) == []
    # an output of another shape, or not finite, from the file alone: kept like a mismatch
    model, meta = small_model()

    def other_shape(*args, **kwargs):
        raise ex.ParityError("exported output shape (1, 9) != eager (1, 10) at batch 1")

    monkeypatch.setattr(ex, "check_parity", other_shape)
    with pytest.raises(ex.ParityError, match=r"net.pt: exported output shape \(1, 9\) != eager "
                                             r"\(1, 10\) at batch 1; written as .*"
                                             r"net.parity-failed.pt for inspection"):
        ex.export_model(model, meta, "torchscript", tmp_path / "net.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.parity-failed.pt"]


def test_parity_failure_raises(tmp_path, monkeypatch):
    model, meta = small_model()
    real_fold = ex.fold_bn

    def broken_fold(m):
        folded, n = real_fold(m)
        with torch.no_grad():
            folded.fc.bias.add_(1.0)
        return folded, n

    good = tmp_path / "net.pt"
    ex.export_model(model, meta, "torchscript", good)
    before = good.read_bytes()
    monkeypatch.setattr(ex, "fold_bn", broken_fold)
    with pytest.raises(ex.ParityError, match="differs from eager.*net.pt left as it was"):
        ex.export_model(model, meta, "torchscript", good)
    # The earlier good file is untouched; the failed one is kept beside it, nothing else.
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.parity-failed.pt", "net.pt"]
    run, _ = ex.load_exported(tmp_path / "net.parity-failed.pt")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (run(x) - model(x)).abs().max() > 0.5  # it is the broken export
    # The command line turns it into exit status 1 and one line.
    code = export_tool.main(["--model", "cifar_resnet20", "--width", "0.25", "--out",
                             str(tmp_path / "bad2.pt")])
    assert code == 1 and not (tmp_path / "bad2.pt").exists()


def test_a_closed_stdout_still_writes_the_export_and_exits_141(tmp_path, monkeypatch):
    """`export.py ... | head -1`: the second line's BrokenPipeError was a traceback."""
    monkeypatch.setattr(sys, "stdout", ReaderGone())
    assert export_tool.main(["--model", "cifar_resnet20", "--width", "0.25", "--resolution",
                             "16", "--out", str(tmp_path / "net.pt")]) == 141
    assert ex.load_exported(tmp_path / "net.pt")[1]["input_size"] == [3, 16, 16]


def test_export_model_takes_the_cifar_shortcut_option(tmp_path, capsys):
    # option B (1x1 projections) is another architecture: only checkpoints could export it
    for shortcut in ("A", "B"):
        out = tmp_path / f"net-{shortcut}.pt"
        assert export_tool.main(["--model", "cifar_resnet20", "--width", "0.25", "--shortcut",
                                 shortcut, "--out", str(out)]) == 0
        assert (f"cifar_resnet20{' (shortcut B)' if shortcut == 'B' else ''} w0.25, 10 classes"
                in capsys.readouterr().out)
        run, meta = ex.load_exported(out)
        assert meta["shortcut"] == meta["model_config"]["shortcut"] == shortcut
        projections = [n for n, _ in run.named_parameters() if ".downsample." in n]
        assert bool(projections) == (shortcut == "B"), projections


def test_a_failed_write_leaves_no_file_behind(tmp_path, monkeypatch):
    model, meta = small_model()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.export, "save", full_disk)
    with pytest.raises(ex.ExportError, match=r"net.pt2: cannot write \(No space left"):
        ex.export_model(model, meta, "export", tmp_path / "net.pt2")
    assert list(tmp_path.iterdir()) == []
    # the tool also removes the folders it made for --out
    assert export_tool.main(["--model", "cifar_resnet20", "--width", "0.25", "--resolution",
                             "16", "--out", str(tmp_path / "new" / "deep" / "net.pt2")]) == 2
    assert list(tmp_path.iterdir()) == []


def test_a_torch_export_file_of_any_suffix_case_loads_without_a_warning(tmp_path, capfd):
    # torch logs "Unable to load package ... a file ending in .pt2" for a name it does not
    # recognise (A.PT2, and the temporary name of --format export --out x.bin), then loads it.
    model, meta = small_model()
    for name in ("A.PT2", "b.bin"):
        ex.export_model(model, meta, "export", tmp_path / name)
        run, loaded = ex.load_exported(tmp_path / name, "export")
        assert loaded["format"] == "export"
    err = capfd.readouterr().err
    assert "Unable to load package" not in err, err


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["export", "onnx"])
def test_unfolded_fused_norm_act_exports_without_the_native_op(fmt, tmp_path, monkeypatch):
    # With --no-fold the fused kernel's layers stay; the file must not call torch.ops.fasttrain,
    # which a plain-torch (or onnxruntime) reader does not have.
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    from fasttrain.ops.bn_relu import BatchNormReLU2d as Fused

    model, meta = ex.model_from_name("cifar_resnet20", 0.25, resolution=16, norm_act="fused")
    model = randomize_bn(model).eval()
    out = tmp_path / f"net{ex.FORMATS[fmt]}"
    references = []  # the parity check compared the file with itself (0 difference), not
    real_check = ex.check_parity  # with the fused network it replaces

    def check_parity(reference, *args, **kwargs):
        references.append(sum(isinstance(m, Fused) for m in reference.modules()))
        return real_check(reference, *args, **kwargs)

    monkeypatch.setattr(ex, "check_parity", check_parity)
    parity, written = ex.export_model(model, meta, fmt, out, fold=False)
    assert parity.ok and written["bn_folded"] == 0
    assert references == [sum(isinstance(m, Fused) for m in model.modules())] and references[0]
    if fmt == "export":
        ep = torch.export.load(str(out))
        targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert not any("fasttrain" in t for t in targets), targets
        assert any("batch_norm" in t for t in targets), targets
        # the file holds the native math: measured rows say so, not its training's "fused"
        from fasttrain.measure import sources
        assert sources.from_file(out).norm_act == "native"


def test_with_plain_norm_act_keeps_the_math_and_the_state():
    model, _ = ex.model_from_name("cifar_resnet20", 0.25, norm_act="fused")
    model = randomize_bn(model).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = ex.with_plain_norm_act(model)
    kinds = {type(m) for m in plain.modules() if isinstance(m, nn.BatchNorm2d)}
    assert kinds == {NORM_ACT_LAYERS["native"], nn.BatchNorm2d}  # BN before a residual add
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())
    with torch.no_grad():
        assert max_rel(plain(x), want) < 1e-6


# --------------------------------------------------------------------------- checkpoints and CLI

def _checkpoint(tmp_path, name="cifar_resnet20", width=0.25, num_classes=7) -> Path:
    from fasttrain.config import Config
    from fasttrain.models import create_model

    cfg = Config()
    cfg.model.name, cfg.model.width, cfg.model.num_classes = name, width, num_classes
    cfg.data.val_res, cfg.data.mean, cfg.data.std = 24, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    model = randomize_bn(create_model(name, width=width, num_classes=num_classes))
    path = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(),
                "versions": {"torch": str(torch.__version__), "commit": "abc1234"},
                "train_state": {"epoch": 3}}, path)
    return path


def test_export_cli_from_a_checkpoint(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "exported.pt"
    assert export_tool.main(["--checkpoint", str(ckpt), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "torchscript, script" in text and "19 BatchNorm folded" in text and ": ok" in text
    _, meta = ex.load_exported(out)
    assert (meta["num_classes"], meta["input_size"], meta["mean"], meta["std"],
            meta["training_commit"], meta["checkpoint_epoch"]) == \
        (7, [3, 24, 24], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], "abc1234", 3)


def test_benchmark_runs_an_exported_file(tmp_path):
    from fasttrain.measure import bench, sources

    model, meta = small_model()
    path = tmp_path / "net.pt2"
    ex.export_model(model, meta, "export", path)
    bm = sources.from_file(path)
    assert (bm.name, bm.width, bm.resolution) == ("cifar_resnet20", 0.25, 16)
    (row,) = bench.run([bm], bench.Conditions(iters=1, warmup=1), [2])
    assert row["status"] == "ok" and row["macs"] == ex_macs(model, 16)
    with pytest.raises(bench.BenchError, match="exported file"):
        bench.Conditions(mode="compile").check([bm])


def ex_macs(model, res):
    from fasttrain.measure import count_macs
    return count_macs(model, res).conv_fc


@pytest.mark.parametrize("argv, message", [
    (["--model", "thin_resnet5", "--out", "x.pt"], "did you mean 'thin_resnet50'"),
    (["--checkpoint", "/no/such.pt", "--out", "x.pt"], "checkpoint not found"),
    (["--model", "cifar_resnet20", "--out", "x.bin"], "unknown export format"),
    (["--checkpoint", "c.pt", "--width", "0.5", "--out", "x.pt"], "--model only"),
    (["--model", "cifar_resnet20", "--format", "tflite", "--out", "x.pt"], "--format"),
    (["--out", "x.pt"], "required"),
    (["--model", "cifar_resnet20", "--num-classes", "0", "--out", "x.pt"],
     "--num-classes: expected an integer >= 1, got 0"),
    (["--model", "cifar_resnet20", "--width", "inf", "--out", "x.pt"],
     "width must be a finite number > 0, got inf"),
    (["--model", "cifar_resnet20", "--atol", "-1", "--out", "x.pt"],
     "--atol: expected a finite number >= 0, got '-1'"),
    (["--model", "cifar_resnet20", "--rtol", "nan", "--out", "x.pt"], "--rtol"),
    (["--model", "cifar_resnet20", "--format", "export", "--out", "x.onnx"],
     "--format export does not match --out x.onnx (a onnx suffix); use .pt2 for export"),
    (["--model", "cifar_resnet20", "--out", "a_file/x.pt"], "--out a_file/x.pt: a_file is not "
                                                            "a folder"),
    (["--model", "cifar_resnet20", "--out", "a_dir.pt"], "--out a_dir.pt: is a folder; name the "
                                                         "file to write"),
    (["--checkpoint", "c.pt", "--channel-divisor", "8", "--out", "x.pt"], "--model only"),
    (["--checkpoint", "c.pt", "--shortcut", "B", "--out", "x.pt"],
     "--shortcut applies to --model only (a checkpoint names its own)"),
    (["--model", "thin_resnet18", "--shortcut", "B", "--out", "x.pt"],
     "--shortcut applies to CIFAR ResNets (cifar_*) only, not thin_resnet18"),
    (["--model", "cifar_resnet20", "--parity-batch-sizes", "2,2", "--out", "x.pt"],
     "expected two different batch sizes in 1..4096, got '2,2'"),
    (["--checkpoint", "", "--out", "x.pt"], "argument --checkpoint: empty path"),
    # each ran until torch's allocator or the time limit gave up
    (["--model", "cifar_resnet20", "--width", "1000", "--out", "x.pt"], "--width 1000.0: must "
                                                                        "be <= 16"),
    (["--model", "cifar_resnet20", "--resolution", "100000", "--out", "x.pt"],
     "expected an integer <= 8192, got 100000"),
    (["--model", "cifar_resnet20", "--num-classes", "1000000000", "--out", "x.pt"],
     "expected an integer <= 100000"),
    (["--model", "cifar_resnet20", "--channel-divisor", "100000", "--out", "x.pt"],
     "expected an integer <= 512"),
])
def test_export_cli_user_errors_exit_2_with_one_line(argv, message, capsys, tmp_path,
                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("kept")
    (tmp_path / "a_dir.pt").mkdir()
    try:
        code = export_tool.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_a_checkpoint_that_does_not_fit_is_refused(tmp_path):
    path = _checkpoint(tmp_path)
    state = torch.load(path, weights_only=True)
    state["config"]["model"]["width"] = 0.5
    torch.save(state, path)
    # the message names the first offending key and its shapes, not only torch's heading
    with pytest.raises(ex.CheckpointError, match=r"does not fit its model config \(Error\(s\) in "
                                                 r"loading state_dict for CifarResNet: size "
                                                 r"mismatch for \S+: .* \(\+\d+ more\)\)$"):
        ex.model_from_checkpoint(path)


def test_export_never_writes_over_its_checkpoint(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    before = ckpt.read_bytes()
    (tmp_path / "link.pt").hardlink_to(ckpt)
    for out in (ckpt, tmp_path / "sub" / ".." / ckpt.name, tmp_path / "link.pt"):
        assert export_tool.main(["--checkpoint", str(ckpt), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is the checkpoint itself" in err, err
    assert ckpt.read_bytes() == before
    # a link to another file, or a pipe, was replaced by the exported file (the rename)
    other = tmp_path / "other.pt"
    other.write_bytes(b"theirs")
    (tmp_path / "to-other.pt").symlink_to(other)
    os.mkfifo(tmp_path / "fifo.pt")
    for out in ("to-other.pt", "fifo.pt"):
        assert export_tool.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {tmp_path / out}: ") and err.count("\n") == 1, err
    assert (tmp_path / "to-other.pt").is_symlink() and other.read_bytes() == b"theirs"
    assert stat.S_ISFIFO((tmp_path / "fifo.pt").lstat().st_mode)


def test_a_corrupted_exported_file_is_one_line(tmp_path):
    model, meta = small_model()
    ex.export_model(model, meta, "export", tmp_path / "net.pt2")
    (tmp_path / "text.pt2").write_text("not a zip")
    with pytest.raises(ex.ExportError, match=r"text\.pt2: not a torch.export file \(not a zip "
                                             r"archive; those files are zip archives\)$"):
        ex.load_exported(tmp_path / "text.pt2")
    # torch's words for these were "istream reader failed: getting the current position."
    (tmp_path / "text.pt").write_text("hello\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ex.ExportError, match=r"text\.pt: not a TorchScript file \(not a zip "):
        ex.load_exported(tmp_path / "text.pt")
    with pytest.raises(ex.ExportError, match=r"empty\.pt: not a TorchScript file \(an empty "
                                             r"file; those files are zip archives\)$"):
        ex.load_exported(tmp_path / "empty.pt")
    # a copy cut short: torch said "[Errno 22] Invalid argument" (torch.export) or "istream
    # reader failed: reading file." (TorchScript), depending on where the cut fell
    ex.export_model(model, meta, "torchscript", tmp_path / "net.pt")
    for suffix, fmt in ((".pt2", "export"), (".pt", "torchscript")):
        data = (tmp_path / f"net{suffix}").read_bytes()
        for size in (2000, len(data) // 2, len(data) - 10):
            cut = tmp_path / f"cut{suffix}"
            cut.write_bytes(data[:size])
            with pytest.raises(ex.ExportError) as e:
                ex.load_exported(cut)
            assert str(e.value) == (f"{cut}: cannot load {fmt} file (truncated or damaged: a "
                                    f"zip archive (as torch writes checkpoints and exports) "
                                    f"whose directory at the end is missing; {size:,} bytes; "
                                    f"copy it again or export it again)")


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["pickled weight", "sample inputs", "opaque constant",
                                   "opaque constant in a folder"])
def test_a_crafted_export_cannot_run_code_on_loading(where, tmp_path, monkeypatch):
    # torch.export.load unpickles `use_pickle` weights and odd sample inputs with
    # weights_only=False: `evaluate --file x.pt2` ran the file's code
    import zipfile

    model, meta = small_model()
    ex.export_model(model, meta, "export", tmp_path / "net.pt2")
    marker = tmp_path / "ran"
    payload = io.BytesIO()
    torch.save(_RunsCode(marker), payload)
    with zipfile.ZipFile(tmp_path / "net.pt2") as good:
        names = good.namelist()
        (config_name,) = [n for n in names if n.endswith("model_weights_config.json")]
        config = json.loads(good.read(config_name))
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        (constants_name,) = [n for n in names if n.endswith("model_constants_config.json")]
        constants = json.loads(good.read(constants_name))
        # torch unpickles a constant whose config name starts with opaque_obj_, folder or not
        constants["config"]["c"] = {"path_name": "opaque_obj_0/x", "is_param": False,
                                    "use_pickle": False, "tensor_meta": None}
        replaced = {  # member name suffix -> crafted bytes
            "pickled weight": {config_name: json.dumps(config).encode(),
                               f"/data/weights/{first['path_name']}": payload.getvalue()},
            "sample inputs": {"/sample_inputs/model.pt": payload.getvalue()},
            "opaque constant": {},
            "opaque constant in a folder": {constants_name: json.dumps(constants).encode()}
        }[where]
        with zipfile.ZipFile(tmp_path / "evil.pt2", "w") as evil:
            for name in names:
                crafted = [v for k, v in replaced.items() if name.endswith(k)]
                evil.writestr(name, crafted[0] if crafted else good.read(name))
            if where.startswith("opaque constant"):
                member = "opaque_obj_0" + ("/x" if where.endswith("folder") else "")
                evil.writestr(f"archive/data/constants/{member}",
                              pickle.dumps(_RunsCode(marker)))
    import logging

    level = logging.getLogger("torch.export").level
    with pytest.raises(ex.ExportError, match=r"evil.pt2: .*refused"):
        ex.load_exported(tmp_path / "evil.pt2")
    assert not marker.exists()
    # a refusal left torch.export's warnings silenced for the rest of the process
    assert logging.getLogger("torch.export").level == level
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None
    ex.load_exported(tmp_path / "net.pt2")  # a plain export still loads
    # also where the opposite is set (torch refuses both at once): it stays set after
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    ex.load_exported(tmp_path / "net.pt2")
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"


# --------------------------------------------------------------------------- torch.hub

def test_hub_dependencies_name_every_package_the_hub_path_imports(tmp_path):
    # torch.hub checks `dependencies` before importing hubconf.py, naming what is missing;
    # a package it lacks fails later inside fasttrain with a bare ModuleNotFoundError.
    ckpt = _checkpoint(tmp_path)
    script = textwrap.dedent(f"""
        import sys, torch
        before = set(sys.modules)
        torch.hub.load({str(ROOT)!r}, "thin_resnet18", width=0.25, source="local")
        torch.hub.load({str(ROOT)!r}, "cifar_resnet20", source="local",
                       checkpoint={str(ckpt)!r})
        print(" ".join(sorted({{m.split(".")[0] for m in set(sys.modules) - before}})))
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    imported = set(done.stdout.split())
    declared = {"torchvision", "fvcore", "rich", "yaml", "matplotlib", "sklearn", "PIL"}
    hub_deps = _hub_dependencies()
    assert imported & declared <= hub_deps, imported & declared - hub_deps
    assert all(importlib.util.find_spec(name) for name in hub_deps)


def _hub_dependencies() -> set[str]:
    """hubconf.py's `dependencies`, read as torch.hub reads it (the file's top level)."""
    import ast

    tree = ast.parse((ROOT / "hubconf.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "dependencies":
            return set(ast.literal_eval(node.value))
    raise AssertionError("hubconf.py has no dependencies list")


def test_hub_entry_points(tmp_path):
    model = torch.hub.load(str(ROOT), "thin_resnet50", width=0.5, source="local")
    assert sum(p.numel() for p in model.parameters()) == 6_917_640 and not model.training
    ckpt = _checkpoint(tmp_path)
    trained = torch.hub.load(str(ROOT), "cifar_resnet20", source="local", checkpoint=str(ckpt))
    state = torch.load(ckpt, weights_only=True)["model"]
    assert torch.equal(trained.fc.weight, state["fc.weight"])
    with pytest.raises(ValueError, match="disagrees"):
        torch.hub.load(str(ROOT), "cifar_resnet20", source="local", checkpoint=str(ckpt),
                       width=0.5)
    # a constructor argument the config does not hold compares with the model built
    agreeing = torch.hub.load(str(ROOT), "cifar_resnet20", source="local", checkpoint=str(ckpt),
                              in_chans=3)
    assert torch.equal(agreeing.fc.weight, state["fc.weight"])
    with pytest.raises(ValueError, match=r"in_chans=1 disagrees with the checkpoint's "
                                         r"in_chans=3"):
        torch.hub.load(str(ROOT), "cifar_resnet20", source="local", checkpoint=str(ckpt),
                       in_chans=1)
    with pytest.raises(ValueError, match="holds a cifar_resnet20"):
        torch.hub.load(str(ROOT), "cifar_resnet56", source="local", checkpoint=str(ckpt))
    # only the model's own arguments compare with a checkpoint (not its metadata's mean, ...)
    with pytest.raises(ValueError, match=r"^mean= is not an argument of cifar_resnet20; it "
                                         r"takes blurpool, "):
        torch.hub.load(str(ROOT), "cifar_resnet20", source="local", checkpoint=str(ckpt),
                       mean=[0.5] * 3)
    # the layer classes are internal (norm_act picks them): listed, they invited a class that
    # failed deep inside the model (Identity has no weight) or a string called as one
    for internal in ("norm_layer", "norm_act_layer"):
        for extra in ({}, {"checkpoint": str(ckpt)}):
            with pytest.raises(ValueError, match=rf"^{internal}= is not an argument of "
                                                 rf"cifar_resnet20; it takes blurpool, "):
                torch.hub.load(str(ROOT), "cifar_resnet20", source="local", **extra,
                               **{internal: torch.nn.Identity})
    # on/off arguments are booleans: "no" is true to Python and did the opposite
    for flag, text in (("zero_init_residual", "no"), ("blurpool", "yes")):
        with pytest.raises(ValueError, match=rf"^{flag} must be True or False, got '{text}'$"):
            torch.hub.load(str(ROOT), "thin_resnet18", source="local", **{flag: text})
    with pytest.raises(ValueError, match=r"^checkpoint= must be a path \(str or os.PathLike\), "
                                         r"got 123$"):  # pathlib's TypeError
        torch.hub.load(str(ROOT), "cifar_resnet20", source="local", checkpoint=123)
    with pytest.raises(ValueError, match=r"^weights='': choose from model, ema$"):
        torch.hub.load(str(ROOT), "cifar_resnet20", source="local", checkpoint=str(ckpt),
                       weights="")  # loaded the trained weights, as if not given
    with pytest.raises(ValueError, match="checkpoint= is empty"):
        torch.hub.load(str(ROOT), "cifar_resnet20", source="local", checkpoint="")
    # norm_act picks the implementation, with or without a checkpoint
    fused = torch.hub.load(str(ROOT), "cifar_resnet20", source="local", checkpoint=str(ckpt),
                           norm_act="fused")
    assert type(fused.bn1) is NORM_ACT_LAYERS["fused"]
    assert torch.equal(fused.fc.weight, state["fc.weight"])
    plain = torch.hub.load(str(ROOT), "thin_resnet18", source="local", norm_act="fused")
    assert type(plain.bn1) is NORM_ACT_LAYERS["fused"]
    with pytest.raises(ValueError, match="norm_act='fast': choose from fused, native"):
        torch.hub.load(str(ROOT), "thin_resnet18", source="local", norm_act="fast")
    # with a checkpoint the loader's UserError came through, which `except ValueError` missed
    for bad in ("fast", ["fused"]):
        with pytest.raises(ValueError, match=r"^norm_act=.*: choose from fused, native$"):
            torch.hub.load(str(ROOT), "cifar_resnet20", source="local", checkpoint=str(ckpt),
                           norm_act=bad)
    # an argument of another model (CIFAR ResNets' shortcut) or none: one line, not a TypeError
    # naming ResNet.__init__
    for bad in ({"shortcut": "B"}, {"bogus": 1}):
        with pytest.raises(ValueError, match=rf"^{next(iter(bad))}= is not an argument of "
                                             rf"thin_resnet50; it takes blurpool, "
                                             rf"channel_divisor, channels, drop_path_rate, "
                                             rf"in_chans, norm_act, num_classes, width, "
                                             rf"zero_init_residual$"):
            torch.hub.load(str(ROOT), "thin_resnet50", source="local", **bad)
    option_b = torch.hub.load(str(ROOT), "cifar_resnet20", source="local", shortcut="B")
    assert any(".downsample." in n for n, _ in option_b.named_parameters())
    with pytest.raises(ValueError, match=r"^width=1000000.0: must be <= 16$"):  # not 37 GB
        torch.hub.load(str(ROOT), "thin_resnet18", source="local", width=1e6)
    # the config's bounds on the others: 256 GB and 108 GB allocations before
    for key, top in (("num_classes", "100,000"), ("channel_divisor", "512")):
        with pytest.raises(ValueError, match=rf"^{key}=1000000000: must be <= {top}$"):
            torch.hub.load(str(ROOT), "cifar_resnet20", source="local", **{key: 10 ** 9})


def test_hub_expands_a_tilde_in_the_checkpoint_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _checkpoint(tmp_path)
    model = torch.hub.load(str(ROOT), "cifar_resnet20", source="local", checkpoint="~/best.pt")
    assert model.fc.out_features == 7


# --------------------------------------------------------------------------- checkpoint weights

def _checkpoint_with_ema(tmp_path) -> tuple[Path, dict, dict]:
    """A checkpoint whose EMA (saved as the engine saves it: an AveragedModel's state dict)
    holds weights other than the model's; returns the path and both state dicts."""
    from fasttrain.engine.ema import ModelEma
    from fasttrain.models import create_model

    path = _checkpoint(tmp_path)
    state = torch.load(path, weights_only=True)
    averaged = randomize_bn(create_model("cifar_resnet20", width=0.25, num_classes=7), seed=5)
    ema = ModelEma(averaged, decay=0.9, every=1)
    state["ema"] = ema.state_dict()
    state["classes"] = [f"class{i}" for i in range(7)]
    state["config"]["data"]["val_resize"] = 28
    state["metrics"] = {"val_top1": 50.0, "val_top1_ema": 60.0}
    torch.save(state, path)
    return path, state["model"], averaged.state_dict()


@pytest.mark.parametrize("names, kept", [(5, True), (7, True), (8, False), (0, False)])
def test_class_names_travel_when_the_model_has_at_least_as_many_outputs(tmp_path, names, kept):
    """A run with model.num_classes above its data's classes stores the data's names; the
    export dropped them, and evaluating the file then warned of misnumbered labels."""
    path = _checkpoint(tmp_path)  # 7 outputs
    state = torch.load(path, weights_only=True)
    state["classes"] = [f"class{i}" for i in range(names)]
    torch.save(state, path)
    _, meta = ex.model_from_checkpoint(path)
    assert meta.get("classes") == (state["classes"] if kept else None)


def test_the_ema_weights_of_a_checkpoint_are_a_choice_everywhere(tmp_path, capsys):
    path, model_state, ema_state = _checkpoint_with_ema(tmp_path)
    model, meta = ex.model_from_checkpoint(path)
    assert torch.equal(model.fc.weight, model_state["fc.weight"]) and meta["weights"] == "model"
    ema_model, ema_meta = ex.model_from_checkpoint(path, weights="ema")
    assert ema_meta["weights"] == "ema"
    for key, value in ema_model.state_dict().items():  # buffers (BN statistics) too
        assert torch.equal(value, ema_state[key]), key
    # the data set's class names and the resize before the crop travel with the export
    assert ema_meta["classes"] == [f"class{i}" for i in range(7)] and ema_meta["resize"] == 28
    out = tmp_path / "ema.pt"
    assert export_tool.main(["--checkpoint", str(path), "--weights", "ema", "--out",
                             str(out)]) == 0
    exported, file_meta = ex.load_exported(out)
    assert file_meta["weights"] == "ema" and file_meta["classes"][6] == "class6"
    x = torch.randn(2, 3, 24, 24)
    torch.testing.assert_close(exported(x), ema_model(x), atol=1e-4, rtol=1e-4)
    hub = torch.hub.load(str(ROOT), "cifar_resnet20", source="local", checkpoint=str(path),
                         weights="ema")
    assert torch.equal(hub.fc.weight, ema_state["fc.weight"])
    with pytest.raises(ValueError, match="weights= needs checkpoint="):
        torch.hub.load(str(ROOT), "cifar_resnet20", source="local", weights="ema")
    capsys.readouterr()
    assert export_tool.main(["--model", "cifar_resnet20", "--weights", "ema", "--out",
                             str(tmp_path / "x.pt")]) == 2
    assert "--weights applies to --checkpoint only" in capsys.readouterr().err
    # a checkpoint of a run without train.ema: said in one line
    (tmp_path / "plain").mkdir()
    plain = _checkpoint(tmp_path / "plain")
    with pytest.raises(ex.CheckpointError, match=r"no EMA weights in this checkpoint"):
        ex.model_from_checkpoint(plain, weights="ema")


def test_export_never_keeps_a_failed_file_over_its_checkpoint(tmp_path, capsys):
    """A failed parity check keeps the file as <stem>.parity-failed<suffix>: that must not be
    the checkpoint being exported."""
    ckpt = _checkpoint(tmp_path)
    source = ckpt.rename(tmp_path / "model.parity-failed.pt")
    before = source.read_bytes()
    assert export_tool.main(["--checkpoint", str(source), "--out", str(tmp_path / "model.pt"),
                             "--atol", "0", "--rtol", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "which is the checkpoint itself" in err, err
    assert source.read_bytes() == before


@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_a_full_disk_is_one_line_not_an_abort(fmt, tmp_path):
    """torch's C++ file writer aborts the process when a write fails (and raises a
    RuntimeError for an open that fails); files are written from Python instead."""
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # Python ignores SIGXFSZ

    out = tmp_path / f"net{ex.FORMATS[fmt]}"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "export.py"), "--model",
                             "cifar_resnet20", "--width", "0.5", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {out}: cannot write (File too large)")
    assert result.stderr.count("\n") == 1, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_exported_file_or_a_crafted_one_given_as_a_checkpoint_is_one_line(tmp_path, capsys):
    model, meta = small_model()
    ex.export_model(model, meta, "torchscript", tmp_path / "net.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's two-line note on TorchScript archives: gone
        assert export_tool.main(["--checkpoint", str(tmp_path / "net.pt"), "--out",
                                 str(tmp_path / "again.pt")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {tmp_path / 'net.pt'}: a TorchScript archive (an exported model?), "
                   f"not a fasttrain checkpoint\n"), err
    path = _checkpoint(tmp_path)
    state = torch.load(path, weights_only=True)
    for entry, value, where in ((("config", "data"), "x", "'config'['data'] is of type str"),
                                (("train_state",), 5, "'train_state' is of type int"),
                                (("versions",), "x", "'versions' is of type str"),
                                (("config", "data", "val_res"), "big", "'config'['data']"),
                                (("config", "data", "val_res"), -5, "'config'['data'] (val_res "
                                                                    "-5"),
                                # a torch traceback (storage size overflow), NaN in the JSON
                                (("config", "data", "val_res"), 10**9,
                                 "'config'['data'] (val_res 1000000000,"),
                                (("config", "data", "val_resize"), 10**9,
                                 "'config'['data'] (val_res 24, val_resize 1000000000)"),
                                (("config", "data", "mean"), [float("nan"), 0.5, 0.5],
                                 "'config'['data'] (mean [nan, 0.5, 0.5])"),
                                (("config", "data", "std"), [0.2, 0.0, 0.2],
                                 "'config'['data'] (std [0.2, 0.0, 0.2])")):
        crafted = json.loads(json.dumps(state["config"]))  # a deep copy of the plain part
        broken = {**state, "config": crafted}
        target = broken
        for key in entry[:-1]:
            target = target[key]
        target[entry[-1]] = value
        torch.save(broken, tmp_path / "crafted.pt")
        with pytest.raises(ex.CheckpointError, match=rf"crafted.pt: malformed checkpoint: "
                                                     rf"{re.escape(where)}"):
            ex.model_from_checkpoint(tmp_path / "crafted.pt")


def test_a_bad_norm_act_override_is_not_blamed_on_the_checkpoint(tmp_path):
    with pytest.raises(ex.UserError, match=r"^norm_act 'bogus': choose from .*native"):
        ex.model_from_checkpoint(_checkpoint(tmp_path), norm_act="bogus")


def test_a_torch_export_file_given_as_a_checkpoint_is_one_line(tmp_path, capsys):
    """torch's refusal of a .pt2 said the file was probably corrupted."""
    from fasttrain.measure import sources

    model, meta = small_model()
    ex.export_model(model, meta, "export", tmp_path / "net.pt2")
    assert export_tool.main(["--checkpoint", str(tmp_path / "net.pt2"), "--out",
                             str(tmp_path / "again.pt")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'net.pt2'}: a torch.export program "
                                       f"(an exported model?), not a fasttrain checkpoint\n")
    with pytest.raises(sources.SourceError, match=r"net.pt2: a torch.export program .* \(use "
                                                  r"--file\)$"):
        sources.from_checkpoint(tmp_path / "net.pt2")


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_file_name_that_is_not_utf8_exports(tmp_path, fmt):
    """torch.jit.load and onnxruntime take no name that is not UTF-8: the parity check's reload
    failed (exit 2) after a good export."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    model, meta = small_model()
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/r\xe9n"))
    folder.mkdir()
    parity, _ = ex.export_model(model.eval(), meta, fmt, folder / f"net{ex.FORMATS[fmt]}")
    assert parity.ok
    _, loaded_meta = ex.load_exported(folder / f"net{ex.FORMATS[fmt]}")
    assert loaded_meta["model"] == meta["model"]


def test_an_unfolded_native_network_is_scripted_not_traced(tmp_path):
    """The native norm+ReLU layer called super().forward, which TorchScript cannot compile:
    every --no-fold export of it was silently a trace, and torch.jit.script of a hub model
    failed."""
    model, meta = small_model()
    assert any(type(m) is BatchNormReLU2d for m in model.modules())
    parity, written = ex.export_model(model.eval(), meta, "torchscript", tmp_path / "net.pt",
                                      fold=False)
    assert parity.ok and written["torchscript_method"] == "script" and written["bn_folded"] == 0
    layer = BatchNormReLU2d(4, momentum=None)
    scripted = torch.jit.script(copy.deepcopy(layer))
    x = torch.randn(3, 4, 5, 5)
    for training in (True, False):  # train mode: batch statistics, cumulative running stats
        layer.train(training), scripted.train(training)
        assert torch.equal(scripted(x), layer(x))
    for key, value in layer.state_dict().items():
        assert torch.equal(scripted.state_dict()[key], value), key


def test_a_blurpool_network_exports_scripted_folded_and_follows_the_input_dtype(tmp_path):
    """The blur's [1, 2, 1] kernel was a CPU float32 constant in a traced file (scripting failed
    on super().forward): bf16 or CUDA inputs failed, and its convs' BatchNorm stayed unfolded."""
    mc = {**dataclasses.asdict(ModelConfig()), "name": "thin_resnet18", "width": 0.5,
          "num_classes": 10, "blurpool": True}
    model = randomize_bn(ex._build(mc)).eval()
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    parity, written = ex.export_model(model, ex.make_metadata(mc, resolution=32), "torchscript",
                                      tmp_path / "blur.pt")
    assert parity.ok and written["torchscript_method"] == "script"
    assert written["bn_folded"] == norms
    loaded = torch.jit.load(str(tmp_path / "blur.pt"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = loaded(x)
        got = loaded.to(torch.bfloat16)(x.bfloat16()).float()
    assert max_rel(got, want) < 0.1
    # the same for a traced copy (the fallback): the kernel follows the input
    traced = torch.jit.trace(ex.with_plain_norm_act(copy.deepcopy(model)), x)
    with torch.no_grad():
        assert traced.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


def test_export_at_another_resolution_scales_the_resize(tmp_path):
    ckpt_path = _checkpoint(tmp_path)  # val_res 24
    state = torch.load(ckpt_path, weights_only=True)
    state["config"]["data"]["val_resize"] = 28
    torch.save(state, ckpt_path)
    out = tmp_path / "r.pt2"
    assert export_tool.main(["--checkpoint", str(ckpt_path), "--resolution", "48", "--out",
                             str(out)]) == 0
    _, meta = ex.load_exported(out)
    assert meta["input_size"] == [3, 48, 48] and meta["resize"] == 56  # 28/24 of the crop


def test_ema_weights_of_a_wrapped_model_load_and_misfits_are_short(tmp_path):
    """An EMA state dict whose keys carry a compile/DDP prefix under the AveragedModel's
    `module.` was refused with every key of the network listed on one line."""
    path, _, averaged = _checkpoint_with_ema(tmp_path)
    state = torch.load(path, weights_only=True)
    state["ema"] = {(f"module._orig_mod.{k.removeprefix('module.')}" if k != "n_averaged"
                     else k): v for k, v in state["ema"].items()}
    torch.save(state, path)
    model, _ = ex.model_from_checkpoint(path, weights="ema")
    assert torch.equal(model.fc.weight, averaged["fc.weight"])
    state["ema"] = {"module.x": torch.zeros(1)}
    torch.save(state, path)
    with pytest.raises(ex.CheckpointError) as info:
        ex.model_from_checkpoint(path, weights="ema")
    message = str(info.value)
    assert len(message) < 400 and "keys)" in message and "\n" not in message, message


def test_library_calls_check_what_the_tools_check(tmp_path):
    """A notebook's model_from_name(..., 100) built a 100x-wide network (the config and the
    tools cap width at 16) before anything failed; load_exported with a format name it does
    not know read the file as ONNX."""
    from fasttrain.errors import UserError

    with pytest.raises(UserError, match=r"^width=100.0: must be <= 16$"):
        ex.model_from_name("cifar_resnet20", 100.0)
    with pytest.raises(UserError, match=r"^num_classes=1000000000: must be <= 100,000$"):
        ex.model_from_name("cifar_resnet20", 0.25, num_classes=10 ** 9)
    ex.export_model(*ex.model_from_name("cifar_resnet20", 0.25, resolution=16), "torchscript",
                    tmp_path / "net.pt")
    for fmt in ("bogus", "ONNX"):
        with pytest.raises(ex.ExportError, match=rf"^unknown export format '{fmt}'; choose "
                                                 rf"from torchscript, export, onnx$"):
            ex.load_exported(tmp_path / "net.pt", fmt)
