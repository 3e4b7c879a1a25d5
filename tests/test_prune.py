"""Channel specs in the models, structured pruning to a MAC target (Torch-Pruning), pruned
checkpoints through the trainer (`model.init_from`), tools/benchmark.py and tools/export.py."""
from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ReaderGone, load_tool
from fasttrain import export as ex
from fasttrain.config import Config, ModelConfig, load
from fasttrain.engine import checkpoint as ckpt
from fasttrain.engine.loop import apply_init_from, build_model
from fasttrain.errors import CheckpointError, ConfigError
from fasttrain.measure import count_macs, count_params
from fasttrain.models import create_model
from fasttrain.models.resnet import channels_of, uniform_channels

from fasttrain.compare import prune

needs_tp = pytest.mark.skipif(importlib.util.find_spec("torch_pruning") is None,
                              reason="Torch-Pruning not installed (pip install "
                                     "--no-build-isolation -e .[prune])")

prune_tool, benchmark_tool, export_tool = (load_tool(n) for n in ("prune", "benchmark", "export"))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these small models gain nothing from two, and on a shared CI
    machine two spinning threads wait on the scheduler (10x slower seen here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-uniform weights and norm statistics, so importance scores differ between channels
    (a fresh model's BatchNorm gammas are all 1, zero-init residual ones all 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.1)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model.eval()


def write_checkpoint(path, name="cifar_resnet20", width=0.5, res=16, top1=91.0, **model_kw):
    cfg = Config()
    cfg.model.name, cfg.model.width, cfg.model.num_classes = name, width, 10
    for k, v in model_kw.items():
        setattr(cfg.model, k, v)
    cfg.data.val_res = cfg.data.train_res = cfg.data.val_resize = res
    model = trained_like(build_model(cfg.model, 10))
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(),
                "metrics": {"val_top1": top1}, "train_state": {"epoch": 3},
                "versions": {"commit": "abc123"}}, path)
    return path, model


# --------------------------------------------------------------------------- channel specs

@pytest.mark.parametrize("name, width, kw", [("thin_resnet18", 0.5, {}),
                                              ("thin_resnet50", 0.25, {}),
                                              ("cifar_resnet20", 0.75, {}),
                                              ("cifar_resnet20", 0.5, {"shortcut": "B"})])
def test_uniform_spec_is_the_width_rule_exactly(name, width, kw):
    model = create_model(name, width=width, **kw)
    spec = channels_of(model)
    twin = create_model(name, channels=spec, **kw)
    a, b = model.state_dict(), twin.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    b0 = model.conv1.out_channels
    layers = [len(model.get_submodule(f"layer{i}")) for i in range(1, 5) if hasattr(model, f"layer{i}")]
    expansion = 4 if name == "thin_resnet50" else 1
    assert spec == uniform_channels(b0, layers, expansion)


def test_explicit_spec_builds_that_network():
    spec = {"stem": 5, "stages": [{"out": 6, "blocks": [[3], [2], [4]]},
                                  {"out": 9, "blocks": [[1], [7], [9]]},
                                  {"out": 12, "blocks": [[5], [5], [2]]}]}
    model = create_model("cifar_resnet20", channels=copy.deepcopy(spec), num_classes=10)
    assert channels_of(model) == spec
    assert model.layer1[0].conv1.out_channels == 3 and model.layer3[2].conv2.in_channels == 2
    out = model.eval()(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    r50 = {"stem": 7, "stages": [{"out": 20, "blocks": [[3, 4]] * 3},
                                 {"out": 30, "blocks": [[5, 6]] * 4},
                                 {"out": 40, "blocks": [[7, 8]] * 6},
                                 {"out": 50, "blocks": [[9, 10]] * 3}]}
    model = create_model("thin_resnet50", channels=r50, num_classes=3)
    assert channels_of(model) == r50 and model.fc.in_features == 50
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("spec, message", [
    ({"stem": 8}, "keys 'stem' and 'stages'"),
    ({"stem": 0, "stages": []}, "stages must list 3 stages, got 0: []"),
    ({"stem": 0, "stages": 3}, "stages must be a list of 3 stages, got int 3"),
    ({"stem": 0, "stages": [{"out": 8, "blocks": [[1]] * 3}] * 3}, "stem must be a positive"),
    ({"stem": 8, "stages": [{"out": 8, "blocks": [[1]] * 2}] * 3}, "stages[0].blocks must list 3"),
    # "must list 3 blocks, got 3" contradicted itself: the 3 was an integer
    ({"stem": 8, "stages": [{"out": 8, "blocks": 3}] * 3},
     "stages[0].blocks must be a list of 3 blocks (a list of channel counts each), got int 3"),
    ({"stem": 8, "stages": [{"out": 8, "blocks": [[1, 2]] * 3}] * 3},
     "stages[0].blocks[0] must be a list of 1"),
    ({"stem": 8, "stages": [{"out": 8, "blocks": [[1.5]] * 3}] * 3}, "positive integer"),
    ({"stem": 8, "stages": [{"out": 8, "blocks": [[1]] * 3}, {"out": 4, "blocks": [[1]] * 3},
                            {"out": 16, "blocks": [[1]] * 3}]}, "shortcut A zero-pads"),
])
def test_bad_specs_are_value_errors_naming_the_place(spec, message):
    with pytest.raises(ValueError) as e:
        create_model("cifar_resnet20", channels=spec)
    assert message in str(e.value)


def test_config_takes_a_spec_and_rejects_a_bad_one(tmp_path):
    spec = uniform_channels(4, [3, 3, 3], 1)
    cfg = load(None, ["--model.name=cifar_resnet20", f"--model.channels={spec}"])
    assert cfg.model.channels == spec
    assert count_params(build_model(cfg.model, 10)) == 17_326  # = width 0.25
    with pytest.raises(ConfigError, match="model.channels must be a mapping or null"):
        load(None, ["--model.channels=[1, 2]"])
    # checked when the config is read, naming the override (it was refused only by the model
    # build, past --keys, as "model: channels ..." from nowhere)
    with pytest.raises(ConfigError, match=r"^--model.channels=\{stem: 4\}: model.channels must "
                                          r"be a mapping with keys"):
        load(None, ["--model.name=cifar_resnet20", "--model.channels={stem: 4}"])
    r50 = uniform_channels(16, [3, 4, 6, 3], 4)
    r50["stages"][3]["blocks"][1] = [32]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  name: thin_resnet50\n  channels: {r50}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(recipe))}: model.channels: "
                                          r"stages\[3\].blocks\[1\] must be a list of 2"):
        load(recipe)
    # a spec for another depth is refused too; under init_from the checkpoint's replaces it
    with pytest.raises(ConfigError, match="stages must list 4 stages, got 3"):
        load(None, [f"--model.channels={spec}"])
    assert load(None, [f"--model.channels={spec}", "--model.init_from=x.pt"]).model.channels


# --------------------------------------------------------------------------- pruning math

@pytest.mark.parametrize("miss, tolerance, text", [
    (-0.00221, 0.002, "-0.22"),  # "-0.2 %" beside "within 0.2 %" read as a hit
    (0.0201, 0.02, "+2.01"),
    (0.13, 0.05, "+13.0"),
    (-0.5, 1e-9, "-50.0")])
def test_tolerance_miss_is_shown_outside_the_tolerance(miss, tolerance, text):
    assert prune.miss_percent(miss, tolerance) == text


def test_channel_plan_uniform_and_global():
    scores = {"a": torch.tensor([0.1, 0.5, 0.3, 0.9]), "b": torch.tensor([2.0, 0.05])}
    assert prune.channel_plan(scores, 0.0, "uniform") == {}
    # uniform: keep round(C * 0.5) per group: a keeps 2 (0.9, 0.5), b keeps 1 (2.0)
    assert prune.channel_plan(scores, 0.5, "uniform") == {"a": [0, 2], "b": [1]}
    # one channel per group is always kept
    assert prune.channel_plan(scores, 1.0, "uniform") == {"a": [0, 1, 2], "b": [1]}
    # global: round(0.5 * 6) = 3 lowest of all but each group's best: 0.05, 0.1, 0.3
    assert prune.channel_plan(scores, 0.5, "global") == {"a": [0, 2], "b": [1]}
    assert prune.channel_plan(scores, 1 / 6, "global") == {"b": [1]}
    assert prune.channel_plan(scores, 1.0, "global") == {"a": [0, 1, 2], "b": [1]}
    with pytest.raises(ValueError):
        prune.channel_plan(scores, 0.5, "layerwise")


@needs_tp
@pytest.mark.parametrize("name, kw, res, target_width, importance, scope", [
    ("cifar_resnet20", {}, 16, 0.25, "l1", "global"),
    ("cifar_resnet20", {}, 16, 0.25, "bn_scale", "uniform"),
    ("cifar_resnet20", {"shortcut": "B"}, 16, 0.3, "bn_scale", "global"),
    ("thin_resnet18", {}, 32, 0.3, "l1", "uniform"),
    ("thin_resnet50", {"blurpool": True}, 32, 0.3, "l1", "global"),  # every blur kept
])
def test_pruning_reaches_the_target_within_5_percent(name, kw, res, target_width, importance,
                                                     scope):
    model = trained_like(create_model(name, width=0.5, num_classes=10, **kw))
    target = count_macs(create_model(name, width=target_width, num_classes=10, **kw),
                        res).conv_fc

    def rebuild(spec):
        return create_model(name, channels=spec, num_classes=10, **kw)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = prune.prune_to_macs(model, target, res, rebuild, importance=importance, scope=scope)
    assert abs(r.macs / target - 1) <= 0.05 and r.macs == count_macs(r.model, res).conv_fc
    assert r.source_macs == count_macs(model, res).conv_fc and r.params < r.source_params
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    out = r.model(torch.randn(2, 3, res, res))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # The recorded spec rebuilds the network, and the pruned weights load into it exactly.
    fresh = rebuild(copy.deepcopy(r.channels))
    fresh.load_state_dict(r.model.state_dict())
    assert channels_of(fresh) == r.channels
    assert count_params(fresh) == r.params
    if name == "cifar_resnet20" and not kw:  # option A: the residual streams are kept
        assert [s["out"] for s in r.channels["stages"]] == [8, 16, 32] and \
            r.channels["stem"] == 8


@needs_tp
def test_pruning_keeps_the_function_of_the_kept_channels():
    """Removing channels whose BatchNorm output is exactly zero changes nothing: the pruned
    network computes the same logits (the dependency graph sliced every coupled layer)."""
    model = trained_like(create_model("thin_resnet18", width=0.25, num_classes=10))
    with torch.no_grad():
        for m in model.modules():  # zero gamma and beta on half of each block's inner channels
            if hasattr(m, "bn1") and hasattr(m, "conv2"):
                half = m.bn1.num_features // 2
                m.bn1.weight[:half] = 0
                m.bn1.bias[:half] = 0
    scores = prune.channel_importance(model, "bn_scale", 32)
    inner = {k: v for k, v in scores.items() if k.endswith(".conv1")}
    plan = {k: list(range(len(v) // 2)) for k, v in inner.items()}
    pruned = prune.apply_plan(model, plan, 32)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-5)
    assert count_macs(pruned, 32).conv_fc < count_macs(model, 32).conv_fc


@needs_tp
def test_unreachable_and_pointless_targets_are_prune_errors():
    model = trained_like(create_model("cifar_resnet20", width=0.5, num_classes=10))

    def rebuild(spec):
        return create_model("cifar_resnet20", channels=spec, num_classes=10)

    with pytest.raises(prune.PruneError, match="out of reach: one channel per prunable group"):
        prune.prune_to_macs(model, 100_000, 16, rebuild)  # option A keeps the streams
    with pytest.raises(prune.PruneError, match="is not below the model's 2,562,368 MACs"):
        prune.prune_to_macs(model, 3_000_000, 16, rebuild)
    # a target within the tolerance of the source's MACs was met by pruning nothing, and the
    # unchanged network written as a pruned checkpoint
    assert prune.prune_to_macs(model, 2_562_000, 16, rebuild).macs == 2_548_544


@needs_tp
def test_pruning_a_blurred_conv_below_16_inputs_is_refused():
    """BlurPool blurs strided convs with >= 16 inputs: the in-place pruned network kept the
    blur of one pruned to fewer, the network rebuilt from its saved config did not (another
    function, under the MACs measured for the first)."""
    model = trained_like(create_model("thin_resnet18", width=0.25, num_classes=10,
                                      blurpool=True))
    assert model.layer2[0].conv1.in_channels == 16

    def rebuild(spec):
        return create_model("thin_resnet18", channels=spec, num_classes=10, blurpool=True)

    target = count_macs(create_model("thin_resnet18", width=0.2, num_classes=10,
                                     blurpool=True), 32).conv_fc
    with pytest.raises(prune.PruneError, match=r"pruning leaves layer\d\.0\.\w+ \(stride 2\) "
                                               r"with \d+ inputs, too few for model.blurpool"):
        prune.prune_to_macs(model, target, 32, rebuild, scope="uniform")


# --------------------------------------------------------------------------- checkpoints

@needs_tp
def test_a_checkpoint_cut_inside_an_epoch_is_told_apart_and_paths_may_start_with_a_tilde(
        tmp_path, capsys, monkeypatch):
    """A last.pt cut by train.max_steps (30 steps: epoch 1 complete, 8 steps into epoch 2, that
    partial epoch validated) exported with best.pt's checkpoint_epoch and nothing else, and its
    pruning record paired epoch 1 with epoch 2's top-1. `--out=~/...` (no shell expansion after
    `=`) wrote into a folder named `~`."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    src, _ = write_checkpoint(tmp_path / "last.pt", top1=10.7)
    state = torch.load(src, weights_only=True)
    state["train_state"] = {"epoch": 1, "step": 30, "epoch_step": 8}
    state["metrics"] = {"epoch": 2, "val_top1": 10.7}
    torch.save(state, src)
    assert export_tool.main(["--checkpoint", str(src), "--out=~/out/last.pt"]) == 0
    _, meta = ex.load_exported(tmp_path / "home" / "out" / "last.pt")
    assert (meta["checkpoint_epoch"], meta["checkpoint_step"], meta["checkpoint_epoch_step"]) \
        == (1, 30, 8)
    assert prune_tool.main([str(src), "--out=~/p/pruned.pt", "--target-width", "0.25"]) == 0
    assert not (tmp_path / "~").exists()
    rec = ckpt.load(tmp_path / "home" / "p" / "pruned.pt")["pruning"]
    assert (rec["source_epoch"], rec["source_step"], rec["source_val_top1"]) == (2, 30, 10.7)
    capsys.readouterr()
    assert export_tool.main(["--checkpoint=~/p/pruned.pt", "--out", "pruned.pt"]) == 0
    _, meta = ex.load_exported(tmp_path / "pruned.pt")
    assert (meta["pruning"]["source_epoch"], meta["pruning"]["source_step"]) == (2, 30)
    assert "checkpoint_epoch_step" not in meta  # the pruned file is no mid-epoch checkpoint


@needs_tp
def test_a_closed_stdout_still_writes_the_pruned_checkpoint_and_exits_141(tmp_path,
                                                                          monkeypatch):
    """`prune.py ... | head -3`: rich turned the broken pipe into a silent exit 1."""
    src, _ = write_checkpoint(tmp_path / "src.pt")
    monkeypatch.setattr(sys, "stdout", ReaderGone())
    assert prune_tool.main([str(src), "--out", str(tmp_path / "p.pt"), "--target-width",
                            "0.25"]) == 141
    assert ckpt.load(tmp_path / "p.pt")["pruning"]["target_macs"] > 0


@needs_tp
def test_the_table_shows_every_count_whole_on_a_narrow_terminal(tmp_path, monkeypatch, capsys):
    """At 40 columns the source's MACs were shown as `2,562,…`."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # the tool: a terminal
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: one too
    monkeypatch.setenv("COLUMNS", "40")
    src, _ = write_checkpoint(tmp_path / "src.pt")
    assert prune_tool.main([str(src), "--out", str(tmp_path / "p.pt"), "--target-width",
                            "0.25"]) == 0
    printed = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    rec = ckpt.load(tmp_path / "p.pt")["pruning"]
    for count in (rec["source_macs"], rec["source_params"], rec["target_macs"], rec["macs"],
                  rec["params"]):
        assert f"{count:,}" in printed, (count, printed)
    assert "…" not in printed


@needs_tp
def test_prune_tool_writes_a_checkpoint_that_benchmark_and_export_accept(tmp_path, capsys):
    src, _ = write_checkpoint(tmp_path / "src.pt")
    out = tmp_path / "my nets" / "pruned.pt"
    assert prune_tool.main([str(src), "--out", str(out), "--target-width", "0.25",
                            "--importance", "bn_scale"]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # rich may wrap the long line
    command = printed.split("fine-tune with: ")[1]
    assert shlex.split(command) == ["python", "tools/train.py", "RECIPE",
                                    f"--model.init_from={out}"]  # pastes into a shell as is
    state = ckpt.load(out)  # weights_only=True
    rec, mc = state["pruning"], state["config"]["model"]
    target = count_macs(create_model("cifar_resnet20", width=0.25, num_classes=10), 16).conv_fc
    assert rec["target_macs"] == target and abs(rec["macs"] / target - 1) <= 0.05
    assert (rec["source_val_top1"], rec["source_epoch"], rec["source_width"]) == (91.0, 3, 0.5)
    assert (rec["importance"], rec["scope"], rec["resolution"]) == ("bn_scale", "global", 16)
    assert rec["source_macs"] == 2_562_368
    assert rec["torch_pruning"] == importlib.metadata.version("torch-pruning")
    model = create_model("cifar_resnet20", channels=mc["channels"], num_classes=10)
    model.load_state_dict(state["model"])
    assert count_macs(model, 16).conv_fc == rec["macs"]
    # its recorded width is the source's: asking the hub for it as if uniform is refused
    with pytest.raises(ValueError, match=r"^width= cannot be combined with a pruned checkpoint="):
        torch.hub.load(str(Path(__file__).resolve().parents[1]), "cifar_resnet20",
                       source="local", checkpoint=str(out), width=mc["width"])

    rows = tmp_path / "rows.json"
    assert benchmark_tool.main(["--checkpoint", str(out), "--device", "cpu", "--iters", "2",
                                "--warmup", "1", "--json", str(rows)]) == 0
    progress = capsys.readouterr().out
    assert "cifar_resnet20 (pruned) batch 1: ok" in progress and "wNone" not in progress
    (row,) = json.loads(rows.read_text())
    assert (row["weights"], row["num_classes"]) == ("model", 10)
    assert (row["model"], row["width"], row["macs"], row["params"], row["resolution"]) == \
        ("cifar_resnet20 (pruned)", None, rec["macs"], rec["params"], 16)
    exported = tmp_path / "pruned_ts.pt"
    assert export_tool.main(["--checkpoint", str(out), "--out", str(exported)]) == 0
    assert "pruned channels" in capsys.readouterr().out
    _, meta = ex.load_exported(exported)
    assert meta["model_config"]["channels"] == mc["channels"]
    assert (meta["weights"], meta["pruning"]["source"], meta["pruning"]["source_weights"],
            meta["pruning"]["macs"]) == ("model", str(src.resolve()), "model", rec["macs"])
    assert meta["pruning"]["source_params"] == rec["source_params"]
    assert "search" not in meta["pruning"]
    assert count_macs(ex.model_from_metadata(meta), 16).conv_fc == rec["macs"]
    # pruned again before any training: its record would name it as the source (no top-1)
    assert prune_tool.main([str(out), "--out", str(tmp_path / "again.pt"),
                            "--target-width", "0.2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pruned.pt is a pruned network not trained since (" in err
    assert not (tmp_path / "again.pt").exists()


@needs_tp
def test_a_network_pruned_from_ema_weights_says_so_in_its_export(tmp_path):
    """The pruned checkpoint holds one set of weights ("model"); which weights of the source
    it was pruned from travels in the exported metadata's pruning summary."""
    src, model = write_checkpoint(tmp_path / "src.pt")
    state = torch.load(src, weights_only=True)
    state["ema"] = {**{f"module.{k}": v for k, v in model.state_dict().items()},
                    "n_averaged": torch.tensor(5)}
    state["metrics"]["val_top1_ema"] = 92.5
    torch.save(state, src)
    out = tmp_path / "pruned.pt"
    assert prune_tool.main([str(src), "--out", str(out), "--target-width", "0.25",
                            "--weights", "ema"]) == 0
    _, meta = ex.model_from_checkpoint(out)
    assert meta["weights"] == "model"
    assert (meta["pruning"]["source_weights"], meta["pruning"]["source_val_top1"]) == \
        ("ema", 92.5)
    # asking for its EMA: not "trained without train.ema" (the source was)
    with pytest.raises(CheckpointError, match="a pruned checkpoint holds one set of weights "
                       r"\(here pruned from its source's ema weights\), no EMA"):
        ex.model_from_checkpoint(out, weights="ema")
    old = torch.load(out, weights_only=True)  # pruned before --weights existed: the model's
    del old["pruning"]["source_weights"]
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=r"its source's model weights\), no EMA"):
        ex.model_from_checkpoint(tmp_path / "old.pt", weights="ema")


def test_init_from_names_its_file_for_a_bad_channel_spec(tmp_path):
    """A checkpoint's channel spec was refused as "model: channels: ...", from nowhere."""
    src, _ = write_checkpoint(tmp_path / "src.pt")
    saved = torch.load(src, weights_only=True)
    saved["config"]["model"]["channels"] = {"stem": 8, "stages": [{"out": 8, "blocks": 3}] * 3}
    torch.save(saved, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match=rf"^model.init_from={re.escape(str(tmp_path))}/bad.pt:"
                                          r" model.channels: stages\[0\].blocks must be a list"):
        apply_init_from(ModelConfig(init_from=str(tmp_path / "bad.pt")))


@needs_tp
def test_init_from_takes_architecture_and_weights(tmp_path):
    src, _ = write_checkpoint(tmp_path / "src.pt")
    out = tmp_path / "pruned.pt"
    prune.prune_checkpoint(src, out, target_width=0.25)
    cfg = ModelConfig(name="thin_resnet50", width=1.0, init_from=str(out))
    weights = apply_init_from(cfg)
    assert (cfg.name, cfg.width, cfg.num_classes) == ("cifar_resnet20", 0.5, 10)
    assert cfg.channels == ckpt.load(out)["config"]["model"]["channels"]
    model = build_model(cfg, cfg.num_classes)
    model.load_state_dict(weights)
    # the config's own architecture values that the checkpoint's replace are named: an
    # override such as --model.width=0.5 was dropped without a word
    cfg, notes = ModelConfig(name="cifar_resnet20", width=0.75, init_from=str(out)), []
    apply_init_from(cfg, notes)
    assert notes == [f"note: model.init_from={out} sets the architecture: model.width 0.5 (the "
                     f"config had 0.75), model.channels (the checkpoint's pruned widths)"]
    # BlurPool changes what the weights compute but not their shapes: said when it differs
    same = dict(name="cifar_resnet20", width=0.5, channels=cfg.channels, init_from=str(out))
    apply_init_from(ModelConfig(**same, blurpool=True), notes := [])
    assert notes == [f"note: model.init_from={out} was trained with model.blurpool=false, this "
                     f"run has true"]
    apply_init_from(ModelConfig(**same), notes := [])  # num_classes 0: the data's, no value
    assert notes == []
    # recorded absolute: compare reads the pruning record through it from any folder
    os.chdir(tmp_path)
    try:
        apply_init_from(cfg := ModelConfig(init_from="pruned.pt"))
    finally:
        os.chdir(Path(__file__).resolve().parent)
    assert cfg.init_from == str(out)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        apply_init_from(ModelConfig(init_from=str(tmp_path / "missing.pt")))
    # the lineage: what was pruned, carried by a fine-tuned checkpoint and a fine-tuned one's
    record = ckpt.load(out)["pruning"]
    apply_init_from(ModelConfig(init_from=str(out)), lineage=(lineage := {}))
    assert lineage == {**{k: record[k] for k in ckpt.PRUNING_SUMMARY if k in record},
                       "fine_tuned_from": str(out)}
    assert lineage["source"] == str(src.resolve()) and "search" not in lineage
    tuned = torch.load(out, weights_only=True)
    del tuned["pruning"]
    tuned["pruned_from"] = lineage
    torch.save(tuned, tmp_path / "tuned.pt")
    apply_init_from(ModelConfig(init_from=str(tmp_path / "tuned.pt")), lineage=(again := {}))
    assert again == lineage
    apply_init_from(ModelConfig(init_from=str(src)), lineage=(plain := {}))
    assert plain == {}


@needs_tp
def test_pruning_a_fine_tuned_pruned_network_keeps_the_whole_lineage(tmp_path):
    """Pruned, fine-tuned, pruned again: the second record holds the first pruning
    (`source_pruning`) and the intermediate's channels, exports and fine-tuned checkpoints keep
    both, and compare labels the runs "pruned" / "pruned x2", each against its own base: a run
    fine-tuned twice from a pruned network used to be reported as having no pruning record."""
    from fasttrain import config as config_mod
    from fasttrain.compare.points import point_from_run

    src, _ = write_checkpoint(tmp_path / "src.pt")
    first = tmp_path / "pruned.pt"
    prune.prune_checkpoint(src, first, target_width=0.375)
    apply_init_from(ModelConfig(init_from=str(first)), lineage=(lineage := {}))

    def fine_tuned(pruned, path, lineage, top1):  # what train() saves after model.init_from
        state = torch.load(pruned, weights_only=True)
        state.pop("pruning")
        state.update(pruned_from=lineage, metrics={"val_top1": top1},
                     train_state={"epoch": 2})
        torch.save(state, path)
        return path

    tuned = fine_tuned(first, tmp_path / "tuned.pt", lineage, 88.0)
    second = tmp_path / "pruned2.pt"
    prune.prune_checkpoint(tuned, second, target_width=0.25)
    record, tuned_state = ckpt.load(second)["pruning"], ckpt.load(tuned)
    assert record["source_pruning"] == lineage and record["source_val_top1"] == 88.0
    assert record["source_channels"] == tuned_state["config"]["model"]["channels"]
    assert record["source_width"] == 0.5  # the thin network's at the root
    _, meta = ex.model_from_checkpoint(second)
    assert meta["pruning"]["source_pruning"] == lineage
    assert meta["pruning"]["source_channels"] == record["source_channels"]
    apply_init_from(ModelConfig(init_from=str(second)), lineage=(lineage2 := {}))
    tuned2 = fine_tuned(second, tmp_path / "tuned2.pt", lineage2, 80.0)

    def run(name, init_from, res=16):
        cfg = Config()
        cfg.model.init_from = str(init_from)
        apply_init_from(cfg.model)  # the architecture, as the trainer takes it
        cfg.data.val_res = cfg.data.train_res = cfg.data.val_resize = res
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.yaml").write_text(config_mod.dump(cfg))
        (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_top1": 70.0}) + "\n")
        point = point_from_run(folder, warnings := [])
        point.warnings = warnings
        return point

    once = run("ft-again", tuned)  # fine-tuned from the fine-tuned pruned network
    assert once.label == "cifar_resnet20 w0.5 pruned (l1, global)"
    assert (once.base_top1, once.base_macs) == (91.0, 2_562_368)
    twice = run("ft-iter2", tuned2)
    assert twice.label == "cifar_resnet20 w0.5 pruned x2 (l1, global)"
    assert (twice.base_top1, twice.base_macs) == (88.0, record["source_macs"])
    # Fine-tuned and evaluated at 32 px: the source's MACs were counted at the pruning's 16 px
    # (a -100 % MAC reduction); its architecture is counted again at 32 px.
    source = create_model("cifar_resnet20", width=0.5, num_classes=10)
    wide = run("ft-32px", tuned, res=32)
    assert wide.base_macs == count_macs(source, 32).conv_fc > 3 * once.base_macs
    def other_resolution(point):
        return [w for w in point.warnings if "another resolution than its pruning's" in w]

    assert other_resolution(once) == [] and len(other_resolution(wide)) == 1
    assert "ft-32px: evaluated at 32 px, another resolution" in other_resolution(wide)[0]
    assert wide.base_macs > wide.macs
    wide2 = run("ft2-32px", tuned2, res=32)  # its source is the fine-tuned pruned network
    assert wide2.base_macs == count_macs(build_model(ModelConfig(
        name="cifar_resnet20", channels=record["source_channels"]), 10), 32).conv_fc
    # the file is matched to the run by its channels, not its MACs; another network's file
    # (the second prune, found where the first's should be) is still refused
    from fasttrain.compare.points import _pruning_record

    warnings = []
    first_spec = tuned_state["config"]["model"]["channels"]
    assert _pruning_record(str(second), tmp_path / "ft-32px", warnings, 1, first_spec) is None
    assert "its pruned network's channels are not the run's" in warnings[0]


@needs_tp
def test_prune_tool_user_errors_exit_2_with_one_line(tmp_path, capsys):
    src, _ = write_checkpoint(tmp_path / "src.pt")
    cases = [([str(tmp_path / "none.pt"), "--out", "x.pt", "--target-width", "0.25"],
              "checkpoint not found"),
             ([str(src), "--out", "x.pt", "--target-macs", "1000"], "out of reach"),
             ([str(src), "--out", "x.pt", "--target-width", "0.75"], "is not below"),
             # a typo for 0.25: refused before the 100x wider network (~64 GB) is built
             ([str(src), "--out", "x.pt", "--target-width", "25"],
              "--target-width 25 is not below the checkpoint's model.width 0.5"),
             ([str(src), "--out", "x.pt", "--target-width", "-1"], "finite number > 0"),
             # it said "model: width 0.001 ...", naming no option
             ([str(src), "--out", "x.pt", "--target-width", "0.001"],
              "--target-width 0.001: width 0.001 leaves no channel of base 16"),
             ([str(src), "--out", "x.pt", "--target-width", "inf"], "finite number > 0"),
             ([str(src), "--out", "x.pt", "--tolerance", "nan", "--target-width", "0.25"],
              "a fraction > 0 and < 1"),
             # 1.5 accepted a network 13 % off; 0.001 was reported as "within 0%"
             ([str(src), "--out", "x.pt", "--tolerance", "1.5", "--target-width", "0.25"],
              "a fraction > 0 and < 1 (0.05 = 5 %)"),
             ([str(src), "--out", "x.pt", "--tolerance", "1e-9", "--target-width", "0.3"],
              "no pruning ratio lands within 1e-07 % of"),
             ([str(src), "--out", "x.pt"], "one of the arguments --target-macs --target-width")]
    # channel_divisor 8 builds w0.2 with the channels of w0.25: "target 2,766,080 MACs is not
    # below the model's 2,766,080 MACs" left the user guessing
    rounded, _ = write_checkpoint(tmp_path / "rounded.pt", name="thin_resnet18", width=0.25,
                                  res=32, channel_divisor=8)
    cases.append(([str(rounded), "--out", "x.pt", "--target-width", "0.2"],
                  "--target-width 0.2 builds the same channel counts as the checkpoint's "
                  "model.width 0.25 (model.channel_divisor 8 rounds both up alike): nothing to "
                  "prune; choose a smaller width"))
    # A MAC count: 'inf' used to be an OverflowError traceback, 0.4 "not a positive number".
    cases += [([str(src), "--out", "x.pt", "--target-macs", text],
               f"expected a finite MAC count >= 1 (e.g. 2.6e6), got '{text}'")
              for text in ("inf", "1e400", "0.4", "0", "-5", "nan", "many")]
    # a diverged run: the check that the saved network computes what the pruned one does met
    # NaN (never close to NaN) and raised a traceback blaming pruning
    saved = torch.load(src, weights_only=True)
    saved["model"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v
                      for k, v in saved["model"].items()}
    torch.save(saved, tmp_path / "nan.pt")
    cases.append(([str(tmp_path / "nan.pt"), "--out", "x.pt", "--target-width", "0.25"],
                  f"{tmp_path / 'nan.pt'}: the network's own output is not finite"))
    for argv, message in cases:
        try:
            code = prune_tool.main(argv)
        except SystemExit as e:  # argparse
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err, err


def _out_cases(tmp_path, src):
    """(--out, message) pairs the pruned checkpoint must not be written to."""
    (tmp_path / "same").mkdir()
    (tmp_path / "a_file").write_text("kept")
    os.link(src, tmp_path / "hard.pt")
    (tmp_path / "soft.pt").symlink_to(src)
    itself = "is the source checkpoint"
    return [(str(tmp_path / "same" / ".." / src.name), itself),
            (str(tmp_path / "hard.pt"), itself),
            (str(tmp_path / "soft.pt"), itself),
            (str(tmp_path / "same"), "is a folder; name the file to write"),
            (str(tmp_path / "new") + "/", "names a folder; name the file to write"),
            (os.devnull, "exists and is not a regular file"),
            ("-", "writes a file, not stdout"),  # it wrote a file named -
            (str(tmp_path / "a_file" / "sub" / "x.pt"), f"{tmp_path / 'a_file'} is not a folder")]


@needs_tp
def test_prune_tool_refuses_a_bad_out_before_pruning(tmp_path, capsys, monkeypatch):
    """An --out that is the source itself (through '..', a hard or a symbolic link) would lose
    the trained weights; a folder, a device or an uncreatable folder would fail only after the
    pruning: all are one line before any pruning work, and nothing is changed."""
    src, _ = write_checkpoint(tmp_path / "src.pt")
    before = src.read_bytes()

    def no_pruning(*a, **kw):
        raise AssertionError("pruned before --out was checked")

    monkeypatch.setattr(prune, "prune_to_macs", no_pruning)
    for out, message in _out_cases(tmp_path, src):
        code = prune_tool.main([str(src), "--out", out, "--target-width", "0.25"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: output ") and err.count("\n") == 1, err
        assert message in err and out in err, err
    assert src.read_bytes() == before and (tmp_path / "a_file").read_text() == "kept"
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "hard.pt", "same",
                                                           "soft.pt", "src.pt"]


@needs_tp
def test_prune_tool_save_failure_is_one_line(tmp_path, capsys, monkeypatch):
    src, _ = write_checkpoint(tmp_path / "src.pt")

    def disk_full(state, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_atomic", disk_full)
    out = tmp_path / "sub" / "deeper" / "pruned.pt"
    assert prune_tool.main([str(src), "--out", str(out), "--target-width", "0.25"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: output {out}: cannot write the pruned checkpoint (No space left " \
                  f"on device)\n", err
    # The folders the output check made are removed again: a failed run leaves nothing.
    assert [p.name for p in tmp_path.iterdir()] == ["src.pt"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "kept.txt").write_text("kept")
    assert prune_tool.main([str(src), "--out", str(out), "--target-width", "0.25"]) == 2
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["kept.txt"]


def test_prune_tool_without_torch_pruning_says_what_to_install(tmp_path, capsys, monkeypatch):
    src, _ = write_checkpoint(tmp_path / "src.pt")
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # as if not installed
    assert prune_tool.main([str(src), "--out", "x.pt", "--target-width", "0.25"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torch-pruning" in err
    assert "pip install --no-build-isolation -e .[prune]" in err  # setup.py needs torch


# --------------------------------------------------------------------------- your own pruning

@needs_tp
def test_a_network_pruned_by_torch_pruning_itself_becomes_a_pruned_checkpoint(tmp_path):
    """A researcher's own pruning (Torch-Pruning used directly): save_pruned writes what
    tools/prune.py would, so fine-tuning takes it with model.init_from and compare sets it
    against its source; without it, a hand-made checkpoint had no baseline."""
    import torch_pruning as tp

    from fasttrain import config as config_mod
    from fasttrain.compare.points import point_from_run

    src, _ = write_checkpoint(tmp_path / "src.pt", name="thin_resnet18", width=0.25, res=32)
    model, _ = ex.model_from_checkpoint(src)
    pruner = tp.pruner.MetaPruner(model, torch.zeros(1, 3, 32, 32),
                                  importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(x)
    out = tmp_path / "mine.pt"
    result = prune.save_pruned(model, src, out, method="my-method")
    state = ckpt.load(out)
    record = state["pruning"]
    assert (record["importance"], record["scope"], record["source_val_top1"]) == (
        "my-method", "custom", 91.0)
    source_macs = count_macs(create_model("thin_resnet18", width=0.25, num_classes=10),
                             32).conv_fc
    assert record["source_macs"] == result.source_macs == source_macs
    assert record["macs"] == result.macs == count_macs(model, 32).conv_fc < source_macs
    assert state["config"]["model"]["channels"] == channels_of(model)
    saved, _ = ex.model_from_checkpoint(out)
    with torch.no_grad():
        torch.testing.assert_close(saved(x), expected)
    assert record["torch_pruning"] == importlib.metadata.version("torch-pruning")
    # a network kept in bf16 (or on a GPU) is checked and saved as a checkpoint holds it, in
    # float32 on the CPU; "computes otherwise (CPUBFloat16Type) ..." refused it
    model.to(torch.bfloat16)
    prune.save_pruned(model, src, tmp_path / "bf16.pt", method="my-method")
    assert next(model.parameters()).dtype == torch.bfloat16  # the caller's network as it was
    weights = ckpt.load(tmp_path / "bf16.pt")["model"]
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    cfg = Config()
    cfg.model.init_from = str(out)
    apply_init_from(cfg.model, lineage=(lineage := {}))
    assert (lineage["importance"], lineage["fine_tuned_from"]) == ("my-method", str(out))
    cfg.data.val_res = cfg.data.train_res = cfg.data.val_resize = 32
    run = tmp_path / "ft"
    run.mkdir()
    (run / "config.yaml").write_text(config_mod.dump(cfg))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_top1": 88.0}) + "\n")
    point = point_from_run(run, [])
    assert point.label == "thin_resnet18 w0.25 pruned (my-method, custom)"
    assert (point.base_top1, point.base_macs, point.macs) == (91.0, source_macs, record["macs"])


@needs_tp
def test_save_pruned_refuses_what_is_not_a_channel_pruned_network_of_the_source(tmp_path):
    src, _ = write_checkpoint(tmp_path / "src.pt")  # cifar_resnet20 w0.5, option A
    out = tmp_path / "out.pt"

    def refused(model, words):
        with pytest.raises(prune.PruneError, match=words):
            prune.save_pruned(model, src, out, method="m")
        assert not out.exists()

    model, _ = ex.model_from_checkpoint(src)
    refused(model, r"the pruned network has 2,562,368 MACs at 16 px, not fewer than its "
                   r"source's 2,562,368")
    # a classifier left at another width than the stream it reads (a pruning tool's
    # stream pruned without its coupled layers): a network that cannot run
    model.fc = nn.Linear(12, 10)
    refused(model, r"the pruned network's weights do not fit the cifar_resnet20 its channel "
                   r"counts describe \(size mismatch for fc\.weight.*in CIFAR option-A networks")
    refused(nn.Sequential(nn.Conv2d(3, 4, 3)), r"not a cifar_resnet20 with channels removed")
