"""Engine: schedules, weight-decay groups, checkpoints, training, resume, DDP on CPU."""
import argparse
import copy
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import load_tool, write_code_running_checkpoint
from fasttrain.config import ScheduleConfig, load
from fasttrain.data import transforms
from fasttrain.engine import checkpoint as ckpt
from fasttrain.engine import distributed, loop, rundir, train
from fasttrain.engine.optim import param_groups
from fasttrain.engine.progress import Reporter
from fasttrain.engine.schedule import lr_factor
from fasttrain.errors import CheckpointError, ConfigError, DatasetError, RunError, TrainingError
from fasttrain.measure.env import usable_cores
from fasttrain.models import create_model

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def test_warmup_then_cosine_per_step():
    cfg = ScheduleConfig(epochs=10, kind="cosine", warmup_epochs=2, warmup_start_factor=0.1,
                         min_lr_factor=0.0)
    steps = 5
    assert lr_factor(cfg, 0, steps) == pytest.approx(0.1)
    assert lr_factor(cfg, 5, steps) == pytest.approx(0.1 + 0.9 * 5 / 10)
    assert lr_factor(cfg, 10, steps) == pytest.approx(1.0)
    assert lr_factor(cfg, 10 + 20, steps) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(cfg, 50, steps) == pytest.approx(0.0, abs=1e-12)
    values = [lr_factor(cfg, s, steps) for s in range(10, 51)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_ends_at_min_lr_factor():
    cfg = ScheduleConfig(epochs=10, kind="cosine", warmup_epochs=2, warmup_start_factor=0.1,
                         min_lr_factor=0.1)
    steps = 5  # cosine over steps 10..50

    def closed_form(t):
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    assert lr_factor(cfg, 10, steps) == pytest.approx(1.0)
    assert lr_factor(cfg, 30, steps) == pytest.approx(closed_form(0.5))  # 0.55
    assert lr_factor(cfg, 40, steps) == pytest.approx(closed_form(0.75))
    assert lr_factor(cfg, 50, steps) == pytest.approx(closed_form(1.0))  # 0.1, not 0


def test_cosine_over_the_whole_run_follows_timms_scheduler():
    """`cosine_span: whole_run` is timm's CosineLRScheduler with warmup_prefix=False (the RSB
    runs'): the cosine's clock starts at step 0, warmup (linear from the start factor to 1)
    replaces its first steps, and min_lr_factor is its floor."""
    epochs, warmup_epochs, steps, start, floor = 100, 5, 7, 2e-4, 0.01
    cfg = ScheduleConfig(epochs=epochs, kind="cosine", warmup_epochs=warmup_epochs,
                         warmup_start_factor=start, min_lr_factor=floor, cosine_span="whole_run")
    total, warmup = epochs * steps, warmup_epochs * steps

    def timm(t):  # timm/scheduler/cosine_lr.py _get_lr, one cycle, base LR 1, lr_min = floor
        if t < warmup:
            return start + t * (1 - start) / warmup
        return floor + 0.5 * (1 - floor) * (1 + math.cos(math.pi * t / total))

    factors = [lr_factor(cfg, t, steps) for t in range(total)]
    assert factors == pytest.approx([timm(t) for t in range(total)], rel=1e-12)
    assert factors[warmup] < 1 and factors[warmup] == pytest.approx(1, abs=1e-2)
    after = ScheduleConfig(**{**vars(cfg), "cosine_span": "after_warmup"})
    assert lr_factor(after, warmup, steps) == 1.0  # torchvision's: the cosine starts at the peak
    assert all(lr_factor(after, t, steps) > f for t, f in enumerate(factors) if warmup < t < total)


def test_each_rank_draws_its_own_stochastic_depth_stream():
    """Rank 0 keeps the single-process stream, other ranks get their own; a checkpoint of the
    same number of ranks gives each its saved stream back, one of another number gives rank 0
    the saved stream and the others fresh ones."""
    def draws(rank, world, saved=None, step=0):
        torch.manual_seed(7)
        loop._rank_rng(7, rank, world, saved, step)
        return torch.rand(4)

    single = draws(0, 1)
    assert torch.equal(draws(0, 2), single)
    others = [draws(r, 3) for r in (1, 2)]
    assert not torch.equal(others[0], single) and not torch.equal(others[0], others[1])
    torch.manual_seed(11)
    states = [loop._rng_state() for _ in range(2)]
    torch.manual_seed(12)
    states[1] = loop._rng_state()
    saved = {"rng": states[0], "rng_ranks": states}
    expect = []
    for state in states:
        loop._set_rng_state(state)
        expect.append(torch.rand(4))
    assert [torch.equal(draws(r, 2, saved), e) for r, e in enumerate(expect)] == [True, True]
    assert torch.equal(draws(0, 3, saved), expect[0])  # another world size: rank 0's stream
    assert not torch.equal(draws(1, 3, saved, step=5), draws(1, 3, saved, step=6))


@pytest.mark.parametrize("overrides, said", [
    (["--train.compile_mode=reduce-overhead"],
     "note: train.compile_mode=reduce-overhead has no effect: the model is not compiled "
     "(train.compile=null on cpu)"),
    (["--train.compile=true", "--train.compile_mode=max-autotune"],
     "note: train.compile_mode=max-autotune replays CUDA graphs on CUDA only: on cpu it "
     "compiles as max-autotune-no-cudagraphs"),
    (["--train.precision=fp16"], "note: train.precision=fp16 on the CPU is correct but slow"),
    (["--train.compile=true", "--train.compile_mode=max-autotune-no-cudagraphs"], None),
    # a policy's keys under another policy were accepted and silently unused
    (["--aug.auto_augment=trivialaugment", "--aug.randaug_magnitude=7", "--aug.randaug_ops=3"],
     "note: aug.randaug_ops=3, aug.randaug_magnitude=7.0 have no effect with "
     "aug.auto_augment=trivialaugment (read with aug.auto_augment=randaugment only)"),
    (["--aug.auto_augment=none", "--aug.auto_augment_interpolation=nearest"],
     "note: aug.auto_augment_interpolation=nearest has no effect with aug.auto_augment=none "
     "(read with aug.auto_augment=trivialaugment or randaugment only)"),
    (["--data.backend=torch", "--aug.auto_augment=randaugment", "--aug.randaug_magnitude=7",
      "--aug.auto_augment_interpolation=nearest"], None),
    # one optimizer's keys under the other were silently unused (quickstart: Nesterov SGD)
    (["--optim.name=lamb"], "note: optim.nesterov=true has no effect with optim.name=lamb "
                            "(read with optim.name=sgd only)"),
    (["--optim.name=lamb", "--optim.momentum=0.8", "--optim.nesterov=false"],
     "note: optim.momentum=0.8 has no effect with optim.name=lamb"),
    (["--optim.betas=[0.9, 0.98]", "--optim.eps=1e-8"],
     "note: optim.betas=[0.9, 0.98], optim.eps=1e-08 have no effect with optim.name=sgd (read "
     "with optim.name=lamb only)"),
    (["--optim.name=lamb", "--optim.nesterov=false", "--optim.betas=[0.9, 0.98]"], None),
    # so were a schedule's, a crop's or a feature's keys under another (or with it off)
    (["--schedule.kind=constant", "--schedule.gamma=0.5"],
     "note: schedule.gamma=0.5 has no effect with schedule.kind=constant (read with "
     "schedule.kind=step only)"),
    (["--data.max_res=32", "--data.end_ramp=3"], "note: data.max_res=32, data.end_ramp=3 have "
     "no effect with data.min_res=0 (read with data.min_res > 0 only)"),
    (["--aug.padding=8"], "note: aug.padding=8 has no effect with aug.train_crop=random_resized"),
    (["--aug.mix_prob=0.5"], "note: aug.mix_prob=0.5 has no effect with no mixup or cutmix"),
    (["--train.ema_decay=0.9"], "note: train.ema_decay=0.9 has no effect with train.ema=false"),
    (["--optim.bce_target_thresh=0.2"], "note: optim.bce_target_thresh=0.2 has no effect with "
     "optim.loss=ce"),
    (["--optim.loss=bce", "--optim.bce_target_thresh=0.2", "--train.ema=true",
      "--train.ema_decay=0.9", "--aug.mixup_alpha=0.2", "--aug.mix_prob=0.5",
      "--schedule.kind=step", "--schedule.gamma=0.5", "--data.min_res=8", "--data.max_res=16",
      "--data.end_ramp=3", "--aug.train_crop=pad_random", "--aug.padding=2"], None),
    ([], None)])
def test_settings_that_run_otherwise_than_expected_get_a_note(overrides, said):
    cfg = load(QUICKSTART, overrides)
    printed = []
    use_compile = bool(cfg.train.compile)
    loop._note_settings_without_effect(cfg, torch.device("cpu"), use_compile,
                                       type("Report", (), {"print": printed.append})())
    assert [p.startswith(said) for p in printed] == ([True] if said else [])


def test_fp16_whose_first_step_overflows_adds_no_scheduler_warning(data_root, tmp_path,
                                                                   monkeypatch):
    # the scaler skips a step whose gradients overflow; torch then warned that the schedule
    # stepped before the optimizer (advice for code calling them out of order)
    import warnings

    class OverflowingScaler(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "init_scale": 2.0 ** 100})

    monkeypatch.setattr(torch.amp, "GradScaler", OverflowingScaler)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        summary = train(_cfg(data_root, tmp_path, "--train.precision=fp16", "--model.width=0.25",
                             "--schedule.epochs=1", "--schedule.warmup_epochs=0",
                             "--train.max_steps=2", "--data.batch_size=16"))
    assert summary["step"] == 2
    assert not [w for w in seen if "lr_scheduler.step()" in str(w.message)]


def test_cuda_rng_states_of_more_devices_than_visible_restore_the_visible_ones(monkeypatch):
    """A checkpoint from a node showing 8 GPUs resumed where 2 are visible: set_rng_state_all
    indexed past torch's generators (IndexError)."""
    restored = []
    state = {**loop._rng_state(), "cuda": [torch.tensor(i) for i in range(8)]}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: restored.append((int(s), d)))
    loop._set_rng_state(state)
    assert restored == [(0, 0), (1, 1)]


def test_accuracy_counts_top5_includes_the_fifth_ranked_class():
    logits = torch.arange(10.0).repeat(3, 1)  # class 9 ranks first, class 5 fifth, 4 sixth
    top1, top5 = loop.accuracy_counts(logits, torch.tensor([9, 5, 4]))
    assert (top1.item(), top5.item()) == (1, 2)
    # fewer than 5 classes: top-5 is capped at the class count, so every label is a hit
    top1, top5 = loop.accuracy_counts(torch.arange(3.0).repeat(2, 1), torch.tensor([0, 2]))
    assert (top1.item(), top5.item()) == (1, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_accuracy_counts_an_image_with_non_finite_logits_as_a_miss(bad):
    logits = torch.arange(10.0).repeat(3, 1)
    logits[0, 3] = bad  # NaN/inf ranks first: "class 3" would be a hit
    logits[1, 0] = bad  # its label 9 still ranks first among the finite logits
    top1, top5 = loop.accuracy_counts(logits, torch.tensor([3, 9, 9]))
    assert (top1.item(), top5.item()) == (1, 1)


def test_step_and_constant_schedules():
    cfg = ScheduleConfig(epochs=9, kind="step", milestones=[3, 6], gamma=0.1)
    assert [lr_factor(cfg, e * 10, 10) for e in (0, 2, 3, 5, 6, 8)] == \
        pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lr_factor(ScheduleConfig(kind="constant"), 123, 10) == 1.0


def test_weight_decay_groups_by_rank_not_name():
    model = create_model("cifar_resnet20", width=0.25)
    decay, no_decay = param_groups(model, 5e-4, decay_norm_and_bias=False)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    (only,) = param_groups(model, 5e-4, decay_norm_and_bias=True)
    assert len(only["params"]) == len(list(model.parameters()))


def test_best_pt_is_a_copy_where_hard_links_fail(tmp_path, monkeypatch):
    (tmp_path / "last.pt").write_bytes(b"new" * 100)
    (tmp_path / "best.pt").write_bytes(b"old")

    def no_links(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    ckpt.link_or_copy_atomic(tmp_path / "last.pt", tmp_path / "best.pt")
    assert (tmp_path / "best.pt").read_bytes() == b"new" * 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temp file


def test_atomic_save_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_atomic({"model": {"w": torch.ones(2)}}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt.save_atomic({"model": {"w": torch.zeros(2)}}, path)
    assert torch.equal(ckpt.load(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left


def test_an_atomic_write_keeps_a_files_mode_but_not_a_link_targets(tmp_path):
    """A replaced file keeps its mode; a symbolic link is replaced by a file of the default
    mode, not its target's (a link to /dev/null made a world-writable file)."""
    private, fresh = tmp_path / "private", tmp_path / "fresh"
    private.write_text("old")
    private.chmod(0o600)
    ckpt.write_atomic(private, lambda f: f.write(b"new"))
    ckpt.write_atomic(fresh, lambda f: f.write(b"new"))
    shared, link = tmp_path / "shared", tmp_path / "link"
    shared.write_text("kept")
    shared.chmod(0o666)
    link.symlink_to(shared)
    ckpt.write_atomic(link, lambda f: f.write(b"new"))
    assert private.stat().st_mode & 0o777 == 0o600 and private.read_bytes() == b"new"
    assert not link.is_symlink() and link.read_bytes() == b"new"
    assert link.stat().st_mode & 0o777 == fresh.stat().st_mode & 0o777 != 0o666
    assert shared.read_text() == "kept"


def test_load_refuses_code_execution_and_garbage(tmp_path):
    marker = tmp_path / "pwned"
    evil = write_code_running_checkpoint(tmp_path / "evil.pt", marker)
    # the reason, not torch's paragraph of advice around it
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint \(refused by weights-only "
                                              r"loading: .*GLOBAL (posix|os)\.system") as e:
        ckpt.load(evil)
    assert not marker.exists()
    assert "factory" not in str(e.value)  # no hint to load a file that calls a function
    # another project's checkpoint: torch's message names the global on a line of its own
    torch.save({"model": {}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError) as e:
        ckpt.load(tmp_path / "other.pt")
    assert str(e.value) == (f"{tmp_path / 'other.pt'}: cannot load checkpoint (refused by "
                            f"weights-only loading: Unsupported global: GLOBAL "
                            f"argparse.Namespace was not an allowed global by default.; if it "
                            f"is a model you saved whole with torch.save(model), "
                            f"tools/evaluate.py and tools/benchmark.py take it through "
                            f"--factory, a function of yours that loads it)")
    # a whole model: the hint is what helps (--checkpoint refuses it, --file sends it here)
    torch.save(create_model("cifar_resnet20", width=0.25), tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match=r"GLOBAL fasttrain\.models\.resnet\.CifarResNet "
                                              r".*take it through --factory"):
        ckpt.load(tmp_path / "whole.pt")
    (tmp_path / "garbage.pt").write_text("garbage\n")
    with pytest.raises(CheckpointError, match=r"garbage\.pt: not a checkpoint \(not written "
                                              r"by torch\.save: another format, or damaged; "
                                              r"Unsupported operand 103\)$"):
        ckpt.load(tmp_path / "garbage.pt")
    (tmp_path / "net.onnx").write_bytes(b"\x08\x08\x12\x07pytorch")  # an ONNX protobuf's start
    with pytest.raises(CheckpointError, match=r"net\.onnx: not a checkpoint \(an ONNX file: "
                                              r"tools/evaluate\.py and tools/benchmark\.py "
                                              r"take exported files with --file; "):
        ckpt.load(tmp_path / "net.onnx")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a fasttrain checkpoint"):
        ckpt.load(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError):
        ckpt.load(tmp_path / "junk.pt")
    # a copy cut short: torch says "[Errno 22] Invalid argument" or "failed finding central
    # directory" depending on where the cut falls; both are one line saying what happened
    ckpt.save_atomic({"model": create_model("cifar_resnet20", width=0.25).state_dict()},
                     tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    for cut in (0.1, 0.5, 0.99, 30_000 / len(data)):
        (tmp_path / "cut.pt").write_bytes(data[:int(len(data) * cut)])
        for mmap in (False, True):
            with pytest.raises(CheckpointError) as e:
                ckpt.load(tmp_path / "cut.pt", mmap=mmap)
            assert str(e.value) == (
                f"{tmp_path / 'cut.pt'}: cannot load checkpoint (truncated or damaged: a zip "
                f"archive (as torch writes checkpoints and exports) whose directory at the end "
                f"is missing; {int(len(data) * cut):,} bytes; copy it again or use another "
                f"checkpoint)")
    # the legacy reader's EOFError() and KeyError(<number>) become words
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("junk\n")
    for name in ("empty.pt", "text.pt"):
        with pytest.raises(CheckpointError, match=r"cannot load checkpoint \(empty, truncated or "
                                                  r"not written by torch.save\)$"):
            ckpt.load(tmp_path / name)


def test_unwrap_compiled_model():
    model = create_model("cifar_resnet20", width=0.25)
    assert ckpt.unwrap(torch.compile(model)) is model


def _cfg(data_root, log_dir, *overrides):
    return load(QUICKSTART, [f"--data.path={data_root / 'digits'}", f"--log.dir={log_dir}",
                             "--log.progress=plain", *overrides])


@pytest.mark.slow
def test_smoke_training_writes_run_directory_and_loss_decreases(data_root, tmp_path):
    summary = train(_cfg(data_root, tmp_path, "--schedule.epochs=3", "--log.name=smoke"),
                    recipe=str(QUICKSTART))
    run = tmp_path / "smoke"
    assert Path(summary["run_dir"]) == run
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    for key in ("val_top1", "val_top5", "val_loss", "train_loss", "epoch_time_s", "lr",
                "train_time_s", "world_size"):
        assert all(math.isfinite(m[key]) for m in lines), key
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert lines[-1]["val_top1"] > 30  # chance is 10 %
    assert lines[0]["train_images"] == 1433 // 64 * 64
    saved = load(run / "config.yaml")
    assert saved.model.num_classes == 10 and saved.schedule.epochs == 3
    last = ckpt.load(run / "checkpoints" / "last.pt")
    best = ckpt.load(run / "checkpoints" / "best.pt")
    assert last["train_state"]["epoch"] == 3
    assert best["metrics"]["val_top1"] == max(m["val_top1"] for m in lines)
    assert last["classes"] == [str(d) for d in range(10)]  # label order, for exported files
    model = create_model("cifar_resnet20", width=0.5, num_classes=10)
    model.load_state_dict(last["model"])  # plain module keys, no DDP/compile prefixes
    # The same explicit run name again would overwrite a resumable run: refused.
    with pytest.raises(RunError, match="already holds checkpoints"):
        train(_cfg(data_root, tmp_path, "--schedule.epochs=3", "--log.name=smoke"))


@pytest.mark.slow
def test_resume_continues_exactly_where_it_stopped(data_root, tmp_path, monkeypatch):
    args = ("--schedule.epochs=3", "--schedule.warmup_epochs=1", "--train.seed=7")
    straight = train(_cfg(data_root, tmp_path, *args, "--log.name=straight"))

    real_save, calls = loop._save, []

    def save_then_crash(*a, **kw):
        real_save(*a, **kw)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after epoch 2 was checkpointed

    monkeypatch.setattr(loop, "_save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(data_root, tmp_path, *args, "--log.name=resumed"))
    monkeypatch.setattr(loop, "_save", real_save)
    resumed = train(_cfg(data_root, tmp_path, *args, "--log.name=resumed"), resume="auto")
    assert resumed["epoch"] == 3 and resumed["run_dir"] == str(tmp_path / "resumed")

    a = ckpt.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = ckpt.load(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3]
    assert json.loads(lines[-1])["val_top1"] == straight["val_top1"]


def test_resume_of_a_run_folder_refuses_another_log_name(data_root, tmp_path):
    """`--resume runs/A --log.name=B` trained in A, wrote name B into A's config.yaml, and a
    later `--resume auto` from that file started a new run B from scratch."""
    train(_cfg(data_root, tmp_path, "--schedule.epochs=2", "--train.max_steps=1",
               "--log.name=A"))
    config_before = (tmp_path / "A" / "config.yaml").read_bytes()
    for dry_run in (True, False):
        with pytest.raises(ConfigError, match=rf"^log.name=B: --resume {re.escape(str(tmp_path))}"
                                              rf"/A continues the run A \(.*\) in its folder; "
                                              rf"drop --log.name, or start a new run from its "
                                              rf"weights with --model.init_from="):
            train(_cfg(data_root, tmp_path, "--schedule.epochs=2", "--log.name=B"),
                  resume=str(tmp_path / "A"), dry_run=dry_run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A"]
    assert (tmp_path / "A" / "config.yaml").read_bytes() == config_before
    # its own name, or none, continue it
    train(_cfg(data_root, tmp_path, "--schedule.epochs=2", "--train.max_steps=2",
               "--log.name=A"), resume=str(tmp_path / "A"), dry_run=True)


@pytest.mark.slow
def test_resume_refuses_another_architecture(data_root, tmp_path):
    train(_cfg(data_root, tmp_path, "--schedule.epochs=1", "--schedule.warmup_epochs=0",
               "--log.name=r"))
    cfg = _cfg(data_root, tmp_path, "--schedule.epochs=2", "--schedule.warmup_epochs=0",
               "--model.width=0.25", "--log.name=r")
    with pytest.raises(CheckpointError, match="model.width=0.5 but the config has 0.25"):
        train(cfg, resume=str(tmp_path / "r"))
    # Weights that do not fit although the config keys agree: one line before any folder (a
    # torch traceback came after a new run folder was made, and a dry run passed them).
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=False)
    state["model"]["renamed.weight"] = state["model"].pop("fc.weight")
    torch.save(state, tmp_path / "renamed.pt")
    before = sorted(tmp_path.iterdir())
    for dry_run in (True, False):
        with pytest.raises(CheckpointError, match=r"renamed.pt: weights do not fit the model "
                                                  r"config \(Error\(s\) in loading state_dict "
                                                  r"for CifarResNet: .*fc.weight"):
            train(_cfg(data_root, tmp_path, "--schedule.epochs=2", "--schedule.warmup_epochs=0"),
                  resume=str(tmp_path / "renamed.pt"), dry_run=dry_run)
    assert sorted(tmp_path.iterdir()) == before
    # a state dict saved from the compiled (or DDP-wrapped) module loads as the plain one
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=False)
    state["model"] = {f"_orig_mod.{k}": v for k, v in state["model"].items()}
    torch.save(state, tmp_path / "compiled.pt")
    assert ckpt.load(tmp_path / "compiled.pt")["model"].keys() == \
        torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=False)["model"].keys()
    train(_cfg(data_root, tmp_path, "--schedule.epochs=2", "--schedule.warmup_epochs=0"),
          resume=str(tmp_path / "compiled.pt"), dry_run=True)


def test_dry_run_prints_config_and_counts(run_tool, tmp_path):
    result = run_tool("train.py", str(QUICKSTART), "--dry-run", f"--log.dir={tmp_path / 'runs'}")
    assert result.returncode == 0, result.stderr
    assert "68,050" in result.stdout  # cifar_resnet20 w0.5 params
    assert "name: cifar_resnet20" in result.stdout
    assert "1,433 training / 364 validation images, 10 classes; 22 steps/epoch x 64 global " \
           "batch, 1 rank" in " ".join(result.stdout.split()), result.stdout
    assert not (tmp_path / "runs").exists()  # nothing written


def test_runs_where_the_platform_has_no_affinity_mask(data_root, tmp_path, monkeypatch):
    """macOS has no os.sched_getaffinity: every run died on it (a dry run too); the threads
    then come from every core."""
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert usable_cores() == 3
    train(_cfg(data_root, tmp_path), dry_run=True)


def test_a_dry_run_checks_what_resume_and_log_name_would_meet(data_root, tmp_path):
    """A dry run said "recipe is valid" for a --resume that names nothing and for a taken
    --log.name, both refused by the real run; it checks them now, still writing nothing."""
    with pytest.raises(RunError, match=r"--resume .*nothing.pt: no checkpoint at"):
        train(_cfg(data_root, tmp_path), resume=str(tmp_path / "nothing.pt"), dry_run=True)
    _fake_run(tmp_path, "taken", last=False, metrics='{"epoch": 1}\n')
    with pytest.raises(RunError, match=r"taken: run directory already holds checkpoints"):
        train(_cfg(data_root, tmp_path, "--log.name=taken"), dry_run=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    # one another training is writing: that, as the real run says (not "pass --resume auto")
    holder = _hold_lock(tmp_path / "taken")
    try:
        with pytest.raises(RunError, match=r"taken: another training process is writing"):
            train(_cfg(data_root, tmp_path, "--log.name=taken"), dry_run=True)
    finally:
        holder.kill()
        holder.wait()
    rundir.lock_run_dir(tmp_path / "taken")  # the dry run let go of it
    rundir.release_run_dirs()


def test_sync_bn_on_cpu_ranks_is_one_line_before_anything_is_written(data_root, tmp_path):
    """torch's SyncBatchNorm synchronises GPU tensors only: on CPU ranks it raised at the first
    training step, after the run folder was made."""
    cfg = _cfg(data_root, tmp_path, "--train.sync_bn=true")
    two_cpu_ranks = distributed.DistInfo(0, 2, 0, 2, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"^train.sync_bn=true needs CUDA devices \(torch's "
                                          r"SyncBatchNorm synchronises GPU tensors only\); "
                                          r"this run is on cpu$"):
        loop._train(cfg, two_cpu_ranks, Reporter("plain", True), None, None, dry_run=False)
    assert list(tmp_path.iterdir()) == []
    # one process has nothing to synchronise: the setting changes nothing there
    summary = train(_cfg(data_root, tmp_path, "--train.sync_bn=true"), dry_run=True)
    assert summary["params"] == train(_cfg(data_root, tmp_path), dry_run=True)["params"]


def test_cpu_compile_without_a_cxx_compiler_is_one_line_before_anything_is_written(
        data_root, tmp_path):
    """Inductor's CPU kernels need a C++ compiler; without one the first step failed with a
    ~100-line traceback after the run folder was made, and --dry-run passed."""
    import torch._inductor.config as inductor_config
    cfg = _cfg(data_root, tmp_path, "--train.compile=true")
    with inductor_config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        for dry_run in (True, False):
            with pytest.raises(ConfigError, match=r"^train.compile=true on the CPU: Inductor "
                                                  r"found no working C\+\+ compiler \(tried: "
                                                  r".*no-such-g\+\+\); install g\+\+ or set "
                                                  r"CXX, or train with --train.compile=false$"):
                train(cfg, dry_run=dry_run)
        # the check is about compiling: an eager run is not refused
        assert train(_cfg(data_root, tmp_path, "--train.compile=false"), dry_run=True)
    assert list(tmp_path.iterdir()) == []
    assert loop._cpu_compiler_problem() is None  # this machine has g++


def _torchrun_quickstart(data_root: Path, tmp_path: Path, *args: str, timeout: int = 300):
    """tools/train.py on the quickstart recipe, 1 epoch, under torchrun with 2 CPU ranks."""
    env = {**os.environ, "FASTTRAIN_DATA": str(data_root)}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "tools" / "train.py"), str(QUICKSTART), "--schedule.epochs=1",
         "--schedule.warmup_epochs=0", f"--log.dir={tmp_path}", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_process_gloo_torchrun(data_root, tmp_path):
    result = _torchrun_quickstart(data_root, tmp_path, "--log.name=ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text()
                  .splitlines()]
    assert metrics["world_size"] == 2
    # Each rank draws 32 of its 716-sample shard per step: 22 steps x 64 images in all.
    assert metrics["train_images"] == 22 * 64
    assert 0 <= metrics["val_top1"] <= 100
    assert result.stdout.count("epoch 1/1") == 1  # only rank 0 reports


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "resident"])
def test_a_rank_without_validation_images_does_not_hang(data_root, tmp_path, backend):
    """One validation image on 2 ranks: rank 1 has no batch. Validation ran the DDP wrapper,
    whose forward starts with a buffer broadcast that rank 1 never joined: both waited."""
    import shutil

    digits, folder = data_root / "digits", tmp_path / "one_val"
    for cls in ("0", "1"):
        (folder / "train" / cls).mkdir(parents=True)
        for image in sorted((digits / "train" / cls).iterdir())[:40]:
            shutil.copy(image, folder / "train" / cls)
    (folder / "val" / "0").mkdir(parents=True)
    shutil.copy(sorted((digits / "val" / "0").iterdir())[0], folder / "val" / "0")
    result = _torchrun_quickstart(
        data_root, tmp_path, "--log.name=r", "--data.dataset=imagefolder",
        f"--data.path={folder}", f"--data.backend={backend}", "--data.batch_size=16",
        "--data.val_batch_size=8", "--data.num_workers=0", "--train.ema=true",
        timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text()
                  .splitlines()]
    assert metrics["val_top1"] in (0.0, 100.0) and metrics["val_top1_ema"] in (0.0, 100.0)


@pytest.mark.slow
def test_ema_metrics_under_ddp_are_those_of_the_saved_ema(data_root, tmp_path):
    """Each rank's EMA averages its own BatchNorm statistics: the ranks validated slightly
    different EMAs, none of them exactly the one saved (rank 0's)."""
    from fasttrain.data import build_loaders
    from fasttrain.engine.ema import ModelEma
    from fasttrain.engine.precision import resolve_precision

    result = _torchrun_quickstart(data_root, tmp_path, "--log.name=ema", "--train.ema=true",
                                  "--train.ema_steps=1", "--train.ema_decay=0.999",
                                  "--schedule.epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(l) for l in (tmp_path / "ema" / "metrics.jsonl").read_text()
               .splitlines()][-1]
    saved = ckpt.load(tmp_path / "ema" / "checkpoints" / "last.pt")
    cfg = load(QUICKSTART, [f"--data.path={data_root / 'digits'}"])
    model = create_model("cifar_resnet20", width=0.5, num_classes=10)
    model.load_state_dict(saved["model"])
    ema = ModelEma(model, 0.999, 1)
    ema.load_state_dict(saved["ema"])
    val = build_loaders(cfg.data, cfg.aug).val
    fp32, cpu = resolve_precision("fp32"), torch.device("cpu")
    # One process, other batches: float rounding only (the mismatch was 1.6e-6 relative).
    for module, key in ((model, "val_loss"), (ema.module, "val_loss_ema")):
        again = loop.evaluate(module, val, fp32, cpu)
        assert again["val_loss"] == pytest.approx(metrics[key], rel=4e-7), key


@pytest.mark.slow
def test_an_error_in_one_ranks_share_is_said_by_that_rank(data_root, tmp_path):
    """Rank 1's first batch is one unreadable file: only rank 1 can see it. Only rank 0 used to
    print errors, so nothing was said (rank 0 printed gloo's traceback)."""
    import shutil

    from fasttrain.data import EpochSampler

    digits, folder = data_root / "digits", tmp_path / "bad_in_rank_1"
    for split, count in (("train", 8), ("val", 1)):
        for cls in ("0", "1"):
            (folder / split / cls).mkdir(parents=True)
            for image in sorted((digits / split / cls).iterdir())[:count]:
                shutil.copy(image, folder / split / cls)
    files = sorted((folder / "train").glob("*/*.jpg"))  # the loaders' order
    (_, first_of_rank_1, _), *_ = EpochSampler(len(files), rank=1, world_size=2, seed=0)
    files[first_of_rank_1].write_bytes(b"")
    result = _torchrun_quickstart(
        data_root, tmp_path, "--log.name=r", "--data.dataset=imagefolder",
        f"--data.path={folder}", "--data.backend=torch", "--data.batch_size=2",
        "--data.val_batch_size=2", "--data.num_workers=0", "--train.seed=0", timeout=150)
    assert result.returncode != 0
    # (the unreadable file's batch is dropped: the loader yields 7 batches, then runs out)
    assert (f"error: [rank 1] epoch 1: the training data ran out after 7 of 8 batches because a "
            f"whole batch was unreadable files (1 skipped so far; first: "
            f"{files[first_of_rank_1]}: empty file)") in result.stderr, result.stderr[-3000:]
    # The ranks' own output, before torchrun's failure report: one line each, no traceback.
    ranks_said = re.split(r"^[EW]\d{4} .*(?:closing signal|failed \(exitcode)", result.stderr,
                          flags=re.M)[0]
    assert "Traceback" not in ranks_said, result.stderr[-3000:]


def test_validation_with_no_readable_image_is_one_line(tmp_path):
    """Every validation file skipped: a DatasetError, not a ZeroDivisionError traceback."""
    from fasttrain.engine.precision import resolve_precision

    class NoBatches(list):
        skipped = {"val/0/a.jpg": "empty file"}

    model = create_model("cifar_resnet20", width=0.25, num_classes=2)
    with pytest.raises(DatasetError, match=r"^validation: no readable image, every file was "
                                           r"skipped \(first: val/0/a\.jpg: empty file\)"):
        loop.evaluate(model, NoBatches(), resolve_precision("fp32"), torch.device("cpu"))


def test_graph_steps_only_for_cuda_graph_compile_modes(data_root, tmp_path):
    cfg = _cfg(data_root, tmp_path, "--train.compile_mode=reduce-overhead")
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert loop._graph_steps(cfg, cuda, use_compile=True)
    assert not loop._graph_steps(cfg, cuda, use_compile=False)
    assert not loop._graph_steps(cfg, cpu, use_compile=True)  # Inductor graphs CUDA only
    for mode in ("default", "max-autotune-no-cudagraphs"):
        cfg = _cfg(data_root, tmp_path, f"--train.compile_mode={mode}")
        assert not loop._graph_steps(cfg, cuda, use_compile=True)


def test_cuda_graph_steps_with_gradient_accumulation_are_refused_up_front(data_root, tmp_path):
    """A graph replay overwrites the gradients the previous micro-batch left: torch stopped at
    the second micro-batch with a traceback, after the data had been set up."""
    cuda = torch.device("cuda", 0)
    for mode in ("reduce-overhead", "max-autotune"):
        cfg = _cfg(data_root, tmp_path, f"--train.compile_mode={mode}",
                   "--train.grad_accum_steps=2")
        with pytest.raises(ConfigError, match=rf"^train.compile_mode={mode} replays CUDA graphs, "
                                              rf"which cannot accumulate gradients over "
                                              rf"train.grad_accum_steps=2 micro-batches; "):
            loop._check_graph_accumulation(cfg, cuda, use_compile=True)
        loop._check_graph_accumulation(cfg, cuda, use_compile=False)
        loop._check_graph_accumulation(cfg, torch.device("cpu"), use_compile=True)
    cfg = _cfg(data_root, tmp_path, "--train.compile_mode=max-autotune-no-cudagraphs",
               "--train.grad_accum_steps=2")
    loop._check_graph_accumulation(cfg, cuda, use_compile=True)


def test_evaluate_with_graph_steps_equals_plain(tmp_path):
    """The CUDA-graph bookkeeping of evaluate (step marks, the flip pass's copy) changes no
    number; the CPU twin of the path reduce-overhead takes on a GPU."""
    from fasttrain.engine.precision import resolve_precision

    torch.manual_seed(0)
    model = create_model("thin_resnet18", width=0.25, num_classes=10)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(3)]
    fp32 = resolve_precision("fp32")
    plain = loop.evaluate(model, batches, fp32, torch.device("cpu"), flip=True)
    graphed = loop.evaluate(model, batches, fp32, torch.device("cpu"), flip=True,
                            graph_steps=True)
    assert graphed == plain and plain["val_loss"] > 0


def test_each_epoch_records_its_training_resolution(data_root, tmp_path):
    """With progressive resizing the resolution an epoch trained at was in no output: a
    throughput or loss change between epochs could not be told from a resolution step."""
    train(_cfg(data_root, tmp_path, "--schedule.epochs=3", "--data.min_res=8",
               "--data.max_res=16", "--data.start_ramp=0", "--data.end_ramp=2",
               "--log.name=prog"))
    lines = [json.loads(l) for l in (tmp_path / "prog" / "metrics.jsonl").read_text()
             .splitlines()]
    assert [m["train_res"] for m in lines] == [8, 8, 16]


def test_compile_allows_a_graph_per_progressive_resolution(data_root, tmp_path, monkeypatch):
    """Ten training resolutions (64 .. 352 px by 32) need ten graphs: past torch's default
    recompile_limit of 8 the later ones trained eager, silently."""
    cfg = _cfg(data_root, tmp_path, "--schedule.epochs=12", "--data.min_res=64",
               "--data.max_res=352", "--data.start_ramp=1", "--data.end_ramp=10")
    assert len({transforms.progressive_resolution(cfg.data, e) for e in range(12)}) == 10
    assert loop._recompile_limit(cfg) == 14
    seen, dynamo_config = [], torch._dynamo.config
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(
        dynamo_config.recompile_limit) or model)
    # not monkeypatch.setattr: its undo deletes a config module's entry for good
    before, dynamo_config.recompile_limit = dynamo_config.recompile_limit, 8
    try:
        train(_cfg(data_root, tmp_path, "--schedule.epochs=12", "--data.min_res=64",
                   "--data.max_res=352", "--data.start_ramp=1", "--data.end_ramp=10",
                   "--train.compile=true", "--train.max_steps=1"))
        after = dynamo_config.recompile_limit
    finally:
        dynamo_config.recompile_limit = before
    assert seen and set(seen) == {14}
    assert after == 8  # put back: a notebook's own torch.compile calls kept the raised limit


@pytest.mark.slow
def test_compiled_training_on_cpu_matches_eager(data_root, tmp_path):
    """The GPU default path (torch.compile) exercised on CPU: ~1 min of Inductor compilation."""
    args = ("--schedule.epochs=1", "--schedule.warmup_epochs=0")
    eager = train(_cfg(data_root, tmp_path, *args, "--log.name=eager"))
    compiled = train(_cfg(data_root, tmp_path, *args, "--log.name=compiled",
                          "--train.compile=true"))
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], abs=0.02)
    state = ckpt.load(tmp_path / "compiled" / "checkpoints" / "last.pt")["model"]
    assert not [k for k in state if "_orig_mod" in k or k.startswith("module.")]


@pytest.mark.slow
def test_grad_accumulation_keeps_the_global_batch_and_tensorboard_logs(data_root, tmp_path,
                                                                        capsys):
    summary = train(_cfg(data_root, tmp_path, "--schedule.epochs=2", "--train.grad_accum_steps=2",
                         "--train.max_steps=3", "--log.tensorboard=true", "--train.ema=true",
                         "--train.ema_steps=1", "--log.name=acc"))
    assert summary["step"] == 3 and summary["epoch"] == 1
    (metrics,) = [json.loads(l) for l in (tmp_path / "acc" / "metrics.jsonl").read_text()
                  .splitlines()]
    assert metrics["train_images"] == 3 * 64  # 3 steps of 2 micro-batches of 32
    assert "val_top1_ema" in metrics and metrics["epoch_step"] == 3
    # the EMA's top-1 and the cut are on screen too (they were in metrics.jsonl only)
    printed = " ".join(capsys.readouterr().out.split())
    assert f"val_top1_ema {metrics['val_top1_ema']:.2f}" in printed
    assert "(cut after 3 steps)" in printed
    assert f"final val top-1 (EMA) │ {metrics['val_top1_ema']:.2f} %" in printed
    assert list((tmp_path / "acc" / "tensorboard").glob("events.out.tfevents.*"))
    saved = ckpt.load(tmp_path / "acc" / "checkpoints" / "last.pt")
    assert saved["train_state"]["step"] == 3 and "ema" in saved


def test_the_summary_shows_a_long_run_directory_whole(capsys):
    """Under a pipe the summary's value column cut a long path with '…' (not copyable)."""
    path = "/tmp/" + "n" * 260 + "/run"
    Reporter("plain", True).summary([("run directory", path)], "done")
    printed = capsys.readouterr().out
    assert "…" not in printed
    assert path in "".join(printed.replace("│", "").split())


# --------------------------------------------------------------------------- run directories

def _fake_run(log_dir: Path, name: str, *, last=True, best=False, metrics="") -> Path:
    run = log_dir / name
    (run / "checkpoints").mkdir(parents=True)
    if last:
        (run / "checkpoints" / "last.pt").write_bytes(b"x")
    if best:
        (run / "checkpoints" / "best.pt").write_bytes(b"x")
    if metrics:
        (run / "metrics.jsonl").write_text(metrics)
    return run


def test_reruns_of_different_runs_configs_are_named_apart(tmp_path):
    """`tools/train.py runs/a/config.yaml` named every such rerun config-<date>-<time>, and
    `--resume auto` of another run's config.yaml continued it."""
    from fasttrain.engine.loop import recipe_stem

    (tmp_path / "runs" / "a" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "b").mkdir(parents=True)
    (tmp_path / "runs" / "b" / "metrics.jsonl").write_text("{}\n")
    assert recipe_stem(tmp_path / "runs" / "a" / "config.yaml") == "a"
    assert recipe_stem(tmp_path / "runs" / "b" / "config.yaml") == "b"
    # a recipe that happens to be called config.yaml, outside a run folder: its own name
    assert recipe_stem(tmp_path / "runs" / "config.yaml") == "config"
    assert recipe_stem("recipes/quickstart.yaml") == "quickstart"
    assert recipe_stem(None) == "run"


def test_resume_auto_takes_only_runs_of_the_same_recipe(tmp_path):
    mine = _fake_run(tmp_path, "quickstart-20261130-060000")
    os.utime(mine / "checkpoints" / "last.pt", (1, 1))  # older than the other recipe's run
    _fake_run(tmp_path, "quickstart-small-20261130-070000")
    _fake_run(tmp_path, "quickstart-notes")
    found = rundir.find_resume("auto", tmp_path, "", "quickstart")
    assert found == mine / "checkpoints" / "last.pt"
    assert rundir.find_resume("auto", tmp_path, "", "quickstart-small").parent.parent.name == \
        "quickstart-small-20261130-070000"
    assert rundir.is_run_of(tmp_path / "quickstart-20261130-060000-2", "quickstart")


def test_resume_auto_takes_the_newest_run_even_before_its_first_checkpoint(tmp_path):
    """A new run stopped before its first checkpoint: auto starts fresh, never falls back to an
    older (perhaps finished) run, which it would train further."""
    older = _fake_run(tmp_path, "quickstart-20261130-060000")
    newer = _fake_run(tmp_path, "quickstart-20261130-060000-1")
    os.utime(newer / "checkpoints" / "last.pt", (1, 1))  # its file older: the name decides
    assert rundir.find_resume("auto", tmp_path, "", "quickstart") == \
        newer / "checkpoints" / "last.pt"
    _fake_run(tmp_path, "quickstart-20261130-070000", last=False)  # interrupted, no checkpoint
    os.utime(older / "checkpoints" / "last.pt")  # the older run's checkpoint is the newest file
    assert rundir.find_resume("auto", tmp_path, "", "quickstart") is None


def test_new_run_dir_never_reuses_a_folder_holding_a_run(tmp_path):
    _fake_run(tmp_path, "only_best", last=False, best=True)
    # two epochs of metrics: it had checkpoints (removed since), not a first one in writing
    _fake_run(tmp_path, "only_metrics", last=False, metrics='{"epoch": 1}\n{"epoch": 2}\n')
    for name in ("only_best", "only_metrics"):
        with pytest.raises(RunError, match="already holds checkpoints or metrics"):
            rundir.new_run_dir(tmp_path, name, "quickstart")
        # --resume auto with that name: one line saying why, not "starting fresh" and then
        # new_run_dir's advice to pass --resume auto
        with pytest.raises(RunError, match=rf"--resume auto: {tmp_path / name} holds a run "
                                           rf"\(checkpoints or metrics\) but no "
                                           rf"checkpoints/last.pt; continue one of its"):
            rundir.find_resume("auto", tmp_path, name, "quickstart")
    (tmp_path / "empty").mkdir()  # an empty folder (made by hand) is fine
    assert rundir.new_run_dir(tmp_path, "empty", "q") == tmp_path / "empty"
    (tmp_path / "a_file").write_text("kept")
    with pytest.raises(RunError, match=r"a_file/x: cannot create the run directory \(log.dir="):
        rundir.new_run_dir(tmp_path / "a_file", "x", "q")
    assert (tmp_path / "a_file").read_text() == "kept"


def test_a_named_run_killed_in_its_first_checkpoint_restarts_in_place(data_root, tmp_path):
    """Killed while writing its first epoch-end checkpoint, a named run holds epoch 1's metrics
    line and no checkpoint: --resume auto (and torchrun --max-restarts) were refused for good
    ("holds a run but no last.pt"), and so was starting again without --resume."""
    run = _fake_run(tmp_path, "k", last=False, metrics='{"epoch": 1, "val_top1": 9.0}\n')
    torn = run / "checkpoints" / ".last.pt.tmp-4242"  # the write that was cut (write_atomic's name)
    torn.write_bytes(b"torn")
    with pytest.raises(RunError, match="already holds checkpoints or metrics"):
        rundir.new_run_dir(tmp_path, "k", "quickstart")  # a new run without --resume: refused
    assert rundir.find_resume("auto", tmp_path, "k", "quickstart") is None
    summary = train(_cfg(data_root, tmp_path, "--schedule.epochs=1", "--log.name=k",
                         "--schedule.warmup_epochs=0"), resume="auto")
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1] and lines[0]["val_top1"] == summary["val_top1"]
    assert (run / "checkpoints" / "last.pt").is_file() and not torn.exists()


def test_resume_relinks_a_best_pt_left_behind(data_root, tmp_path):
    """Killed between last.pt's rename and best.pt's link, best.pt stayed an earlier epoch for
    good: the resume restores the best score, so no later epoch relinked it."""
    train(_cfg(data_root, tmp_path, "--schedule.epochs=1", "--schedule.warmup_epochs=0",
               "--log.name=r"))
    checkpoints = tmp_path / "r" / "checkpoints"
    stale = ckpt.load(checkpoints / "last.pt")
    stale["metrics"]["val_top1"] -= 10.0  # as an earlier, worse epoch
    (checkpoints / "best.pt").unlink()
    torch.save(stale, checkpoints / "best.pt")
    train(_cfg(data_root, tmp_path, "--schedule.epochs=1", "--schedule.warmup_epochs=0",
               "--log.name=r"), resume="auto")
    assert (checkpoints / "best.pt").samefile(checkpoints / "last.pt")


def test_a_failed_metrics_write_is_one_line_and_keeps_the_checkpoint(data_root, tmp_path,
                                                                    monkeypatch):
    """A full disk meets the metrics append first at the default settings: a traceback."""
    real_open, appends = open, []

    def full_disk(path, mode="r", *a, **k):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            appends.append(path)
            if len(appends) == 2:
                raise OSError(28, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(loop, "open", full_disk, raising=False)
    with pytest.raises(TrainingError, match=r"cannot write .*metrics.jsonl after epoch 2 \(No "
                                            r"space left on device\); the previous checkpoint"):
        train(_cfg(data_root, tmp_path, "--schedule.epochs=2", "--schedule.warmup_epochs=0",
                   "--model.width=0.25", "--log.name=full"))
    assert ckpt.load(tmp_path / "full" / "checkpoints" / "last.pt")["train_state"]["epoch"] == 1


def test_a_full_disk_at_the_first_metrics_line_says_so_and_leaves_no_folder(data_root, tmp_path,
                                                                            monkeypatch):
    """It said last.pt "is gone (was the run directory removed?)" of a run that had written
    none, and left the folder (config.yaml, an empty metrics.jsonl) at every try."""
    real_open = open

    def full_disk(path, mode="r", *a, **k):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            real_open(path, mode, *a, **k).close()  # the append creates the file, then fails
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(loop, "open", full_disk, raising=False)
    with pytest.raises(TrainingError, match=r"cannot write .*metrics.jsonl after epoch 1 \(No "
                                            r"space left on device\); no checkpoint was written "
                                            r"yet$"):
        train(_cfg(data_root, tmp_path, "--schedule.epochs=2", "--schedule.warmup_epochs=0",
                   "--model.width=0.25", "--train.max_steps=2"))
    assert list(tmp_path.iterdir()) == []


def test_a_loose_checkpoint_has_no_run_directory(tmp_path):
    run = _fake_run(tmp_path, "r")
    assert rundir.run_dir_of(run / "checkpoints" / "last.pt") == run
    (tmp_path / "m.pt").write_bytes(b"x")
    assert rundir.run_dir_of(tmp_path / "m.pt") is None


def test_trim_survives_a_torn_metrics_line(tmp_path):
    good = [json.dumps({"epoch": e, "val_top1": 1.0}) for e in (1, 2, 3)]
    run = _fake_run(tmp_path, "r", metrics="\n".join(good) + '\n{"epoch": 4, "train_lo\x00\x00')
    loop._trim_run_dir(run, 2)
    assert (run / "metrics.jsonl").read_text() == good[0] + "\n" + good[1] + "\n"


def test_trim_writes_nothing_when_nothing_is_dropped(tmp_path):
    """A finished run resumed "trains and writes nothing": its metrics.jsonl was rewritten
    (and a read-only run folder failed)."""
    good = "".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2))
    run = _fake_run(tmp_path, "r", metrics=good)
    inode = (run / "metrics.jsonl").stat().st_ino
    loop._trim_run_dir(run, 2)
    assert (run / "metrics.jsonl").stat().st_ino == inode


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the run directory's lock until killed."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_used_name_on_a_file_system_without_flock_is_refused_in_one_line(tmp_path,
                                                                           monkeypatch):
    # lock_folder gives None where the folder has no flock: the refusal's release of the lock
    # it had not got raised a KeyError traceback
    run = _fake_run(tmp_path, "used", last=False, metrics='{"epoch": 1}\n')
    monkeypatch.setattr(rundir, "lock_folder", lambda folder, wait: None)
    with pytest.raises(RunError, match=r"used: run directory already holds checkpoints or "
                                       r"metrics"):
        rundir.new_run_dir(tmp_path, "used", "quickstart")


def test_two_trainings_never_write_one_run_directory(tmp_path):
    """Two runs started at once with one --log.name (or a requeued --resume auto while the
    first still ran) both wrote into it: metrics.jsonl held epochs 1, 1, 2, 2."""
    run = _fake_run(tmp_path, "dup", last=False)
    holder = _hold_lock(run)
    try:
        with pytest.raises(RunError, match=r"dup: another training process is writing this run "
                                           r"directory; wait for it to end or choose another"):
            rundir.new_run_dir(tmp_path, "dup", "quickstart")
        # once it has written metrics: that, not "pass --resume auto" (refused the same way)
        (run / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
        with pytest.raises(RunError, match=r"dup: another training process is writing"):
            rundir.new_run_dir(tmp_path, "dup", "quickstart")
        (run / "metrics.jsonl").unlink()
        with pytest.raises(RunError, match="another training process"):
            rundir.lock_run_dir(run)  # a resume of it
    finally:
        holder.kill()
        holder.wait()
    try:
        assert rundir.new_run_dir(tmp_path, "dup", "quickstart") == run  # free again
        rundir.lock_run_dir(run)  # the same process: already held, no error
    finally:
        rundir.release_run_dirs()
    # unnamed runs started in the same second get folders of their own
    made = {rundir.new_run_dir(tmp_path / "u", "", "quickstart") for _ in range(3)}
    rundir.release_run_dirs()
    assert len(made) == 3


def test_a_compiled_run_starts_from_no_earlier_run_s_graphs(data_root, tmp_path, monkeypatch):
    """In one process (a notebook), each compiled train() added its graphs to dynamo's cache:
    after a few widths the recompile limit was reached and later runs trained uncompiled,
    and a second batch size got a dynamic-shape graph. Each compiled run resets the cache.
    And the commit recorded in checkpoints was the process's first run's."""
    resets = []
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1))
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)  # no compile cost
    commits = []
    for i, compile_ in enumerate(("false", "true", "true")):
        monkeypatch.setenv("FASTTRAIN_COMMIT", f"c{i}")
        run = train(_cfg(data_root, tmp_path, "--schedule.epochs=1",
                         "--schedule.warmup_epochs=0", "--train.max_steps=1",
                         f"--train.compile={compile_}"))["run_dir"]
        commits.append(ckpt.load(Path(run) / "checkpoints" / "last.pt")["versions"]["commit"])
    assert len(resets) == 2
    assert commits == ["c0", "c1", "c2"]  # the code's commit at each run, not the first's


def test_a_resume_auto_of_a_busy_run_folder_is_refused_in_one_line(data_root, tmp_path,
                                                                    capsys):
    """A requeued `--resume auto` while the first training was still in its first epoch said
    "no checkpoint ..., starting fresh" and then that another process was writing the folder:
    the first line said something that did not happen."""
    short = ("--schedule.epochs=1", "--schedule.warmup_epochs=0")
    busy = tmp_path / "busy"
    busy.mkdir()
    holder = _hold_lock(busy)
    try:
        with pytest.raises(RunError, match="busy: another training process is writing"):
            train(_cfg(data_root, tmp_path, *short, "--log.name=busy"),
                  resume="auto")
    finally:
        holder.kill()
        holder.wait()
    assert "starting fresh" not in capsys.readouterr().out
    # said where it does start fresh, in a dry run too
    for dry_run in (True, False):
        train(_cfg(data_root, tmp_path, *short, "--train.max_steps=1",
                   f"--log.name=free{dry_run}"), resume="auto", dry_run=dry_run)
        assert f"--resume auto: no checkpoint at {tmp_path / f'free{dry_run}'}" in \
            capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="train.device=cuda but no CUDA device"):
        distributed.resolve_device("cuda", 0)


# --------------------------------------------------------------------------- resume rules

@pytest.mark.slow
def test_resume_refuses_optimizer_overrides_before_writing(data_root, tmp_path):
    train(_cfg(data_root, tmp_path, "--schedule.epochs=1", "--schedule.warmup_epochs=0",
               "--train.max_steps=1", "--log.name=r"))
    config_before = (tmp_path / "r" / "config.yaml").read_text()
    for override, message in (("--optim.lr=0.001", "optim.lr=0.2 but the config has 0.001"),
                              ("--optim.name=lamb", "optim.name='sgd' but the config has 'lamb'"),
                              ("--optim.decay_norm_and_bias=true", "decay_norm_and_bias"),
                              ("--data.batch_size=32", "data.batch_size=64")):
        cfg = _cfg(data_root, tmp_path, "--schedule.epochs=1", "--schedule.warmup_epochs=0",
                   override, "--log.name=r")
        with pytest.raises(CheckpointError, match=re.escape(message) + ".*--model.init_from="):
            train(cfg, resume="auto")
    assert (tmp_path / "r" / "config.yaml").read_text() == config_before
    # The schedule may change: a longer run continues the same one.
    more = train(_cfg(data_root, tmp_path, "--schedule.epochs=2", "--schedule.warmup_epochs=0",
                      "--train.max_steps=2", "--log.name=r"), resume="auto")
    assert more["step"] == 2


@pytest.mark.slow
def test_max_steps_inside_an_epoch_resumes_inside_it(data_root, tmp_path):
    args = ("--schedule.epochs=2", "--schedule.warmup_epochs=0", "--schedule.kind=step",
            "--schedule.milestones=[1]", "--schedule.gamma=0.5", "--data.batch_size=128")
    cut = train(_cfg(data_root, tmp_path, *args, "--train.max_steps=5", "--log.name=cut"))
    assert cut["step"] == 5 and cut["train_time_s"] > 0
    checkpoints = tmp_path / "cut" / "checkpoints"
    assert not (checkpoints / "best.pt").exists()  # a cut epoch is no candidate for best
    early = checkpoints / "step5.pt"
    early.write_bytes((checkpoints / "last.pt").read_bytes())
    state = ckpt.load(tmp_path / "cut" / "checkpoints" / "last.pt")["train_state"]
    assert (state["epoch"], state["epoch_step"]) == (0, 5)  # not "epoch 1 done"
    (partial,) = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").open()]
    assert partial["epoch_step"] == 5  # its line says it is a part of epoch 1
    # its time is carried inside the epoch (counted once, when a resume completes it)
    assert state["train_time_s"] == 0 and state["epoch_elapsed_s"] > 0
    done = train(_cfg(data_root, tmp_path, *args, "--log.name=cut"), resume="auto")
    steps_per_epoch = 1433 // 128
    assert done["step"] == 2 * steps_per_epoch and done["epoch"] == 2
    lines = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]  # the cut epoch's line was replaced
    assert not any("epoch_step" in m for m in lines)
    assert lines[0]["train_images"] == steps_per_epoch * 128
    # `lr` is what the epoch's last step used (the step schedule halves it after epoch 1)
    assert lines[0]["lr"] == pytest.approx(2 * lines[1]["lr"])
    assert ckpt.load(checkpoints / "best.pt")["train_state"]["epoch_step"] == 0
    assert lines[-1]["best_val_top1"] == max(m["val_top1"] for m in lines)
    # The earlier checkpoint kept in the run's folder: continuing it there would cut epochs 1
    # and 2 from metrics.jsonl; refused, with nothing changed.
    before = (tmp_path / "cut" / "metrics.jsonl").read_text()
    with pytest.raises(RunError, match=r"step5.pt: its run went on to step 22 .* would discard "
                                       r"the later epochs"):
        train(_cfg(data_root, tmp_path, *args, "--log.name=cut"), resume=str(early))
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == before


def test_a_run_refused_at_its_first_step_leaves_no_folder_behind(data_root, tmp_path,
                                                                  monkeypatch):
    """A check only the first step can make left a run folder holding nothing but config.yaml;
    files that are not the run's stay. (A one-image BatchNorm batch, refused by the first step
    here with the start-up check taken out, is found before the folder is made.)"""
    monkeypatch.setattr(loop, "_note_single_image_batch_norm", lambda *a: None)
    args = ("--data.batch_size=1", "--data.train_res=4", "--train.max_steps=2",
            "--model.width=0.25")
    with pytest.raises(ConfigError, match=r"data.batch_size=1: a training micro-batch of 1 "):
        train(_cfg(data_root, tmp_path, *args, "--log.name=one"))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    with pytest.raises(ConfigError, match=r"a training micro-batch of 1 "):
        train(_cfg(data_root, tmp_path, *args, "--log.name=mine"))
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    # `--log.dir=~/...` as the shell leaves it after `=`: the home folder, not a folder "~"
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(RunError, match=rf"^log.dir={re.escape(str(tmp_path))}/mine/notes.txt/"
                                       rf"runs: .*notes.txt is a file, not a folder$"):
        train(_cfg(data_root, "~/mine/notes.txt/runs"), dry_run=True)


def test_a_run_interrupted_before_its_first_checkpoint_leaves_no_folder(data_root, tmp_path,
                                                                       monkeypatch):
    """A preemption in the first (on ImageNet, long) epoch left a folder holding config.yaml
    and an empty checkpoints/; every requeued `--resume auto` started, and left, one more."""
    args = ("--data.train_res=8", "--data.val_res=8", "--data.val_resize=8",
            "--model.width=0.25", "--schedule.epochs=1", "--schedule.warmup_epochs=0")
    steps = []

    def interrupted_step(*a, **kw):
        steps.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_one_epoch", interrupted_step)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            train(_cfg(data_root, tmp_path, *args), resume="auto")
    assert len(steps) == 2 and list(tmp_path.iterdir()) == []


def test_an_interrupted_dry_run_says_nothing_was_written(data_root, tmp_path, monkeypatch,
                                                         capsys):
    # it said "checkpoints already written are intact; continue ... with --resume auto"
    import fasttrain.engine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fasttrain.engine, "train", interrupted)
    tool = load_tool("train")
    assert tool.main([str(QUICKSTART), f"--data.path={data_root / 'digits'}",
                      f"--log.dir={tmp_path}", "--dry-run"]) == 130
    assert capsys.readouterr().err == "interrupted: dry run stopped, nothing written\n"


def test_a_resume_with_train_max_steps_reached_trains_nothing(data_root, tmp_path):
    """A requeue script resuming with the cap it was cut at trained the next epoch for 0 steps
    and marked it done (a metrics line, a checkpoint one epoch on): its steps were lost."""
    args = ("--schedule.epochs=2", "--schedule.warmup_epochs=0", "--data.batch_size=128",
            "--model.width=0.25",
            "--log.name=cap")
    steps = 1433 // 128
    train(_cfg(data_root, tmp_path, *args, f"--train.max_steps={steps}"))  # epoch 1, exactly
    run = tmp_path / "cap"
    files = ("metrics.jsonl", "config.yaml", "checkpoints/last.pt")
    before = {f: (run / f).read_bytes() for f in files}
    again = train(_cfg(data_root, tmp_path, *args, f"--train.max_steps={steps}"), resume="auto")
    assert (again["epoch"], again["step"]) == (1, steps)
    assert {f: (run / f).read_bytes() for f in files} == before
    done = train(_cfg(data_root, tmp_path, *args), resume="auto")
    assert (done["epoch"], done["step"]) == (2, 2 * steps)
    # A finished run resumed with fewer epochs trains nothing; its config.yaml still describes
    # the training the folder holds.
    config = (run / "config.yaml").read_text()
    train(_cfg(data_root, tmp_path, *args, "--schedule.epochs=1"), resume="auto")
    assert (run / "config.yaml").read_text() == config and "epochs: 2" in config
    # A cap inside an epoch: the resume dropped the cut epoch's metrics line as if it were
    # about to train it again (an empty metrics.jsonl, "final val top-1 nan %")
    cut = train(_cfg(data_root, tmp_path, *args[:-1], "--log.name=mid", "--train.max_steps=3"))
    mid = tmp_path / "mid"
    before = {f: (mid / f).read_bytes() for f in files}
    again = train(_cfg(data_root, tmp_path, *args[:-1], "--log.name=mid",
                       "--train.max_steps=3"), resume="auto")
    assert {f: (mid / f).read_bytes() for f in files} == before
    assert before["metrics.jsonl"].count(b"\n") == 1
    assert (again["epoch"], again["step"], again["val_top1"]) == (1, 3, cut["val_top1"])


def test_resume_refusals_about_the_epoch_in_progress_write_nothing(data_root, tmp_path):
    """Inside an epoch the rest of its sample order follows train.seed: another seed repeated
    and skipped images. A checkpoint without EMA weights for a train.ema run was refused only
    after a run folder was made (and a dry run passed it)."""
    args = ("--schedule.epochs=2", "--schedule.warmup_epochs=0", "--data.batch_size=128")
    train(_cfg(data_root, tmp_path, *args, "--train.max_steps=3", "--log.name=mid"))
    before = sorted(p.name for p in (tmp_path / "mid").rglob("*"))
    with pytest.raises(CheckpointError, match=r"last.pt: checkpoint is inside an epoch trained "
                                              r"with train.seed=0 but the config has 7"):
        train(_cfg(data_root, tmp_path, *args, "--train.seed=7", "--log.name=mid"),
              resume="auto")
    # so does the rest of it follow repeated augmentation and the backend's own order
    with pytest.raises(CheckpointError, match=r"last.pt: checkpoint is inside epoch 1, trained "
                                              r"with data.ra_reps=1, which order that epoch's "
                                              r"samples differently from data.ra_reps=2"):
        train(_cfg(data_root, tmp_path, *args, "--data.ra_reps=2", "--log.name=mid"),
              resume="auto")
    assert sorted(p.name for p in (tmp_path / "mid").rglob("*")) == before
    loose = tmp_path / "loose.pt"
    loose.write_bytes((tmp_path / "mid" / "checkpoints" / "last.pt").read_bytes())
    for dry_run in (True, False):
        with pytest.raises(CheckpointError, match=r"loose.pt: checkpoint has no EMA weights but "
                                                  r"train.ema is true"):
            train(_cfg(data_root, tmp_path / "runs", *args, "--train.ema=true"),
                  resume=str(loose), dry_run=dry_run)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("saved, now, refused", [
    # resident -> ffcv inside an epoch trained 306 of digits' 1,408 images twice, 306 never
    ({"backend": "resident"}, ["--data.backend=ffcv"], "data.backend=resident, which order "
                                                       "that epoch's samples differently from "
                                                       "data.backend=ffcv"),
    ({"backend": "ffcv", "ffcv_order": "quasi_random"}, ["--data.backend=ffcv"],
     "data.ffcv_order=quasi_random, which order that epoch's samples differently from "
     "data.ffcv_order=random"),
    ({"backend": "torch"}, ["--data.backend=resident"], None),  # one order: the torch backend's
    ({"backend": "dali"}, ["--data.backend=torch"], None),
    ({"backend": "torch", "ffcv_order": "quasi_random"}, [], None),  # read by ffcv only
    ({}, ["--data.ra_reps=3"], None)])  # no data section: nothing to compare
def test_an_epoch_in_progress_continues_only_in_its_own_sample_order(saved, now, refused):
    cfg = load(QUICKSTART, now)
    if refused is None:
        loop._check_same_order(saved, cfg, Path("last.pt"), 2)
        return
    with pytest.raises(CheckpointError, match=rf"^last.pt: checkpoint is inside epoch 2, "
                                              rf"trained with {re.escape(refused)}; continue"):
        loop._check_same_order(saved, cfg, Path("last.pt"), 2)


def test_tensorboard_hides_the_epochs_a_resume_trains_again(data_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ("--schedule.epochs=2", "--schedule.warmup_epochs=0", "--data.batch_size=128",
            "--model.width=0.25",
            "--log.tensorboard=true", "--log.name=tb")
    train(_cfg(data_root, tmp_path, *args, "--train.max_steps=3"))  # logs the cut epoch 1
    train(_cfg(data_root, tmp_path, *args), resume="auto")
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    lines = [json.loads(l) for l in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert [(e.step, e.value) for e in events.Scalars("val_top1")] == \
        [(m["epoch"], pytest.approx(m["val_top1"])) for m in lines]


def test_a_torchrun_restart_continues_the_run_an_explicit_resume_started(tmp_path, monkeypatch,
                                                                          capsys):
    """A restart reused `--resume PATH` as given: from the same file again, in a new folder
    (a loose file), or refused for good (a best.pt its run has moved past)."""
    run = tmp_path / "r" / "checkpoints"
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(b"x")
    loose, named = tmp_path / "loose.pt", tmp_path / "named" / "checkpoints"
    assert loop._restart_resume(str(run / "best.pt"), tmp_path, "") == str(run / "last.pt")
    assert loop._restart_resume(str(tmp_path / "r"), tmp_path, "") == str(run / "last.pt")
    assert loop._restart_resume(None, tmp_path, "") == loop._restart_resume("auto", tmp_path,
                                                                            "") == "auto"
    assert loop._restart_resume(str(loose), tmp_path, "named") == str(loose)  # none written yet
    named.mkdir(parents=True)
    (named / "last.pt").write_bytes(b"x")
    assert loop._restart_resume(str(loose), tmp_path, "named") == str(named / "last.pt")
    assert loop._restart_resume(str(loose), tmp_path, "") == str(loose)
    # that last case is said at the first attempt
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    with pytest.raises(RunError, match="no checkpoint at"):
        train(load(QUICKSTART, [f"--log.dir={tmp_path}", "--log.progress=plain"]),
              resume=str(loose), dry_run=True)
    assert (f"note: --resume {loose} is outside a run folder and the run has no --log.name: a "
            f"torchrun restart would start from it again") in capsys.readouterr().out


def test_a_torchrun_restart_continues_the_run_folder_its_job_recorded(tmp_path, monkeypatch):
    from fasttrain.engine import distributed

    ours, newer = tmp_path / "q-20260101-000000", tmp_path / "q-20991231-000000"
    for run in (ours, newer):
        (run / "checkpoints").mkdir(parents=True)
    (newer / "checkpoints" / "last.pt").write_bytes(b"another job's")
    monkeypatch.setattr(distributed, "remembered_run_dir", lambda: str(ours))
    (ours / "config.yaml").write_text("x: 1\n")
    # killed before its first checkpoint: what the first attempt started from, folder removed
    assert loop._restart_resume(None, tmp_path, "") is None
    assert loop._restart_resume("auto", tmp_path, "") is None  # not the newer run
    assert loop._restart_resume(None, tmp_path, "named") == "auto"  # its own folder again
    assert not ours.exists() and newer.is_dir()
    (ours / "checkpoints").mkdir(parents=True)
    (ours / "checkpoints" / "last.pt").write_bytes(b"ours")
    for resume in (None, "auto", str(tmp_path / "loose.pt")):
        assert loop._restart_resume(resume, tmp_path, "") == str(ours)


def test_best_val_top1_of_a_metrics_line_counts_only_complete_epochs(data_root, tmp_path):
    # As best.pt and the summary: an epoch cut by train.max_steps is trained again on resume.
    digits = sorted((data_root / "digits" / "train" / "3").iterdir())
    for split, n in (("train", 4), ("val", 2)):  # a tiny set: 2 steps of 4 per epoch
        for cls in ("a", "b"):
            (tmp_path / "set" / split / cls).mkdir(parents=True)
            for i in range(n):
                (tmp_path / "set" / split / cls / f"{i}.jpg").write_bytes(digits[i].read_bytes())

    def run(max_steps, **kw):
        train(load(QUICKSTART, ["--data.dataset=imagefolder", f"--data.path={tmp_path / 'set'}",
                                "--data.backend=torch", "--data.batch_size=4",
                                "--schedule.epochs=2", "--schedule.warmup_epochs=0",
                                f"--train.max_steps={max_steps}", "--log.name=cut",
                                f"--log.dir={tmp_path / 'runs'}", "--log.progress=plain"]), **kw)
        return [json.loads(l) for l in (tmp_path / "runs" / "cut" / "metrics.jsonl")
                .read_text().splitlines()]

    (line,) = run(1)
    assert line["epoch"] == 1 and line["best_val_top1"] is None
    lines = run(3, resume="auto")  # completes epoch 1, cuts epoch 2 after one step
    assert [m["epoch"] for m in lines] == [1, 2]
    best = ckpt.load(tmp_path / "runs" / "cut" / "checkpoints" / "best.pt")["metrics"]
    assert lines[0]["best_val_top1"] == lines[0]["val_top1"] == best["val_top1"]
    assert lines[1]["best_val_top1"] == lines[0]["val_top1"]


@pytest.mark.slow
def test_a_loose_checkpoint_resumes_into_a_new_run_directory(data_root, tmp_path):
    args = ("--schedule.epochs=1", "--schedule.warmup_epochs=0", "--train.max_steps=1")
    train(_cfg(data_root, tmp_path, *args, "--log.name=src"))
    loose = tmp_path / "downloads"
    loose.mkdir()
    (loose / "m.pt").write_bytes((tmp_path / "src" / "checkpoints" / "last.pt").read_bytes())
    with pytest.raises(CheckpointError, match="optim.lr"):  # refused: no run folder made for it
        train(_cfg(data_root, tmp_path / "runs", *args, "--optim.lr=0.01"),
              recipe=str(QUICKSTART), resume=str(loose / "m.pt"))
    assert not (tmp_path / "runs").exists()
    summary = train(_cfg(data_root, tmp_path / "runs", "--schedule.epochs=1",
                         "--schedule.warmup_epochs=0", "--train.max_steps=2"),
                    recipe=str(QUICKSTART), resume=str(loose / "m.pt"))
    assert Path(summary["run_dir"]).parent == tmp_path / "runs" and summary["step"] == 2
    assert sorted(p.name for p in loose.iterdir()) == ["m.pt"]  # nothing written beside it
    # A loose checkpoint of a complete, best epoch is the new folder's best.pt: the best score
    # it restores is backed by a file there (it was reported with no best.pt behind it).
    epoch = 1433 // 64
    train(_cfg(data_root, tmp_path, "--schedule.epochs=1", "--schedule.warmup_epochs=0",
               "--log.name=whole"))
    best = ckpt.load(tmp_path / "whole" / "checkpoints" / "last.pt")
    (loose / "best.pt").write_bytes((tmp_path / "whole" / "checkpoints" / "last.pt").read_bytes())
    more = ("--schedule.epochs=2", "--schedule.warmup_epochs=0", f"--train.max_steps={epoch + 1}")
    summary = train(_cfg(data_root, tmp_path / "more", *more), resume=str(loose / "best.pt"))
    adopted = Path(summary["run_dir"]) / "checkpoints" / "best.pt"
    assert adopted.read_bytes() == (loose / "best.pt").read_bytes()
    assert summary["best_val_top1"] == best["metrics"]["val_top1"]
    # one whose run's best was another checkpoint: the best starts again in the new folder
    best["train_state"]["best_val_top1"] = 100.0
    torch.save(best, loose / "not-best.pt")
    summary = train(_cfg(data_root, tmp_path / "other", *more), resume=str(loose / "not-best.pt"))
    assert summary["best_val_top1"] == -1.0
    assert not (Path(summary["run_dir"]) / "checkpoints" / "best.pt").exists()


@pytest.mark.slow
def test_torchrun_error_seen_by_rank_0_stops_every_rank_with_one_line(data_root, tmp_path):
    result = _torchrun_quickstart(data_root, tmp_path, "--resume", str(tmp_path / "nothing.pt"))
    assert result.returncode != 0
    assert result.stderr.count(f"error: --resume {tmp_path / 'nothing.pt'}: no checkpoint") == 1
    assert "[rank1]" not in result.stderr and "broadcast" not in result.stderr, \
        result.stderr[-3000:]


def test_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys):
    import fasttrain.engine

    def interrupted(*args, **kwargs):
        e = KeyboardInterrupt()
        e.fasttrain_resume = "runs/q"  # as train() raises it, with the folder to continue
        raise e

    monkeypatch.setattr(fasttrain.engine, "train", interrupted)
    assert load_tool("train").main([str(QUICKSTART)]) == 130
    err = capsys.readouterr().err
    assert err == ("interrupted: checkpoints already written are intact; continue from the "
                   "last one with --resume runs/q\n")
    # before train() was called (importing torch): it named checkpoints a new run does not have
    tool = load_tool("train")
    monkeypatch.setattr(tool, "load", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert tool.main([str(QUICKSTART)]) == 130
    assert capsys.readouterr().err == "interrupted: before training started, nothing written\n"
    assert tool.main([str(QUICKSTART), "--resume", "auto"]) == 130
    assert capsys.readouterr().err == ("interrupted: before training started, nothing written; "
                                       "run it again with --resume auto\n")


def test_a_second_signal_during_the_clean_up_changes_nothing(data_root, tmp_path, monkeypatch,
                                                             capsys):
    """Under torchrun a rank gets the terminal's Ctrl-C, torchrun's copy, then its SIGTERM: one
    raised while train() removed an unused run folder left it half removed (an empty
    checkpoints/) and lost what to continue from ("before training started")."""
    import signal

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    real_discard = loop.discard_unused_run_dir

    def discard_meeting_another_signal(run):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # a handler would raise here
        (run / "config.yaml").unlink()  # as the real one begins, then finishes
        real_discard(run)

    monkeypatch.setattr(loop, "train_one_epoch", interrupted)
    monkeypatch.setattr(loop, "discard_unused_run_dir", discard_meeting_another_signal)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as e:
        train(_cfg(data_root, tmp_path, "--schedule.warmup_epochs=0", "--log.name=twice"))
    assert e.value.fasttrain_resume == "" and not (tmp_path / "twice").exists()
    assert signal.getsignal(signal.SIGINT) is before
    # and tools/train.py takes what to continue from the first exception of a chain
    import fasttrain.engine

    def replaced_by_a_late_signal(*args, **kwargs):
        try:
            first = KeyboardInterrupt()
            first.fasttrain_resume = "runs/q"
            raise first
        finally:
            raise KeyboardInterrupt  # the late second one, raised in train()'s finally

    monkeypatch.setattr(fasttrain.engine, "train", replaced_by_a_late_signal)
    capsys.readouterr()
    assert load_tool("train").main([str(QUICKSTART)]) == 130
    assert capsys.readouterr().err == ("interrupted: checkpoints already written are intact; "
                                       "continue from the last one with --resume runs/q\n")


def test_a_peer_gone_while_the_new_run_folder_is_shared_leaves_no_folder(data_root, tmp_path,
                                                                          monkeypatch):
    """Rank 0 makes the run folder, then sends its path to the other ranks: a peer killed in
    between failed that broadcast, and the folder (an empty checkpoints/) stayed, since it was
    only recorded as this call's after the broadcast returned."""
    real_broadcast = loop.distributed.broadcast_object

    def peer_gone_for_the_folder(obj):
        if isinstance(obj[0], Path):
            raise RuntimeError("Connection closed by peer")
        return real_broadcast(obj)

    monkeypatch.setattr(loop.distributed, "broadcast_object", peer_gone_for_the_folder)
    with pytest.raises(RuntimeError, match="closed by peer"):
        train(_cfg(data_root, tmp_path, "--log.name=gone"))
    assert not (tmp_path / "gone").exists()


def test_sigterm_is_handled_like_ctrl_c_with_status_143(monkeypatch, capsys):
    """docker stop / a scheduler's preemption: one line, 143, and the handler the process had
    before is back afterwards."""
    import signal

    import fasttrain.engine

    def terminated_while_training(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in this frame as soon as the signal is delivered
        pytest.fail("SIGTERM was not handled")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(fasttrain.engine, "train", terminated_while_training)
    assert load_tool("train").main([str(QUICKSTART)]) == 143
    err = capsys.readouterr().err
    assert err == ("terminated: checkpoints already written are intact; continue from the last "
                   "one with --resume auto (or --resume RUN_DIR)\n")
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_late_sigterm_adds_no_traceback_to_the_outcome(monkeypatch, capsys):
    """torchrun's SIGTERM to the ranks left after one failed arrived after the rank had said
    its one line: a `Terminated` traceback followed it."""
    import signal

    tool = load_tool("train")

    def said_then_terminated(argv):
        tool._say("error: [rank 0] stopped: another rank failed first")
        os.kill(os.getpid(), signal.SIGTERM)  # delivered before this function returns
        time.sleep(5)
        return 1

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(tool, "_main", said_then_terminated)
    assert tool.main([str(QUICKSTART)]) == 143
    assert capsys.readouterr().err.count("\n") == 1
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_late_ctrl_c_adds_no_traceback_to_the_outcome(monkeypatch, capsys):
    """torchrun forwards a Ctrl-C to every rank; one that had finished raised KeyboardInterrupt
    as main() left (at its next call), and its traceback followed the one line."""
    import signal

    tool = load_tool("train")
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    real = signal.signal
    calls = []

    def delivered_while_leaving(signum, handler):  # the Ctrl-C lands on main()'s way out
        calls.append(signum)
        if len(calls) == 2:  # after _main returned: main()'s first call to signal.signal
            raise KeyboardInterrupt
        return real(signum, handler)

    def said_its_line(argv):
        tool._say("error: data.path: not found")
        return 2

    monkeypatch.setattr(tool, "_main", said_its_line)
    monkeypatch.setattr(signal, "signal", delivered_while_leaving)
    try:
        assert tool.main([str(QUICKSTART)]) == 2  # the outcome decided stands
    except KeyboardInterrupt:
        pytest.fail("a late Ctrl-C escaped main()")
    monkeypatch.undo()
    assert capsys.readouterr().err.count("\n") == 1
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before

    def interrupted_before_anything(argv):  # before _main's own handling: its line is said
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        return 0

    monkeypatch.setattr(tool, "_main", interrupted_before_anything)
    assert tool.main([str(QUICKSTART)]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: checkpoints already written") and err.count("\n") == 1

    def interrupted_twice(argv):  # a second Ctrl-C right after _main's own line
        tool._interrupted(terminated=False)
        raise KeyboardInterrupt

    monkeypatch.setattr(tool, "_main", interrupted_twice)
    assert tool.main([str(QUICKSTART)]) == 130
    assert capsys.readouterr().err.count("\n") == 1  # said once, not twice


def test_main_gives_the_signal_handlers_back_however_it_leaves(capsys):
    """main([]) (argparse's SystemExit) and --help left Ctrl-C and SIGTERM ignored for the rest
    of the process (a pytest session, a notebook): a later training could not be stopped."""
    import signal

    tool = load_tool("train")
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    for argv in ([], ["--help"]):
        with pytest.raises(SystemExit):
            tool.main(argv)
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    capsys.readouterr()


def test_a_killed_dataloader_worker_is_one_line(monkeypatch, capsys):
    import fasttrain.engine

    def worker_killed(*args, **kwargs):
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")

    monkeypatch.setattr(fasttrain.engine, "train", worker_killed)
    assert load_tool("train").main([str(QUICKSTART)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: DataLoader worker (pid 4242) is killed by signal: Killed. "
                          "(out of memory? fewer data.num_workers)") and err.count("\n") == 1


@pytest.mark.slow
def test_a_run_directory_that_cannot_be_updated_is_one_line_on_resume(data_root, tmp_path,
                                                                      monkeypatch):
    train(_cfg(data_root, tmp_path, "--schedule.epochs=1", "--schedule.warmup_epochs=0",
               "--train.max_steps=1", "--log.name=r"))
    metrics = tmp_path / "r" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + json.dumps({"epoch": 9}) + "\n")  # to drop
    before = metrics.read_text()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(metrics))

    monkeypatch.setattr(ckpt, "write_atomic", full)
    with pytest.raises(RunError, match=r"r: cannot update the run directory to resume it \(.*"
                                       r"metrics.jsonl: No space left on device\); its files "
                                       r"are unchanged"):
        train(_cfg(data_root, tmp_path, "--schedule.epochs=2", "--schedule.warmup_epochs=0",
                   "--log.name=r"), resume="auto")
    assert metrics.read_text() == before


def test_tensorboard_logging_without_the_package_is_one_line_before_any_work(
        data_root, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"log.tensorboard=true needs the tensorboard package"):
        train(_cfg(data_root, tmp_path, "--log.tensorboard=true", "--log.name=tb"))
    assert not (tmp_path / "tb").exists()


def test_a_micro_batch_of_one_at_a_1x1_feature_map_is_a_config_error(data_root, tmp_path):
    cfg = _cfg(data_root, tmp_path, "--model.name=thin_resnet18", "--model.width=0.25",
               "--data.batch_size=1", "--data.train_res=16", "--data.val_res=16",
               "--schedule.epochs=1", "--schedule.warmup_epochs=0", "--train.max_steps=1")
    with pytest.raises(ConfigError, match=r"data.batch_size=1: a training micro-batch of 1 "
                                          r"image\(s\) per rank leaves BatchNorm one value"):
        train(cfg)


def test_a_whole_unreadable_batch_stops_with_one_line(data_root, tmp_path):
    # 6 training files, 5 of them empty, batches of 2: at least two batches hold no readable
    # image, are dropped, and the epoch's fixed number of steps cannot be run.
    good = sorted((data_root / "digits" / "train" / "3").iterdir())
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("a", "b"):
            (tmp_path / "set" / split / cls).mkdir(parents=True)
            for i in range(n):
                (tmp_path / "set" / split / cls / f"{i}.jpg").write_bytes(good[i].read_bytes())
    for f in sorted((tmp_path / "set" / "train").rglob("*.jpg"))[1:]:
        f.write_bytes(b"")
    cfg = load(QUICKSTART, ["--data.dataset=imagefolder", f"--data.path={tmp_path / 'set'}",
                            "--data.backend=torch", "--data.num_workers=0",
                            "--data.batch_size=2", "--data.val_batch_size=2",
                            "--schedule.epochs=1", "--schedule.warmup_epochs=0",
                            f"--log.dir={tmp_path / 'runs'}", "--log.progress=plain"])
    with pytest.raises(DatasetError, match=r"epoch 1: the training data ran out after \d of 3 "
                                           r"batches .*: empty file\); remove them"):
        train(cfg)


def test_metrics_lines_are_strict_json_with_null_for_non_finite_values():
    from fasttrain.engine.loop import json_line

    line = json_line({"epoch": 3, "val_loss": float("nan"), "train_loss": float("inf"),
                      "val_top1": 10.5, "lr": 0.1})
    assert line == ('{"epoch": 3, "val_loss": null, "train_loss": null, "val_top1": 10.5, '
                    '"lr": 0.1}')
    json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


def test_resuming_a_fine_tuned_run_without_its_init_from_says_so(tmp_path):
    cfg = load(QUICKSTART)
    saved_model = {**cfg.to_dict()["model"], "width": 0.25, "init_from": "pruned.pt"}
    saved = {"optimizer": {}, "train_state": {}, "config": {"model": saved_model}}
    with pytest.raises(CheckpointError, match=r"has model.width=0.25 but the config has 0.5; "
                                              r"the run was started with "
                                              r"--model.init_from=pruned.pt$"):
        loop._check_compatible(saved, cfg, tmp_path / "last.pt")


def test_an_ffcv_epoch_continues_only_on_the_ranks_it_started_on(tmp_path, monkeypatch):
    """FFCV's order on one rank (a numpy permutation) is not its order on several (torch's
    padded DistributedSampler): skipping the batches done on 2 ranks on 1 repeated 13 of 96
    images and missed 13. The other backends share one order and split (tested elsewhere)."""
    cfg = load(QUICKSTART, ["--data.backend=ffcv"])
    inside = {"epoch": 1, "epoch_step": 3, "epoch_world_size": 2}
    saved = {"optimizer": {}, "train_state": inside, "config": cfg.to_dict()}
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(CheckpointError, match=r"last.pt: checkpoint is inside epoch 2 trained on "
                                              r"2 rank\(s\); data.backend=ffcv can continue it "
                                              r"only on 2 rank\(s\)"):
        loop._check_compatible(saved, cfg, tmp_path / "last.pt")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loop._check_compatible(saved, cfg, tmp_path / "last.pt")  # the same ranks: fine
    monkeypatch.delenv("WORLD_SIZE")
    for state in ({**inside, "epoch_step": 0}, {**inside, "epoch_world_size": 0}):
        loop._check_compatible({**saved, "train_state": state}, cfg, tmp_path / "last.pt")
    torch_cfg = load(QUICKSTART, ["--data.backend=torch"])
    loop._check_compatible({**saved, "config": torch_cfg.to_dict()}, torch_cfg,
                           tmp_path / "last.pt")


def test_a_rank_other_than_0_waits_for_rank_0_to_say_a_shared_error(monkeypatch, capsys):
    """Every rank raises the same config error; the others exited at once and torchrun then
    stopped rank 0 (SIGTERM) before it had printed it: no error line at all, or a misleading
    "terminated"."""
    import signal

    slept = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(time, "sleep", slept.append)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert load_tool("train").main([str(QUICKSTART), "--schedule.epochs=0"]) == 2
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, handler)
    # torchrun's SIGTERM (rank 0 has said the error and exited) ends the wait; alive after
    # it, this rank met the error alone and says it itself (it was said by no rank).
    err = capsys.readouterr().err
    assert slept == [10] and err.startswith("error: [rank 1] ") and "schedule.epochs" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("argv, said", [
    (["--resume", ""], "argument --resume: empty path"),
    ([], "the following arguments are required: recipe"),
    ([""], "argument recipe: empty path"),  # was ".: cannot read recipe: Is a directory"
    (["--resume=a", "--resume=b"], "--resume given twice")])
def test_a_command_line_error_is_said_by_rank_0_alone(monkeypatch, capsys, argv, said):
    """Every rank printed argparse's line (3 ranks: 3 copies), where config errors are said
    once: the other ranks now wait quietly for torchrun to stop them."""
    import signal

    slept = []  # (seconds, what had been printed when the wait began)
    monkeypatch.setattr(time, "sleep", lambda s: slept.append((s, capsys.readouterr().err)))
    argv = argv if not argv or argv[0] != "--resume" else [str(QUICKSTART)] + argv
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "3")
        handler = signal.getsignal(signal.SIGTERM)
        try:
            with pytest.raises(SystemExit) as exc:
                load_tool("train").main(argv)
        finally:
            signal.signal(signal.SIGTERM, handler)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1, err
        # rank 1, alive after the wait (no torchrun stopped it), says it as its own
        assert err.startswith("error: [rank 1] " if rank == "1" else "error: ") and said in err
        assert slept == [(10, "")]  # rank 1 waited, silent; rank 0 said it at once


def _data_parallel_rank(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=2)
    try:
        torch.manual_seed(0)  # the same weights on both ranks
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                              nn.LazyLinear(2))
        model(torch.zeros(2, 3, 6, 6))
        alone = copy.deepcopy(model)  # what this rank's statistics are without any broadcast
        wrapped = distributed.data_parallel(model, torch.device("cpu"), deterministic=False)
        torch.manual_seed(1 + rank)  # each rank its own data
        for _ in range(3):
            x = torch.randn(4, 3, 6, 6) * (1 + rank)
            wrapped(x).sum().backward()
            alone(x)
        bn, own = model[1], alone[1]
        grads = [p.grad for p in model.parameters()]
        torch.save({"stats_are_own": torch.equal(bn.running_mean, own.running_mean)
                    and torch.equal(bn.running_var, own.running_var),
                    "one_storage": len({g.untyped_storage().data_ptr() for g in grads})},
                   out)
    finally:
        torch.distributed.destroy_process_group()


def _data_parallel_main(rank: int, store: str, outs: list[str]) -> None:
    _data_parallel_rank(rank, store, outs[rank])


def test_ddp_neither_broadcasts_buffers_each_step_nor_copies_gradients(tmp_path):
    """DDP's defaults broadcast rank 0's buffers before every forward (about 160 tensors for a
    ResNet-50, unused: validation broadcasts rank 0's statistics itself) and copy every gradient
    out of its bucket after the all-reduce. Rank 1's BatchNorm statistics are its own data's,
    and the gradients are views of one bucket."""
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.multiprocessing.spawn(_data_parallel_main, args=(str(tmp_path / "store"), outs),
                                nprocs=2)
    for out in outs:
        result = torch.load(out)
        assert result["stats_are_own"] and result["one_storage"] == 1, result


def test_a_run_stopped_by_any_error_before_its_first_checkpoint_leaves_no_folder(
        data_root, tmp_path, monkeypatch):
    # e.g. the RuntimeError of a collective whose peer died: each requeue left a config.yaml
    def peer_gone(*args, **kwargs):
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(loop, "classification_loss", peer_gone)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        train(_cfg(data_root, tmp_path, "--log.name=gone", "--schedule.epochs=1",
                   "--schedule.warmup_epochs=0"))
    assert not (tmp_path / "gone").exists()


def test_a_resume_says_which_settings_changed_since_its_checkpoint(data_root, tmp_path,
                                                                    capsys):
    # a setting changed by an upgrade (a new key's default, a recipe's new value) or by hand
    # changed the run's training without a word
    args = ("--log.name=r", "--schedule.warmup_epochs=0", "--train.max_steps=2")
    train(_cfg(data_root, tmp_path, "--schedule.epochs=1", *args))
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    saved = torch.load(last, weights_only=True)
    del saved["config"]["aug"]["randaug_prob"]  # as a version before the key wrote it
    torch.save(saved, last)
    capsys.readouterr()
    train(_cfg(data_root, tmp_path, "--schedule.epochs=2", *args[:2], "--train.max_steps=3"),
          resume="auto")
    (line,) = [l for l in capsys.readouterr().out.splitlines() if l.startswith("settings")]
    assert line == ("settings changed since that checkpoint: aug.randaug_prob (not recorded: "
                    "set before the key existed) -> 1.0; schedule.epochs 1 -> 2; "
                    "train.max_steps 2 -> 3")
    train(_cfg(data_root, tmp_path, "--schedule.epochs=2", *args[:2], "--train.max_steps=3"),
          resume="auto", dry_run=True)
    assert re.search(r"│ changed since it +│ nothing ", capsys.readouterr().out)


def test_a_log_gets_step_lines_inside_long_epochs(data_root, tmp_path, monkeypatch, capsys):
    # plain output (a log) said nothing until an epoch's end: minutes for ImageNet
    monkeypatch.setattr(Reporter, "plain_every_s", 0.0)
    train(_cfg(data_root, tmp_path, "--schedule.epochs=1", "--schedule.warmup_epochs=0",
               "--log.interval=10", "--train.max_steps=20"))
    lines = [line for line in capsys.readouterr().out.splitlines() if " step " in line]
    assert [line.split("  loss")[0] for line in lines] == ["epoch 1/1  step 10/20",
                                                           "epoch 1/1  step 20/20"], lines
    monkeypatch.setattr(Reporter, "plain_every_s", 3600.0)  # a short epoch: none
    train(_cfg(data_root, tmp_path / "short", "--schedule.epochs=1",
               "--schedule.warmup_epochs=0", "--log.interval=10", "--train.max_steps=20"))
    assert " step " not in capsys.readouterr().out


def test_a_closed_stdout_does_not_stop_the_training(data_root, tmp_path, monkeypatch):
    # `train.py ... | tee log` with tee killed: rich's SystemExit(1) ended the run mid-way
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "w") as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        summary = train(_cfg(data_root, tmp_path, "--schedule.epochs=1",
                             "--schedule.warmup_epochs=0", "--model.width=0.25",
                             "--train.max_steps=3", "--log.name=piped"))
    assert summary["epoch"] == 1 and (tmp_path / "piped" / "checkpoints" / "last.pt").exists()


def test_a_restart_discarding_the_first_attempts_folder_leaves_earlier_event_files(tmp_path):
    # torchrun's restart discards the folder a SIGKILLed first attempt left: it knew nothing of
    # what was there before that attempt, and deleted the user's earlier event files
    run = tmp_path / "named"
    (run / "tensorboard").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    earlier = run / "tensorboard" / "events.out.tfevents.0.earlier"
    earlier.write_text("earlier")
    os.utime(earlier, (1e9, 1e9))
    (run / "config.yaml").write_text("the first attempt's")
    (run / "tensorboard" / "events.out.tfevents.1.attempt").write_text("its own")
    rundir.discard_unused_run_dir(run)
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == [
        "tensorboard", "tensorboard/events.out.tfevents.0.earlier"]


def test_a_training_stopped_inside_an_epoch_stops_its_progress_bar(data_root, tmp_path,
                                                                    monkeypatch):
    # the bar's refresh thread went on drawing after the error line and left the cursor hidden
    from rich.live import _RefreshThread

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "classification_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(data_root, tmp_path, "--log.progress=rich", "--schedule.epochs=1",
                   "--schedule.warmup_epochs=0"))
    bars = [t for t in threading.enumerate() if isinstance(t, _RefreshThread)]
    for thread in bars:  # a stopped bar's thread ends on its own, at its next refresh
        thread.join(timeout=5)
    assert not [t for t in bars if t.is_alive()]


def test_discarding_a_named_folder_leaves_what_the_run_did_not_write(data_root, tmp_path,
                                                                     monkeypatch):
    # an interrupted run in an existing --log.name folder deleted its earlier event files,
    # and through a tensorboard/ that was a link, event files outside log.dir
    def peer_gone(*args, **kwargs):
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(loop, "classification_loss", peer_gone)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "events.out.tfevents.1.other").write_text("theirs")
    for name, board in (("kept", None), ("linked", outside)):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "notes.txt").write_text("mine")
        if board is None:
            (run / "tensorboard").mkdir()
            (run / "tensorboard" / "events.out.tfevents.0.earlier").write_text("earlier")
            os.utime(run / "tensorboard" / "events.out.tfevents.0.earlier", (1e9, 1e9))
        else:
            (run / "tensorboard").symlink_to(board)
        with pytest.raises(RuntimeError, match="Connection closed by peer"):
            train(_cfg(data_root, tmp_path / "runs", f"--log.name={name}",
                       "--log.tensorboard=true", "--schedule.epochs=1",
                       "--schedule.warmup_epochs=0"))
        assert (run / "notes.txt").read_text() == "mine"
        assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
    assert [p.name for p in (tmp_path / "runs" / "kept" / "tensorboard").iterdir()] == [
        "events.out.tfevents.0.earlier"]
    assert (outside / "events.out.tfevents.1.other").read_text() == "theirs"
    assert len(list(outside.iterdir())) == 2  # the run's own events file, written there


def test_a_rank_stopped_for_a_torchrun_restart_says_torchrun_continues(monkeypatch, capsys):
    tool = load_tool("train")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    tool._interrupted(terminated=True)
    assert capsys.readouterr().err == (
        "terminated: checkpoints already written are intact; torchrun continues from the last "
        "one if it restarts the job (1 restart left), else continue from the last one with "
        "--resume auto (or --resume RUN_DIR)\n")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")  # none left: the user continues
    tool._interrupted(terminated=True)
    assert "intact; continue from the last one with --resume auto" in capsys.readouterr().err


def test_train_leaves_the_callers_config_and_process_settings_as_they_were(data_root,
                                                                           tmp_path,
                                                                           monkeypatch):
    # a notebook trains several runs in one process: a deterministic run kept deterministic
    # algorithms on (NaN-filled allocations on the CPU), its thread count stayed, and the
    # Config it was given had num_classes filled in from the first data set
    short = ("--schedule.epochs=1", "--schedule.warmup_epochs=0", "--train.max_steps=1",
             "--train.deterministic=true", "--train.threads=1")
    cfg = _cfg(data_root, tmp_path, *short)
    threads = torch.get_num_threads()
    assert not torch.are_deterministic_algorithms_enabled()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    train(cfg)
    assert cfg.model.num_classes == 0
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ  # set for the run's cuBLAS calls only
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own setting is kept
    train(_cfg(data_root, tmp_path, *short, "--log.name=again"))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_a_config_changed_by_attribute_is_checked_again(data_root, tmp_path):
    for section, key, value, words in (("data", "batch_size", 0, "data.batch_size must be >= 1"),
                                       ("data", "backend", "nope", "data.backend must be one of"),
                                       ("train", "precision", "fp8", "train.precision must be")):
        cfg = _cfg(data_root, tmp_path)
        setattr(getattr(cfg, section), key, value)
        with pytest.raises(ConfigError, match=re.escape(f"config: {words}")):
            train(cfg)
        if section == "data":
            with pytest.raises(ConfigError, match=re.escape(f"build_loaders: {words}")):
                loop.build_loaders(cfg.data, cfg.aug)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_two_trainings_of_one_process_never_write_one_run_directory(data_root, tmp_path):
    # notebook threads: the lock is the process's, so a second training of it was let in, and
    # the first call to end released the other's lock
    import threading

    run = _fake_run(tmp_path, "busy", last=False)
    held, done = threading.Event(), threading.Event()

    def other_training():
        rundir.lock_owner.set(object())
        rundir.lock_run_dir(run)
        held.set()
        done.wait(60)
        rundir.release_run_dirs()

    thread = threading.Thread(target=other_training)
    thread.start()
    try:
        assert held.wait(60)
        with pytest.raises(RunError, match="another training in this process is writing"):
            train(_cfg(data_root, tmp_path, "--log.name=busy"))
        assert run.resolve() in rundir._LOCKS  # still the other training's
    finally:
        done.set()
        thread.join()
    assert run.resolve() not in rundir._LOCKS


def test_a_restarted_named_run_killed_between_its_metrics_and_checkpoint_starts_again(
        data_root, tmp_path, monkeypatch):
    # the first attempt wrote epoch 1's metrics line, not its checkpoint: the restart was
    # refused ("already holds checkpoints or metrics") instead of starting that epoch again
    run = _fake_run(tmp_path, "r", last=False, metrics='{"epoch": 1}\n')
    (run / "config.yaml").write_text("x: 1\n")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setattr(distributed, "remembered_run_dir", lambda: str(run))
    monkeypatch.setattr(distributed, "remember_run_dir", lambda path: None)
    summary = train(_cfg(data_root, tmp_path, "--log.name=r", "--schedule.epochs=1",
                         "--schedule.warmup_epochs=0", "--train.max_steps=2"))
    assert Path(summary["run_dir"]) == run
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m.get("step")) for m in lines] == [(1, 2)]


def test_a_run_folder_name_that_is_not_utf8_goes_through_torchruns_store():
    import torch.distributed as dist
    from datetime import timedelta

    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=10))
    distributed._job_store[0] = dist.PrefixStore("fasttrain/job", store)
    try:
        distributed.remember_run_dir("/runs/r\udcff")
        assert distributed.remembered_run_dir() == "/runs/r\udcff"
    finally:
        distributed._job_store[0] = None


def test_an_agent_store_that_does_not_answer_is_one_line(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # nothing listens there
    monkeypatch.setattr(distributed, "_job_store", [None])
    from datetime import timedelta

    monkeypatch.setattr(distributed, "STORE_TIMEOUT", timedelta(seconds=5))
    with pytest.raises(RunError, match=r"torchrun's store at 127.0.0.1:1 does not answer"):
        distributed.remember_run_dir("/runs/r")


def test_an_interrupt_names_the_run_folder_to_continue(data_root, tmp_path, monkeypatch,
                                                       capsys):
    # the line said "--resume auto", which without --log.name continues the newest run of the
    # recipe (another job's, perhaps), and promised checkpoints when none was written
    args = ("--schedule.epochs=2", "--schedule.warmup_epochs=0", "--model.width=0.25")
    real_epoch, calls, stop_at = loop.train_one_epoch, [], [2]

    def interrupted_second_epoch(*a, **kw):
        calls.append(1)
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        return real_epoch(*a, **kw)

    monkeypatch.setattr(loop, "train_one_epoch", interrupted_second_epoch)
    with pytest.raises(KeyboardInterrupt) as e:
        train(_cfg(data_root, tmp_path, *args))
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert e.value.fasttrain_resume == str(run)
    calls.clear()
    stop_at[0] = 1  # in the first epoch: before any checkpoint
    with pytest.raises(KeyboardInterrupt) as e:
        train(_cfg(data_root, tmp_path / "other", *args))
    assert e.value.fasttrain_resume == ""
    # while a resume loads its data, before it claims the run folder: that run's checkpoints
    # are intact and the same --resume continues it (it said "nothing to continue")
    def loading_interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(loop, "build_loaders", loading_interrupted)
    for resume in (str(run), "auto"):
        with pytest.raises(KeyboardInterrupt) as e:
            train(_cfg(data_root, tmp_path, *args), resume=resume)
        assert e.value.fasttrain_resume == resume
    tool = load_tool("train")
    tool._interrupted(False, str(run))
    tool._interrupted(True, "")
    assert capsys.readouterr().err == (
        f"interrupted: checkpoints already written are intact; continue from the last one "
        f"with --resume {run}\n"
        "terminated: before the first checkpoint, nothing to continue\n")


@pytest.mark.slow
def test_ema_restarts_through_a_fractional_warmup_and_no_further(data_root, tmp_path,
                                                                  monkeypatch):
    """The EMA restarts at each update while the LR warms up, by step: a warmup of 1.5 epochs
    ends inside epoch 2 (the whole of epoch 2 counted as warmup before, so the EMA was a plain
    copy of the weights at its end)."""
    from fasttrain.engine.ema import ModelEma
    from fasttrain.engine.schedule import lr_factor

    seen = []
    step = ModelEma.step
    monkeypatch.setattr(ModelEma, "step", lambda self, model, optimizer_step, in_warmup: (
        seen.append((optimizer_step, in_warmup)), step(self, model, optimizer_step, in_warmup)))
    cfg = _cfg(data_root, tmp_path, "--schedule.epochs=2", "--schedule.warmup_epochs=1.5",
               "--train.ema=true", "--train.ema_steps=1", "--train.max_steps=36",
               "--log.name=frac")
    train(cfg)
    steps_per_epoch = 1433 // 64
    # the LR peaks at 0-based step 33 = 1.5 x 22: steps 0-32 warm up
    assert lr_factor(cfg.schedule, 32, steps_per_epoch) < lr_factor(cfg.schedule, 33,
                                                                    steps_per_epoch) == 1
    assert seen == [(s + 1, s < 33) for s in range(36)]
