"""Crash safety: SIGKILL at random points (inside checkpoint writes too) and resume to
bit-identical weights, failing checkpoint writes, non-finite losses, rank failure under
torchrun --max-restarts, unreadable files, hostile checkpoints."""
import io
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_tool, write_code_running_checkpoint
from fasttrain.config import load
from fasttrain.data.check import scan
from fasttrain.engine import checkpoint as ckpt
from fasttrain.engine import loop, train
from fasttrain.errors import TrainingError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"

# Runs tools/train.py after arranging to die at a planned point (KILL_PLAN, JSON):
#   {"loss_call": k}  SIGKILL itself at the k-th loss computation of this process;
#   {"save_call": n}  SIGKILL itself half-way through writing the n-th checkpoint;
#   {"exit_rank": r, "loss_call": k}  rank r exits with status 1 there, first attempt only;
#   {"nan_rank": r, "loss_call": k}  rank r's k-th loss is NaN;
#   {"hide_rank": r}  rank r does not see the checkpoint rank 0 finds to resume.
WRAPPER = r'''
import json, os, runpy, signal, sys
import torch
import fasttrain.engine.loop as loop
plan = json.loads(os.environ.get("KILL_PLAN", "{}"))
first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
rank = int(os.environ.get("RANK", "0"))
def die():
    if "nan_rank" in plan:
        return rank == plan["nan_rank"]
    if "exit_rank" in plan:
        if first_attempt and rank == plan["exit_rank"]:
            os._exit(1)
    else:
        os.kill(os.getpid(), signal.SIGKILL)
if "loss_call" in plan:
    real_loss, calls = loop.classification_loss, [0]
    def loss(*a, **k):
        calls[0] += 1
        if calls[0] == plan["loss_call"] and die():
            return real_loss(*a, **k) * float("nan")
        return real_loss(*a, **k)
    loop.classification_loss = loss
if plan.get("hide_rank") == rank:  # a node that does not see rank 0's disk
    loop._visible_here = lambda path: False
if "save_call" in plan:
    # In the file write itself (checkpoints are serialised in memory first): half the bytes
    # reach the temporary file next to last.pt, then the process dies.
    import io
    import fasttrain.engine.checkpoint as ckpt
    real_write_atomic, saves = ckpt.write_atomic, [0]
    def write_atomic(path, write, mode="wb"):
        if str(path).endswith(".pt"):
            saves[0] += 1
            if saves[0] == plan["save_call"]:
                def half(f):
                    data = io.BytesIO()
                    write(data)
                    f.write(data.getbuffer()[:len(data.getbuffer()) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    die()
                return real_write_atomic(path, half, mode)
        return real_write_atomic(path, write, mode)
    ckpt.write_atomic = write_atomic
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def tiny_args(data_root: Path, log_dir: Path, name: str, *extra: str) -> list[str]:
    return [str(ROOT / "tools" / "train.py"), str(QUICKSTART), f"--data.path={data_root}/digits",
            "--model.width=0.25", "--schedule.epochs=3", "--train.checkpoint_every=4",
            "--train.deterministic=true", "--train.threads=1", "--data.num_workers=0",
            "--log.progress=plain", f"--log.dir={log_dir}", f"--log.name={name}", *extra]


def run_wrapped(tmp_path: Path, args: list[str], plan: dict | None, data_root: Path,
                launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    env = {**os.environ, "FASTTRAIN_DATA": str(data_root), "KILL_PLAN": json.dumps(plan or {})}
    cmd = (launcher or [sys.executable]) + [str(wrapper)] + args
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_sigterm_while_waiting_for_a_peer_that_never_joins_is_said_at_once(data_root,
                                                                          tmp_path):
    """Rank 0 of two whose peer died before joining (killed while importing torch) waited
    inside init_process_group, where Python's signal handlers do not run: torchrun's SIGTERM
    went unheard for its 30 s grace, then SIGKILL, and the run said nothing."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FASTTRAIN_DATA=str(data_root))
    rank0 = subprocess.Popen([sys.executable] + tiny_args(data_root, tmp_path, "alone"),
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # its store is up: it is joining the group
            assert rank0.poll() is None and time.monotonic() < deadline, rank0.stderr.read()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(1)
        rank0.send_signal(signal.SIGTERM)
        out, err = rank0.communicate(timeout=20)
    finally:
        rank0.kill()
    assert rank0.returncode == 143, err
    assert err.strip().splitlines()[-1] == ("terminated: before the first checkpoint, nothing "
                                            "to continue"), err
    assert not (tmp_path / "alone").exists()


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_identical(data_root, tmp_path):
    reference = run_wrapped(tmp_path, tiny_args(data_root, tmp_path, "straight"), None,
                            data_root)
    assert reference.returncode == 0, reference.stderr[-2000:]
    # 3 epochs x 22 steps = 66 loss calls; 16 step checkpoints + 3 epoch checkpoints.
    rng = random.Random()
    plans = [{"loss_call": rng.randint(2, 40)}, {"save_call": rng.randint(1, 6)},
             {"loss_call": rng.randint(2, 30)}]
    rng.shuffle(plans)
    outcomes = []
    for attempt in range(len(plans) + 1):
        plan = plans[attempt] if attempt < len(plans) else None
        extra = ["--resume", "auto"] if attempt else []
        result = run_wrapped(tmp_path, tiny_args(data_root, tmp_path, "killed", *extra), plan,
                             data_root)
        outcomes.append((plan, result.returncode))
        leftovers = list((tmp_path / "killed" / "checkpoints").glob(".last.pt.tmp-*"))
        if result.returncode == 0:
            assert not leftovers, leftovers  # the resume removed the torn file
            break
        assert result.returncode == -signal.SIGKILL, (plan, result.stderr[-2000:])
        if plan and "save_call" in plan:  # died inside the write: a torn temporary file
            assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0, leftovers
    assert outcomes[-1][1] == 0, outcomes
    assert sum(code == -signal.SIGKILL for _, code in outcomes) >= 2, outcomes
    a = ckpt.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = ckpt.load(tmp_path / "killed" / "checkpoints" / "last.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), (key, outcomes)
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"],
                           b["optimizer"]["state"][key]["momentum_buffer"]), outcomes
    lines = [json.loads(l) for l in (tmp_path / "killed" / "metrics.jsonl").read_text()
             .splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3], outcomes
    straight = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text()
                .splitlines()]
    assert [m["train_loss"] for m in lines] == pytest.approx(
        [m["train_loss"] for m in straight], rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("backend,workers", [("torch", 0), ("torch", 2), ("resident", 0)])
def test_an_epoch_cut_by_max_steps_resumes_to_bit_identical_weights(data_root, tmp_path,
                                                                    backend, workers):
    """Stochastic depth draws from the global RNG; the resume starts a training iterator after
    the cut epoch's validation. Each DataLoader iterator used to draw its base seed from the
    global RNG too, which shifted the stream: the weights ended 0.08 apart."""
    args = [f"--data.path={data_root / 'digits'}", f"--log.dir={tmp_path}",
            "--log.progress=plain", "--model.width=0.25", "--model.drop_path_rate=0.1",
            "--schedule.epochs=2", "--train.deterministic=true", "--train.threads=1",
            f"--data.backend={backend}", f"--data.num_workers={workers}"]
    train(load(QUICKSTART, args + ["--log.name=straight"]))
    cut = train(load(QUICKSTART, args + ["--log.name=cut", "--train.max_steps=5"]))
    assert cut["step"] == 5
    train(load(QUICKSTART, args + ["--log.name=cut"]), resume="auto")
    a = ckpt.load(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = ckpt.load(tmp_path / "cut" / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


@pytest.mark.slow
def test_a_resume_on_three_ranks_is_bit_identical(data_root, tmp_path):
    """DDP rebuilds its gradient buckets after the first step of every construction: the first
    step after a resume packed the gradients differently, and a ring all-reduce over 3 ranks
    rounds by position in the bucket (77 of 116 tensors differed). train.deterministic sums
    them in rank order instead."""
    env = {**os.environ, "FASTTRAIN_DATA": str(data_root)}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
           str(ROOT / "tools" / "train.py"), str(QUICKSTART), f"--log.dir={tmp_path}",
           "--log.progress=plain", "--schedule.warmup_epochs=0", "--schedule.epochs=1",
           "--data.backend=torch", "--data.num_workers=0", "--data.batch_size=48",
           "--data.val_batch_size=363", "--model.width=0.25", "--train.deterministic=true",
           "--train.threads=1", "--model.drop_path_rate=0.2"]
    for extra in (["--log.name=straight"], ["--log.name=cut", "--train.max_steps=10"],
                  ["--log.name=cut", "--resume", "auto"]):
        result = subprocess.run(run + extra, cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, (extra, result.stderr[-3000:])
    a = ckpt.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = ckpt.load(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert a["train_state"]["step"] == b["train_state"]["step"] == 1433 // 48
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    # Stochastic depth draws from each rank's own stream (one seed everywhere dropped the same
    # blocks on every rank), and the checkpoint keeps every rank's for the resume above.
    streams = [r["torch"] for r in b["rng_ranks"]]
    assert len(streams) == 3 and not torch.equal(streams[0], streams[1])
    assert torch.equal(streams[0], b["rng"]["torch"])
    # Cut on one rank, finished on three: the epoch's train_loss divided one rank's saved loss
    # sum by three ranks' step count (23 % low here); the sum is rescaled on resume.
    one = [a if a != "--nproc_per_node=3" else "--nproc_per_node=1" for a in run]
    for command, extra in ((one, ["--log.name=grow", "--train.max_steps=10"]),
                           (run, ["--log.name=grow", "--resume", "auto"])):
        result = subprocess.run(command + extra, cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, (extra, result.stderr[-3000:])
    losses = [json.loads((tmp_path / name / "metrics.jsonl").read_text())["train_loss"]
              for name in ("straight", "grow")]
    assert losses[1] == pytest.approx(losses[0], rel=0.05), losses


@pytest.mark.slow
@pytest.mark.parametrize("reps, accum", [(2, 2), (1, 3)])
def test_accumulation_trains_the_weights_of_more_ranks(data_root, tmp_path, reps, accum):
    """One process with k micro-batches per step and k ranks with one: the same images and
    crops in each BatchNorm batch, the same mixing draw and the same averaged gradient, so the
    same weights bit for bit (BatchNorm running statistics differ: updated per micro-batch).
    k = 3: a mean that divides each micro-batch's loss by k rounds differently."""
    env = {**os.environ, "FASTTRAIN_DATA": str(data_root)}
    common = [str(ROOT / "tools" / "train.py"), str(QUICKSTART), f"--log.dir={tmp_path}",
              "--log.progress=plain", "--schedule.epochs=1", "--schedule.warmup_epochs=0",
              "--data.backend=torch", "--data.num_workers=0", f"--data.batch_size={21 * accum}",
              f"--data.val_batch_size={60 * accum}",
              "--model.width=0.25", "--train.deterministic=true", "--train.threads=1",
              "--train.max_steps=8", f"--data.ra_reps={reps}", "--aug.mixup_alpha=0.2",
              "--aug.cutmix_alpha=1.0"]
    runs = {"ranks": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      f"--nproc_per_node={accum}", *common, "--log.name=ranks"],
            "accum": [sys.executable, *common, "--log.name=accum",
                      f"--train.grad_accum_steps={accum}"]}
    for command in runs.values():
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    a, b = (ckpt.load(tmp_path / name / "checkpoints" / "last.pt") for name in runs)
    assert a["train_state"]["step"] == b["train_state"]["step"] == 8
    weights = [k for k, v in a["model"].items() if v.is_floating_point()
               and not k.endswith(("running_mean", "running_var"))]
    assert len(weights) > 50
    for key in weights:
        assert torch.equal(a["model"][key], b["model"][key]), key


def _cfg(data_root, log_dir, *overrides):
    return load(QUICKSTART, [f"--data.path={data_root / 'digits'}", f"--log.dir={log_dir}",
                             "--log.progress=plain", "--model.width=0.25",
                             "--data.num_workers=0", *overrides])


def test_failed_checkpoint_write_keeps_the_previous_one(data_root, tmp_path, monkeypatch):
    # in the file write itself, after some bytes reached the temporary file (checkpoints are
    # serialised in memory first, so a failing torch.save would never touch the disk)
    real_write_atomic, calls = ckpt.write_atomic, []

    def disk_full_on_third(path, write, mode="wb"):
        if not str(path).endswith(".pt"):
            return real_write_atomic(path, write, mode)
        calls.append(1)

        def partial(f):
            f.write(b"partial")
            f.flush()
            assert list(path.parent.glob(f".{path.name}.tmp-*"))  # on disk now
            raise OSError(28, "No space left on device")
        return real_write_atomic(path, partial if len(calls) == 3 else write, mode)

    monkeypatch.setattr(ckpt, "write_atomic", disk_full_on_third)
    with pytest.raises(TrainingError, match=r"cannot write checkpoint .*last.pt at step 12: "
                                            r"No space left on device; the previous"):
        train(_cfg(data_root, tmp_path, "--schedule.epochs=2", "--train.checkpoint_every=4",
                   "--log.name=full"))
    saved = ckpt.load(tmp_path / "full" / "checkpoints" / "last.pt")
    assert saved["train_state"]["step"] == 8
    assert not list((tmp_path / "full" / "checkpoints").glob(".*tmp*"))


def test_non_finite_loss_stops_and_never_overwrites_a_good_checkpoint(data_root, tmp_path,
                                                                        monkeypatch):
    real_loss, calls = loop.classification_loss, []

    def nan_at_step_7(*a, **k):
        calls.append(1)
        loss = real_loss(*a, **k)
        return loss * float("nan") if len(calls) == 7 else loss

    monkeypatch.setattr(loop, "classification_loss", nan_at_step_7)
    _stops_keeping_the_finite_step_4_checkpoint(
        data_root, tmp_path, "non-finite loss at optimizer step 7 \\(epoch 1\\)")


def _stops_keeping_the_finite_step_4_checkpoint(data_root, tmp_path, message):
    with pytest.raises(TrainingError, match=message):
        train(_cfg(data_root, tmp_path, "--schedule.epochs=2", "--train.checkpoint_every=4",
                   "--log.name=stopped"))
    saved = ckpt.load(tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert saved["train_state"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_non_finite_weights_with_a_finite_loss_stop_before_a_checkpoint(data_root, tmp_path,
                                                                         monkeypatch):
    """An overflowing update or BatchNorm running variance leaves the training loss finite
    (batch statistics normalise it): only the loss was checked, and such a state was saved,
    over a good last.pt and as best.pt, by a run ending with exit 0."""
    real_build, calls = loop.build_model, []

    def inf_running_var_at_step_7(bn, _inputs):
        calls.append(1)
        if len(calls) == 7:  # as a diverging running variance does; the loss is unaffected
            bn.running_var.fill_(float("inf"))

    def build_model(*args):
        model = real_build(*args)
        model.bn1.register_forward_pre_hook(inf_running_var_at_step_7)
        return model

    monkeypatch.setattr(loop, "build_model", build_model)
    _stops_keeping_the_finite_step_4_checkpoint(
        data_root, tmp_path, r"non-finite weights or BatchNorm statistics after optimizer step "
                             r"8 \(epoch 1\)")


@pytest.mark.slow
def test_a_non_finite_loss_on_another_rank_is_reported_by_rank_0(data_root, tmp_path):
    """Rank 1 raised alone and printed nothing (only rank 0 prints user errors): the run
    stopped with "another rank failed first" and no reason, or named a later step."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"]
    args = [a for a in tiny_args(data_root, tmp_path, "nan2")
            if not a.startswith("--train.threads")]
    result = run_wrapped(tmp_path, args, {"nan_rank": 1, "loss_call": 7}, data_root, launcher)
    assert result.returncode != 0
    assert result.stderr.count("error: non-finite loss at optimizer step 7 (epoch 1)") == 1, \
        result.stderr[-3000:]
    saved = ckpt.load(tmp_path / "nan2" / "checkpoints" / "last.pt")
    assert saved["train_state"]["step"] == 4


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_after_a_rank_dies(data_root, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "--max-restarts=2"]
    args = tiny_args(data_root, tmp_path, "elastic")
    args = [a for a in args if not a.startswith(("--schedule.epochs", "--train.threads"))]
    result = run_wrapped(tmp_path, args + ["--schedule.epochs=2"],
                         {"exit_rank": 1, "loss_call": 15}, data_root, launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    lines = [json.loads(l) for l in (tmp_path / "elastic" / "metrics.jsonl").read_text()
             .splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]


@pytest.mark.slow
def test_a_torchrun_restart_continues_its_own_run_not_a_newer_one(data_root, tmp_path):
    # Without --log.name a restart used to resume the newest run of the recipe in log.dir,
    # which another job may have started meanwhile (here: one named as if started later).
    other = tmp_path / "quickstart-20991231-235959"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "last.pt").write_bytes(b"another job's checkpoint")
    (other / "metrics.jsonl").write_text('{"epoch": 1}\n')
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "--max-restarts=1"]
    args = [a for a in tiny_args(data_root, tmp_path, "unused")
            if not a.startswith(("--schedule.epochs", "--train.threads", "--log.name"))]
    result = run_wrapped(tmp_path, args + ["--schedule.epochs=2"],
                         {"exit_rank": 1, "loss_call": 15}, data_root, launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (other / "checkpoints" / "last.pt").read_bytes() == b"another job's checkpoint"
    assert (other / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
    (own,) = [p for p in tmp_path.glob("quickstart-*") if p != other]
    assert f"resumed from {own}" in result.stdout
    lines = [json.loads(l) for l in (own / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]


@pytest.mark.slow
def test_a_rank_that_does_not_see_the_checkpoint_says_the_disk_must_be_shared(data_root,
                                                                              tmp_path):
    args = tiny_args(data_root, tmp_path, "multinode")
    args = [a for a in args if not a.startswith("--schedule.epochs")]
    first = run_wrapped(tmp_path, args + ["--schedule.epochs=2", "--train.max_steps=4"], None,
                        data_root)
    assert first.returncode == 0, first.stderr[-2000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"]
    result = run_wrapped(tmp_path, args + ["--schedule.epochs=2", "--resume", "auto"],
                         {"hide_rank": 1}, data_root, launcher)
    assert result.returncode != 0
    assert ("rank 0 found this checkpoint, rank 1 does not see it: a run on several nodes "
            "keeps log.dir (and a --resume PATH) on a disk they all share") in result.stderr
    assert "or in another node's log" in result.stderr


@pytest.mark.slow
def test_a_c10d_restart_of_two_nodes_continues_the_run(data_root, tmp_path):
    # A rank dies on node 1: its agent restarts it (TORCHELASTIC_RESTART_COUNT 1), and the c10d
    # rendezvous makes node 0's agent restart its healthy worker too, uncounted (0). The ranks
    # took their store prefix from that count and waited for each other for good.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    args = [a for a in tiny_args(data_root, tmp_path, "unused")
            if not a.startswith(("--log.name", "--train.threads"))]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                "--nproc_per_node=1", "--max-restarts=1", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes"]
    env = {**os.environ, "FASTTRAIN_DATA": str(data_root)}
    nodes = [subprocess.Popen(launcher + [str(wrapper)] + args, cwd=tmp_path,
                              env={**env, "KILL_PLAN": json.dumps(plan)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for plan in ({}, {"exit_rank": 1, "loss_call": 30})]
    try:
        outputs = [node.communicate(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], [e[-2000:] for _, e in outputs]
    (run,) = tmp_path.glob("quickstart-*")
    assert f"resumed from {run}" in outputs[0][0]
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]


def make_messy_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(
                    folder / f"ok{i}.JPEG")
        (root / split / "c_empty").mkdir()
    a = root / "train" / "a"
    Image.new("CMYK", (30, 30), (10, 20, 30, 0)).save(a / "cmyk.JPEG")
    Image.new("L", (30, 30), 128).save(a / "gray.JPEG")
    Image.new("RGB", (30, 30)).save(a / "png_inside.JPEG", format="PNG")
    (a / "zero.JPEG").write_bytes(b"")
    full = (a / "ok0.JPEG").read_bytes()
    (a / "truncated.JPEG").write_bytes(full[: len(full) // 2])
    (a / "text.JPEG").write_text("not an image")
    (a / "notes.txt").write_text("ignored")


def test_bad_files_are_skipped_counted_and_listed_once(tmp_path, capsys):
    make_messy_folder(tmp_path / "data")
    cfg = load(None, ["--data.dataset=imagefolder", f"--data.path={tmp_path / 'data'}",
                      "--data.batch_size=4", "--data.val_batch_size=4", "--data.num_workers=1",
                      "--data.train_res=24", "--data.val_res=24", "--data.val_resize=24",
                      "--model.name=cifar_resnet20", "--model.width=0.25",
                      "--schedule.epochs=2", "--train.precision=fp32", f"--log.dir={tmp_path}",
                      "--log.name=messy", "--log.progress=plain"])
    summary = train(cfg)
    assert summary["epoch"] == 2 and summary["skipped_files"] == 3
    out = capsys.readouterr().out
    for name in ("zero.JPEG", "truncated.JPEG", "text.JPEG"):
        assert out.count(f"skipped unreadable file {tmp_path / 'data' / 'train' / 'a' / name}") == 1
    for name in ("cmyk.JPEG", "gray.JPEG", "png_inside.JPEG"):
        assert name not in out


def test_a_file_name_that_is_not_utf8_is_printed_escaped(tmp_path, run_tool):
    """Linux names are bytes: an unreadable file named in Latin-1 made print() raise
    UnicodeEncodeError on a strict UTF-8 stdout (any locale but C's), which killed a training
    run in its first epoch and check_data before its report."""
    make_messy_folder(tmp_path / "data")
    a = tmp_path / "data" / "train" / "a"
    os.rename(a / "zero.JPEG", os.fsdecode(bytes(a) + b"/caf\xe9.JPEG"))
    strict = {"PYTHONIOENCODING": "utf-8"}
    result = run_tool("check_data.py", str(tmp_path / "data"), "--workers", "1",
                      extra_env=strict)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"problem: {a}/caf\\udce9.JPEG: empty file" in result.stdout
    result = run_tool("train.py", str(QUICKSTART), "--data.dataset=imagefolder",
                      f"--data.path={tmp_path / 'data'}", "--data.batch_size=4",
                      "--data.backend=torch", "--data.num_workers=0", "--data.train_res=16",
                      "--data.val_res=16", "--data.val_resize=16", "--model.width=0.25",
                      "--schedule.epochs=1", "--schedule.warmup_epochs=0",
                      f"--log.dir={tmp_path}", "--log.name=latin", "--log.progress=plain",
                      extra_env=strict)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"skipped unreadable file {a}/caf\\udce9.JPEG: empty file" in result.stdout


def test_check_data_reports_problems_and_counts(tmp_path, run_tool, capsys):
    make_messy_folder(tmp_path / "data")
    # What the loaders also read: BMP (decoded by PIL), a linked subfolder, a dangling link.
    a, b = tmp_path / "data" / "train" / "a", tmp_path / "data" / "train" / "b"
    Image.new("RGB", (30, 30)).save(a / "bitmap.bmp")
    (tmp_path / "more").mkdir()
    for i in range(2):
        Image.new("RGB", (30, 30)).save(tmp_path / "more" / f"{i}.jpg")
    os.symlink(tmp_path / "more", b / "more")
    os.symlink(tmp_path / "nowhere.JPEG", a / "gone.JPEG")
    report = scan(tmp_path / "data", workers=2)
    problems = {Path(p).name: why for p, why in report.problems}
    assert set(problems) == {"zero.JPEG", "truncated.JPEG", "text.JPEG", "gone.JPEG", "c_empty"}
    assert len(report.problems) == 6  # c_empty in train/ and in val/
    assert "empty" in problems["zero.JPEG"] and "truncated" in problems["truncated.JPEG"]
    assert problems["gone.JPEG"].startswith("broken symbolic link")
    assert report.class_counts["train"] == {"a": 14, "b": 8, "c_empty": 0}
    assert report.class_counts["val"] == {"a": 6, "b": 6, "c_empty": 0}
    assert [Path(p).name for p in report.ignored] == ["notes.txt"]
    result = run_tool("check_data.py", str(tmp_path / "data"), "--workers", "2")
    assert result.returncode == 1
    assert "problem:" in result.stdout
    assert "6 problem(s), 0 warning(s), 1 ignored file(s)" in result.stdout
    assert f"problem: {a / 'gone.JPEG'}: broken symbolic link" in result.stdout
    clean = tmp_path / "clean" / "x"
    clean.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(clean / "1.jpg")
    # the rest in this process (the command line's exit status is checked above)
    check_data = load_tool("check_data")
    assert check_data.main([str(tmp_path / "clean")]) == 0
    capsys.readouterr()
    assert check_data.main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip().endswith("directory not found")
    assert check_data.main([str(clean / "1.jpg")]) == 2
    assert capsys.readouterr().err.strip().endswith("1.jpg: not a directory")
    assert check_data.main([str(tmp_path / "clean"), "--workers", "-3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --workers=-3: must be 0 (one per core) to 1024"]


def test_hidden_folders_taken_as_classes_are_reported_and_noted(tmp_path):
    """`.ipynb_checkpoints` (a notebook opened on the data) became class 0 and shifted every
    other label, with nothing said by check_data or the run."""
    from fasttrain.engine import loop

    root = tmp_path / "data"
    for cls in ("a", "b", ".ipynb_checkpoints"):
        (root / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / cls / "1.jpg")
    report = scan(root, workers=1)
    assert report.problems == [(str(root / ".ipynb_checkpoints"), "hidden folder taken as a "
                                "class: remove it if it is not one (it shifts every other "
                                "class's label)")]
    printed = []
    loop._note_hidden_class_folders([".git", ".ipynb_checkpoints", "a", "b"], root,
                                    type("Report", (), {"print": printed.append})())
    assert printed == [f"note: hidden folders of {root} taken as classes (as torchvision's "
                       f"ImageFolder does): .git, .ipynb_checkpoints; remove them if not meant "
                       f"as a class (tools/check_data.py lists them)"]
    printed.clear()
    loop._note_hidden_class_folders(["a", "b"], root,
                                    type("Report", (), {"print": printed.append})())
    assert printed == []


def test_jpegs_decoded_past_damage_are_warnings_naming_the_file(run_tool, tmp_path):
    """A JPEG libjpeg decodes past damage (stray bytes before a marker) passed check_data as
    clean; torchvision's warning named no file and the region decoder dropped it."""
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    raw = buf.getvalue()
    sos = raw.index(b"\xff\xda")
    folder = tmp_path / "data" / "a"
    folder.mkdir(parents=True)
    (folder / "clean.jpg").write_bytes(raw)
    (folder / "junk.jpg").write_bytes(raw[:sos] + bytes(16) + raw[sos:])
    report = scan(tmp_path / "data", workers=1)
    assert report.problems == [] and report.warnings == [
        (str(folder / "junk.jpg"), "Corrupt JPEG data: 16 extraneous bytes before marker 0xda")]
    result = run_tool("check_data.py", str(tmp_path / "data"), "--workers", "1")
    assert result.returncode == 0, result.stdout  # a warning is not a problem: it decodes
    assert (f"warning: {folder / 'junk.jpg'}: libjpeg warns while decoding it (Corrupt JPEG "
            f"data: 16 extraneous bytes before marker 0xda); its pixels may be damaged"
            ) in result.stdout
    assert "0 problem(s), 1 warning(s), 0 ignored file(s)" in result.stdout
    # torchvision's own print of it, from the decoding worker, named no file: not printed
    assert "Corrupt JPEG data" not in result.stderr, result.stderr


def test_images_outside_every_class_folder_are_reported_and_noted(run_tool, tmp_path):
    """Images left directly in val/ of a half-sorted set were dropped silently: check_data
    called the set clean and the run validated on half the images it was given; so was a class
    folder whose link is broken."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / cls / "1.jpg")
    for name in ("b2.jpg", "b3.png"):
        Image.new("RGB", (8, 8)).save(root / "val" / name)
    (root / "val" / "notes.txt").write_text("not an image\n")
    # a class folder linked from a drive that is not mounted: skipped by torchvision unsaid
    os.symlink("/nonexistent/mount/c", root / "train" / "c")
    os.symlink("/nonexistent/mount/c4.jpg", root / "val" / "c4.jpg")
    report = scan(root, workers=1)
    why = "image outside every class folder: the loaders never read it (move it into its class " \
          "folder)"
    broken = "not read, as a class folder or an image; mount or restore its target, or remove it"
    assert report.problems == [
        (str(root / "train" / "c"), f"broken link (to /nonexistent/mount/c): {broken}"),
        (str(root / "val" / "b2.jpg"), why), (str(root / "val" / "b3.png"), why),
        (str(root / "val" / "c4.jpg"), f"broken link (to /nonexistent/mount/c4.jpg): {broken}")]
    result = run_tool("train.py", str(QUICKSTART), "--dry-run", "--data.dataset=imagefolder",
                      f"--data.path={root}", "--data.backend=torch", "--data.batch_size=2",
                      "--data.val_batch_size=2", "--data.num_workers=0", f"--log.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert (f"note: 2 images directly in {root / 'val'}, outside every class folder, not read: "
            f"b2.jpg, b3.png (move them into their class folders; tools/check_data.py lists "
            f"them)") in result.stdout + result.stderr
    assert "directly in " + str(root / "train") not in result.stdout + result.stderr
    assert (f"note: 1 broken link in {root / 'train'}, not read (a class folder on an unmounted "
            f"drive is no class): c -> /nonexistent/mount/c") in result.stdout + result.stderr


def test_crafted_checkpoint_is_refused_by_the_cli(run_tool, tmp_path):
    marker = tmp_path / "pwned"
    evil = write_code_running_checkpoint(tmp_path / "evil.pt", marker)
    result = run_tool("train.py", str(QUICKSTART), "--resume", str(evil), "--schedule.epochs=2",
                      f"--log.dir={tmp_path}")
    assert result.returncode == 2
    assert "cannot load checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


class _FullDiskFile:
    """A file whose writes fail as a full disk's do, once `room` bytes are written."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data) -> int:
        size = len(memoryview(data).cast("B"))
        if size > self._room:
            raise OSError(28, "No space left on device")
        self._room -= size
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_a_checkpoint_meeting_a_full_disk_is_an_oserror_and_the_old_file_stays(tmp_path,
                                                                              monkeypatch):
    """torch's zip writer, given the file, turned the OSError of a full disk into
    "RuntimeError: [enforce fail at inline_container.cc] unexpected pos", which the training
    loop and tools/prune.py did not recognise: a traceback instead of one line."""
    path = tmp_path / "last.pt"
    ckpt.save_atomic({"model": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    real_open = open
    for room in (0, 100, 5000):
        monkeypatch.setattr(ckpt, "open", lambda p, mode="r", **kw: _FullDiskFile(
            real_open(p, mode, **kw), room), raising=False)
        with pytest.raises(OSError) as info:
            ckpt.save_atomic({"model": {"w": torch.zeros(100_000)}}, path)
        assert info.value.errno == 28
        assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]


def test_a_read_only_folder_reports_the_write_error_not_the_cleanup_one(tmp_path, monkeypatch):
    """On a read-only mount, unlinking the temporary file that was never made fails with EROFS
    too; that second error hid the first (export and checkpoints: a chained traceback)."""
    import errno as errno_

    def read_only(*args, **kwargs):
        raise OSError(errno_.EROFS, "Read-only file system")

    monkeypatch.setattr(ckpt, "open", read_only, raising=False)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OSError) as info:
        ckpt.write_atomic(tmp_path / "metrics.jsonl", lambda f: f.write("x"), mode="w")
    assert info.value.errno == errno_.EROFS and info.value.__context__ is None
