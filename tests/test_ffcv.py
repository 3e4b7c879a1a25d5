"""The FFCV backend (`data.backend=ffcv`) on the CPU: tools/write_ffcv.py and the `build_loaders`
contract.

FFCV is imported unconditionally: CI installs it, and a missing FFCV must fail this module, not
skip it. Each loader pays numba's JIT (~5-10 s) on its first epoch, so the written files and the
loaders are module fixtures. The tiny CIFAR-10 set is position-coded: red = 8 * column, green =
8 * row, blue = the sample id, label = id % 10, stored raw, so a crop's source, box and flip can
be read back from its pixels.
"""
import functools
import json
import math
import multiprocessing
import os
import pickle
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import ffcv  # noqa: F401  (a missing FFCV fails here: CI must run these tests)
import ffcv.reader
import ffcv.types
import numpy as np
from PIL import Image
import pytest
import torch
import torch.nn.functional as F

from conftest import ReaderGone, load_tool
from fasttrain.config import DataConfig, load
from fasttrain.data import build_loaders, write_cifar10
from fasttrain.data import ffcv_loader
from fasttrain.data.datasets import ImageFolderDataset
from fasttrain.data.ffcv_loader import _clear_stale_temporaries, read_beton, write_beton
from fasttrain.data.transforms import random_resized_crop_params
from fasttrain.errors import ConfigError, DatasetError, RunError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
CIFAR_TRAIN, CIFAR_VAL = 200, 40  # 5 train batches of 40, one test batch of 40


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def digits(data_root, tmp_path_factory) -> Path:
    """A data root <tmp>/digits (linking the session's digits images) whose FFCV files the
    write tool put in the default folder, digits/ffcv (recipe form of the tool)."""
    base = tmp_path_factory.mktemp("ffcv_data")
    root = base / "digits"
    root.mkdir()
    for split in ("train", "val"):
        (root / split).symlink_to(data_root / "digits" / split)
    assert load_tool("write_ffcv").main([str(QUICKSTART), f"--data.path={root}",
                                         "--num-workers=2"]) == 0
    return root


@pytest.fixture(scope="module")
def quick(digits):
    """The quickstart recipe on the FFCV backend (seed 0): config and loaders."""
    cfg = load(QUICKSTART, [f"--data.path={digits}", "--data.backend=ffcv"])
    return cfg, _build(cfg, channels_last=True, seed=0)


def _coded(n: int) -> np.ndarray:
    """(n, 32, 32, 3) uint8: red = 8 * column, green = 8 * row, blue = the sample id."""
    rows, cols = np.mgrid[0:32, 0:32]
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    images[..., 0], images[..., 1] = cols * 8, rows * 8
    images[..., 2] = np.arange(n, dtype=np.uint8)[:, None, None]
    return images


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    """A tiny CIFAR-10 folder of position-coded images, written raw to <root>/ffcv
    (--dataset form of the tool)."""
    root = tmp_path_factory.mktemp("cifar")
    n = CIFAR_TRAIN + CIFAR_VAL
    write_cifar10(root, _coded(n), [i % 10 for i in range(n)], per_batch=CIFAR_VAL)
    assert load_tool("write_ffcv").main(["--dataset=cifar10", f"--path={root}",
                                         "--data.download=false", "--write-mode=raw",
                                         "--num-workers=2"]) == 0
    data = DataConfig(dataset="cifar10", path=str(root))
    assert [len(read_beton(ffcv_loader._ffcv(), root / "ffcv" / f"{split}.beton", data).good)
            for split in ("train", "val")] == [CIFAR_TRAIN, CIFAR_VAL]
    return root


_KEEP = []  # loaders built by tests, alive until the process exits (see _build)


def _build(cfg, **kwargs):
    """build_loaders, keeping the loaders alive: numba's dispatcher finalizer can raise an
    (ignored, harmless) KeyError when an FFCV pipeline is garbage-collected mid-process, which
    pytest would print as a warning; a training run keeps its loaders to the end anyway."""
    loaders = build_loaders(cfg.data, cfg.aug, **kwargs)
    _KEEP.append(loaders)
    return loaders


def _cifar_cfg(root: Path, *overrides: str):
    return load(None, ["--data.dataset=cifar10", f"--data.path={root}", "--data.download=false",
                       "--data.backend=ffcv", "--data.train_res=32", "--data.val_res=32",
                       "--data.val_resize=32", "--data.batch_size=40", "--data.num_workers=2",
                       "--data.mean=[0,0,0]", "--data.std=[1,1,1]", *overrides])


def _pixels(images: torch.Tensor) -> np.ndarray:
    """Normalised batch with mean 0, std 1 back to uint8 (N, C, H, W)."""
    return torch.round(images.float() * 255).to(torch.uint8).numpy()


def _epoch(loader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch, start)
    return list(loader)


# ----------------------------------------------------------------------------------- writing

def test_write_digits_to_the_default_folder_with_a_sidecar(digits):
    folder = digits / "ffcv"
    assert sorted(p.name for p in folder.iterdir()) == [
        "train.beton", "train.beton.json", "val.beton", "val.beton.json"]  # no temp files
    side = json.loads((folder / "train.beton.json").read_text())
    assert side["images"] == 1433 and side["skipped"] == [] and side["dataset"] == "digits"
    assert (side["write_mode"], side["max_resolution"], side["jpeg_quality"],
            side["compress_probability"]) == ("proportion", 512, 90, 0.5)
    assert side["classes"] == [str(d) for d in range(10)]
    assert json.loads((folder / "val.beton.json").read_text())["images"] == 364


def test_stored_labels_are_the_image_folder_labels(digits):
    """Labels are the torch backend's: ImageFolder's sorted class folders, sample by sample."""
    data = DataConfig(dataset="digits", path=str(digits))
    ff = ffcv_loader._ffcv()
    train = ImageFolderDataset(digits / "train")
    val = ImageFolderDataset(digits / "val", class_to_idx=train.class_to_idx)
    assert read_beton(ff, digits / "ffcv" / "train.beton", data).labels.tolist() == train.targets
    assert read_beton(ff, digits / "ffcv" / "val.beton", data).labels.tolist() == val.targets


def test_unreadable_images_are_skipped_and_listed(tmp_path, data_root):
    root = tmp_path / "folder"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((data_root / "digits" / split / "3").iterdir())[:3]:
                (root / split / cls / f.name).write_bytes(f.read_bytes())
    bad = root / "train" / "b" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    # Stored like any image, though each used to kill FFCV's writer process (and hang the
    # write): a 16-bit PNG (uint16 pixels), a strip longer than max_resolution:1 (its short
    # side shrunk to 0 px).
    Image.fromarray(np.full((9, 9), 40000, np.uint16)).save(root / "train" / "a" / "16.png")
    Image.new("RGB", (1200, 2)).save(root / "train" / "a" / "strip.png")
    data = DataConfig(dataset="imagefolder", path=str(root))
    train, val = write_beton(data, num_workers=1, max_resolution=512)
    assert [p for p, _ in train.skipped] == [str(bad)] and not val.skipped
    info = read_beton(ffcv_loader._ffcv(), root / "ffcv" / "train.beton", data)
    assert len(info.labels) == 9 and len(info.good) == 8  # stored as a placeholder, not loaded
    assert list(info.skipped) == [str(bad)]
    assert (512, 1) in set(zip(info.widths.tolist(), info.heights.tolist()))


def test_samples_ffcvs_image_field_would_reject_become_placeholders():
    """RGBImageField.encode asserts uint8 (H, W, 3); a failed assertion in a writer process
    hangs FFCV's writer, so such a sample is stored as a skipped placeholder instead."""
    samples = [(torch.zeros(3, 4, 4, dtype=torch.uint8), 1),
               (torch.zeros(3, 4, 4, dtype=torch.uint16), 2),
               (torch.zeros(4, 4, 4, dtype=torch.uint8), 3)]
    samples.append((torch.zeros(3, 1, 70000, dtype=torch.uint8), 4))  # FFCV stores uint16 sizes
    source = ffcv_loader._HWCSource(samples)
    assert [source[i][1] for i in range(4)] == [1] + [ffcv_loader.SKIPPED_LABEL] * 3
    assert source[0][0].shape == (4, 4, 3) and source[1][0] is source.PLACEHOLDER
    shrunk = ffcv_loader._HWCSource(samples, max_resolution=512)[3]  # shrunk first: it fits
    assert shrunk[0].shape == (1, 512, 3) and shrunk[1] == 4


def test_an_image_larger_than_a_page_is_skipped_or_gets_a_larger_page(tmp_path):
    """FFCV's writer process raised in malloc for raw pixels over its 8 MiB page, and the
    writer waited for the sample forever (--max-resolution=0, or above ~1,670 px)."""
    assert ffcv_loader.page_size_for(512) == 1 << 23  # FFCV's default where it fits
    assert ffcv_loader.page_size_for(2000) == 1 << 24  # 12 MB of raw pixels
    assert ffcv_loader.page_size_for(0) == 1 << 23
    root = tmp_path / "big"
    for split in ("train", "val"):
        (root / split / "c").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / split / "c" / "s.png")
    Image.fromarray(np.zeros((1100, 2700, 3), dtype=np.uint8)).save(root / "train" / "c" / "b.png")
    data = DataConfig(dataset="imagefolder", path=str(root))
    train, _ = write_beton(data, tmp_path / "keep", max_resolution=0, write_mode="raw",
                           num_workers=1)
    assert [(Path(p).name, r) for p, r in train.skipped] == [
        ("b.png", "2700x1100 px: its raw pixels exceed FFCV's page of 8 MiB; set "
                  "--max-resolution")]
    train, _ = write_beton(data, tmp_path / "shrunk", max_resolution=2700, write_mode="raw",
                           num_workers=1)
    assert not train.skipped and train.images == 2


def test_a_folder_it_cannot_write_is_one_line_and_ctrl_c_exits_130(monkeypatch, capsys):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/data/ffcv/.train.beton.tmp-1")

    monkeypatch.setattr(ffcv_loader, "_write_split", denied)
    assert _write_tool(["--dataset=digits"]) == 2
    assert capsys.readouterr().err == ("error: /data/ffcv/.train.beton.tmp-1: cannot write the "
                                       "FFCV files (Permission denied)\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ffcv_loader, "_write_split", interrupted)
    assert _write_tool(["--dataset=digits"]) == 130
    assert capsys.readouterr().err == ("error: interrupted; no file was replaced (earlier files "
                                       "are kept)\n")


def test_a_closed_stdout_still_writes_the_files_and_exits_141(tmp_path, monkeypatch, cifar):
    """`write_ffcv.py ... | head -1`: the summary's BrokenPipeError was a traceback."""
    monkeypatch.setattr(sys, "stdout", ReaderGone())
    assert _write_tool(["--dataset=cifar10", f"--path={cifar}", "--data.download=false",
                        f"--out={tmp_path}", "--write-mode=raw", "--num-workers=1"]) == 141
    assert sorted(p.name for p in tmp_path.glob("*.beton")) == ["train.beton", "val.beton"]


def test_ctrl_c_removes_the_output_folder_the_tool_made(tmp_path, monkeypatch):
    """Compare, prune and export remove the folders they made when they fail; write_ffcv left
    its empty --out folder behind."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ffcv_loader, "_write_split", interrupted)
    (tmp_path / "kept").mkdir()
    assert _write_tool(["--dataset=digits", f"--out={tmp_path / 'kept'}"]) == 130
    assert _write_tool(["--dataset=digits", f"--out={tmp_path / 'new' / 'ffcv'}"]) == 130
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]


def test_the_progress_bar_is_drawn_only_on_a_terminal(tmp_path, run_tool, cifar):
    """FFCV's tqdm bar went to a log as frames joined by \\r: one line as long as the write."""
    result = run_tool("write_ffcv.py", "--dataset=cifar10", f"--path={cifar}",
                      "--data.download=false", f"--out={tmp_path / 'out'}", "--write-mode=raw",
                      "--num-workers=1", extra_env={"PYTHONPATH": str(ROOT)})
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch, cifar):
    """A write that fails half-way publishes nothing and keeps the previous file."""
    data = DataConfig(dataset="cifar10", path=str(cifar), download=False)
    out = tmp_path / "out"
    write_beton(data, out, write_mode="raw", num_workers=1, splits=("val",))
    before = (out / "val.beton").read_bytes()

    def crash(self, allocations):
        raise KeyboardInterrupt  # as if Ctrl-C came while the file was being finished

    monkeypatch.setattr(ffcv.writer.DatasetWriter, "finalize", crash)
    with pytest.raises(KeyboardInterrupt):
        write_beton(data, out, write_mode="jpg", num_workers=1, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["val.beton", "val.beton.json"]
    assert (out / "val.beton").read_bytes() == before
    assert not (out / "train.beton").exists()


def _disk_full():
    raise OSError(28, "No space left on device", "/data/val.beton")


@pytest.mark.parametrize("dies, why", [
    (functools.partial(os._exit, 1), "exit code 1; its error is above: a full disk?"),
    (_disk_full, "No space left on device: /data/val.beton")])
def test_a_writer_process_that_dies_ends_the_write_with_one_error(tmp_path, monkeypatch, cifar,
                                                                  capfd, dies, why):
    """A full disk ends an FFCV writer process before it reports; DatasetWriter then waited for
    it forever (the tool sat at 100 % until killed, its temporary file left behind). A
    process's OSError is said in that one line, where its 15-line traceback came first."""
    data = DataConfig(dataset="cifar10", path=str(cifar), download=False)
    out = tmp_path / "out"
    write_beton(data, out, write_mode="raw", num_workers=1, splits=("val",))
    before = (out / "val.beton").read_bytes()

    def dies_while_waited_for(self, *args, **kwargs):
        worker = ffcv.writer.Process(target=dies)  # as FFCV starts them
        worker.start()
        multiprocessing.Queue().get(timeout=60)  # as FFCV's wait for its allocations
        pytest.fail("the wait was not ended")

    monkeypatch.setattr(ffcv.writer.DatasetWriter, "from_indexed_dataset", dies_while_waited_for)
    capfd.readouterr()
    with pytest.raises(DatasetError, match=rf"val.beton: an FFCV writer process failed "
                                           rf"\({re.escape(why)}\); no file was replaced$"):
        write_beton(data, out, write_mode="raw", num_workers=1, splits=("val",), overwrite=True)
    if dies is _disk_full:
        assert "Traceback" not in capfd.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["val.beton", "val.beton.json"]
    assert (out / "val.beton").read_bytes() == before


def test_the_writer_process_class_pickles_for_spawn_and_forkserver():
    """macOS starts processes with spawn, Linux from Python 3.14 with forkserver: both pickle
    FFCV's writer processes, whose class the watchdog replaces (a local class could not be; a
    whole write under spawn gave the bytes of one under fork, checked by hand: 10-20 s here)."""
    with ffcv_loader._writer_watchdog(ffcv.writer):
        process_class = ffcv.writer.Process
        assert process_class is not multiprocessing.Process
        assert pickle.loads(pickle.dumps(process_class)) is process_class
    assert ffcv.writer.Process is multiprocessing.Process


def test_an_interrupted_write_with_unread_work_lets_the_process_exit():
    """Ctrl-C early in a large write (2,700 images) hung the tool: FFCV's work queue still
    held items its feeder thread was writing into a pipe nobody read, and the interpreter
    joins that thread at exit. Here: a write's queues as FFCV makes them (its module's
    `Queue`), ~2 MB put, nobody reading, the block ended by KeyboardInterrupt."""
    import subprocess

    script = ("import multiprocessing, types\n"
              "from fasttrain.data import ffcv_loader\n"
              "module = types.SimpleNamespace(Process=multiprocessing.Process,\n"
              "                               Queue=multiprocessing.Queue)\n"
              "try:\n"
              "    with ffcv_loader._writer_watchdog(module):\n"
              "        work = module.Queue()\n"
              "        for _ in range(2000):\n"
              "            work.put(bytes(1000))\n"
              "        raise KeyboardInterrupt\n"
              "except KeyboardInterrupt:\n"
              "    assert module.Queue is multiprocessing.Queue\n"
              "    print('interrupted')\n")
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit within 60 s of the interrupted block")
    assert (done.returncode, done.stdout) == (0, "interrupted\n"), done.stderr


def test_two_writers_into_one_folder_take_turns_so_the_settings_check_holds(tmp_path, cifar,
                                                                           monkeypatch):
    """Two writes with other settings started together both passed the check and the last to
    finish replaced the other's files (5 of 5 tries). A waits inside its write until B has
    written too (no lock) or waits for A's lock; then B meets A's files and is refused."""
    import threading

    from fasttrain.engine import checkpoint

    data = DataConfig(dataset="cifar10", path=str(cifar), download=False)
    out = tmp_path / "out"
    a_writes, b_wrote, b_waits = threading.Event(), threading.Event(), threading.Event()
    real_split, real_lock = ffcv_loader._write_split, checkpoint.lock_folder

    def write_split(*args, **kwargs):
        if threading.current_thread().name == "A":
            a_writes.set()
            for _ in range(300):
                if b_wrote.is_set() or b_waits.is_set():
                    break
                threading.Event().wait(0.1)
        result = real_split(*args, **kwargs)
        if threading.current_thread().name == "B":
            b_wrote.set()
        return result

    def lock_folder(folder, *, wait):
        if wait and threading.current_thread().name == "B":
            b_waits.set()
        return real_lock(folder, wait=wait)

    monkeypatch.setattr(ffcv_loader, "_write_split", write_split)
    monkeypatch.setattr(checkpoint, "lock_folder", lock_folder)
    outcomes = {}

    def write(quality):
        try:
            write_beton(data, out, write_mode="jpg", jpeg_quality=quality, num_workers=1,
                        splits=("val",))
            outcomes[quality] = "written"
        except DatasetError as e:
            outcomes[quality] = str(e)

    a = threading.Thread(target=write, args=(90,), name="A")
    a.start()
    assert a_writes.wait(60)
    b = threading.Thread(target=write, args=(50,), name="B")
    b.start()
    a.join(120)
    b.join(120)
    assert outcomes[90] == "written" and "other settings" in outcomes[50], outcomes
    assert json.loads((out / "val.beton.json").read_text())["jpeg_quality"] == 90


def test_files_written_with_other_settings_are_replaced_only_on_request(tmp_path, cifar,
                                                                       capsys):
    """README's two ImageNet commands (ResNet-50: 500 px, 50 % JPEG; ResNet-18: 400 px, 10 %)
    both write to <DIR>/ffcv: the second replaced the first recipe's files silently."""
    data = DataConfig(dataset="cifar10", path=str(cifar), download=False)
    out = tmp_path / "out"
    write_beton(data, out, max_resolution=500, compress_probability=0.5, num_workers=1,
                splits=("val",))
    before = (out / "val.beton").read_bytes()
    with pytest.raises(DatasetError, match=r"val.beton: written with other settings "
                                           r"\(max_resolution 500 \(now 400\), "
                                           r"compress_probability 0.5 \(now 0.1\)\); write to "
                                           r"another folder with --out=FOLDER"):
        write_beton(data, out, max_resolution=400, compress_probability=0.1, num_workers=1,
                    splits=("val",))
    assert (out / "val.beton").read_bytes() == before
    # a sidecar whose file is gone guards nothing
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "val.beton.json").write_bytes((out / "val.beton.json").read_bytes())
    write_beton(data, tmp_path / "gone", max_resolution=400, num_workers=1, splits=("val",))
    # settings the mode does not use are no difference; the same settings rewrite freely
    write_beton(data, out, max_resolution=500, compress_probability=0.5, smart_threshold=1,
                num_workers=1, splits=("val",))
    with pytest.raises(DatasetError, match=r"write_mode proportion \(now raw\)"):
        write_beton(data, out, write_mode="raw", num_workers=1, splits=("val",))
    # of another mode, the settings both store are named too (it said write_mode alone, and
    # the next try met max_resolution)
    with pytest.raises(DatasetError, match=r"\(write_mode proportion \(now jpg\), "
                                           r"max_resolution 500 \(now 400\)\); write"):
        write_beton(data, out, write_mode="jpg", max_resolution=400, num_workers=1,
                    splits=("val",))
    args = ["--dataset=cifar10", f"--path={cifar}", "--data.download=false", f"--out={out}",
            "--write-mode=raw", "--num-workers=1"]
    capsys.readouterr()
    assert _write_tool(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("or replace it with --overwrite\n")
    assert _write_tool(args + ["--overwrite"]) == 0, capsys.readouterr().err
    assert json.loads((out / "val.beton.json").read_text())["write_mode"] == "raw"


def _write_tool(args: list[str]) -> int:
    try:
        return load_tool("write_ffcv").main(args)
    except SystemExit as e:  # argparse's usage errors
        return e.code


@pytest.mark.parametrize("args, message", [
    (["--dataset=imagefolder"], "data.path is required"),
    (["--dataset=imagenet"], "data.dataset must be one of"),
    (["--dataset=imagefolder", "--path=/nonexistent/imagenet"], "/nonexistent/imagenet/train"),
    (["--dataset=cifar10", "--path=/nonexistent/cifar", "--data.download=false"],
     "/nonexistent/cifar/cifar-10-batches-py: CIFAR-10 not found"),
    (["--dataset=digits", "--jpeg-quality=0"], "(--jpeg-quality) must be in 1..100, got 0"),
    (["--dataset=digits", "--write-mode=png"], "(--write-mode) must be one of"),
    (["--dataset=digits", "--compress-probability=2"], "must be in 0..1, got 2.0"),
    (["--dataset=digits", "--max-resolution=big"], "--max-resolution: invalid int value"),
    # FFCV's pages must stay under 4 GiB (was its ValueError traceback from 26755 px on)
    (["--dataset=digits", "--max-resolution=26755"],
     "(--max-resolution) must be in 0..26754 (0 = keep sizes; FFCV pages are under 4 GiB), "
     "got 26755"),
    (["--dataset=digits", "--smart-threshold=-5"], "(--smart-threshold) must be >= 0 bytes"),
    (["recipes/missing.yaml"], "recipes/missing.yaml: recipe file not found"),
    (["--dataset=digits", "--out="], "argument --out: empty path"),  # was the current folder
    (["--dataset=digits", "--num-workers=100000"], "(--num-workers) must be 0..1024"),
    # the option was appended after the override and silently won
    (["--dataset=digits", "--data.dataset=cifar10"], "--dataset and --data.dataset both given"),
    ([""], "argument recipe: empty path"),  # was ".: cannot read recipe: Is a directory"
    (["--dataset=imagefolder", "--path=/a", "--data.path=/b"], "--path and --data.path both "
     "given; keep one"),
])
def test_write_tool_bad_input_exits_2_with_one_line(args, message, capsys):
    code = _write_tool(args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_write_tool_exit_status_from_the_command_line(run_tool):
    result = run_tool("write_ffcv.py")
    assert result.returncode == 2
    assert result.stderr == ("error: give a recipe or --dataset (digits | imagefolder | "
                             "cifar10)\n")


@pytest.mark.slow
def test_sigterm_removes_the_partial_file_like_ctrl_c(data_root, tmp_path):
    """A time limit's SIGTERM ended the tool with no message and left its hidden partial file
    (for ImageNet, hundreds of GB no later write removes: each uses a new temporary name)."""
    import signal
    import subprocess
    import time

    out = tmp_path / "ffcv"
    env = {**os.environ, "FASTTRAIN_DATA": str(data_root)}
    # The tool as its command line runs it, each image slowed down: the signal comes while
    # the writer processes work (one arriving inside a fork is swallowed by Python).
    slowed = ("import runpy, sys, time; from fasttrain.data import ffcv_loader as f; "
              "get = f._HWCSource.__getitem__; "
              "f._HWCSource.__getitem__ = lambda self, i: (time.sleep(0.02), get(self, i))[1]; "
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    tool = subprocess.Popen([sys.executable, "-c", slowed, str(ROOT / "tools" / "write_ffcv.py"),
                             "--dataset=digits", f"--out={out}", "--num-workers=1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob(".*.tmp-*")) and tool.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2)  # 1,433 images at 20 ms: the write is under way for ~30 s
    assert tool.poll() is None, "the write ended before it could be interrupted"
    tool.send_signal(signal.SIGTERM)
    _, err = tool.communicate(timeout=60)
    assert tool.returncode == 130, err
    assert "error: interrupted; no file was replaced (earlier files are kept)\n" in err
    assert "Traceback" not in err, err
    assert not out.exists()  # the folder the tool made, empty again


# ----------------------------------------------------------------------------------- loading

def test_batches_shapes_layout_and_labels(quick, digits):
    cfg, loaders = quick
    assert (loaders.num_classes, loaders.classes) == (10, [str(d) for d in range(10)])
    assert loaders.root == digits and loaders.train.skipped == {} == loaders.val.skipped
    assert (len(loaders.train), len(loaders.val)) == (1433 // 64, 1)
    assert (loaders.train_images, loaders.val_images) == (1433, 364)
    batches = _epoch(loaders.train, 0)
    assert len(batches) == 22
    images, labels = batches[0]
    assert images.shape == (64, 3, 16, 16) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert images.device.type == "cpu" and labels.dtype == torch.int64 and labels.shape == (64,)
    assert -1.0 - 1e-6 <= images.min() and images.max() <= 1.0 + 1e-6  # mean = std = 0.5
    # One epoch: every label is a digit, and no sample twice beyond its class count.
    seen = Counter(torch.cat([y for _, y in batches]).tolist())
    total = Counter(ImageFolderDataset(digits / "train").targets)
    assert sum(seen.values()) == 22 * 64 and all(seen[c] <= total[c] for c in seen)


def test_validation_matches_the_torch_backend(quick, digits):
    """Same samples, same order, same labels; the pixels agree up to JPEG re-encoding (the
    files store JPEGs FFCV's writer re-encoded)."""
    cfg, loaders = quick
    (images, labels), = list(loaders.val)
    assert images.shape == (364, 3, 16, 16)
    torch_cfg = load(QUICKSTART, [f"--data.path={digits}"])
    reference = build_loaders(torch_cfg.data, torch_cfg.aug, channels_last=True)
    (ref_images, ref_labels), = list(reference.val)
    assert torch.equal(labels, ref_labels)
    diff = (images - ref_images).abs().mean(dim=(1, 2, 3))  # per image, 1.0 = 127.5 levels
    assert diff.max() < 0.1, diff.max()


@pytest.fixture(scope="module")
def odd_sizes(tmp_path_factory) -> Path:
    """An ImageFolder whose validation images have sizes that exercise the val transform:
    shorter side above, at and below val_resize=32, both orientations, odd and even margins
    around the 24 px crop (ties in the center anchor); written raw at their own size."""
    from test_jpeg import encode, photo
    root = tmp_path_factory.mktemp("odd_sizes")
    sizes = [(45, 60), (60, 45), (32, 47), (47, 32), (21, 30), (33, 33), (50, 37), (71, 39),
             (26, 26), (32, 32)]
    for split in ("train", "val"):
        for i, (h, w) in enumerate(sizes):
            folder = root / split / f"c{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.jpg").write_bytes(encode(photo(h, w, seed=i)))
    data = DataConfig(dataset="imagefolder", path=str(root))
    write_beton(data, write_mode="raw", max_resolution=0, num_workers=1)
    return root


def test_validation_of_original_pixels_is_the_torch_backends_exactly(odd_sizes):
    """Resize of the shorter side (torchvision's size rule, skipped at val_resize), the torch
    backend's kernel, torchvision's center anchor: with the original pixels stored, every
    validation image equals the torch backend's bit for bit."""
    args = [f"--data.path={odd_sizes}", "--data.dataset=imagefolder", "--data.val_res=24",
            "--data.val_resize=32", "--data.train_res=24", "--data.batch_size=4",
            "--data.num_workers=2"]
    batches = {}
    for backend in ("ffcv", "torch"):
        cfg = load(None, [*args, f"--data.backend={backend}"])
        loaders = _build(cfg, channels_last=False, seed=0, dtype=torch.uint8)
        batches[backend] = [torch.cat(parts) for parts in zip(*loaders.val)]
    images, labels = batches["ffcv"]
    ref_images, ref_labels = batches["torch"]
    assert images.shape == (10, 3, 24, 24) and torch.equal(labels, ref_labels)
    assert torch.equal(images, ref_images), (images.int() - ref_images.int()).abs().amax(
        dim=(1, 2, 3))


def test_validation_without_fasttrains_decoders_uses_ffcvs(quick, digits, monkeypatch):
    """Without the region decoder and the native resize (a build without libjpeg-turbo's
    headers), validation decodes with FFCV's decoder and resizes with INTER_AREA: the same
    geometry, pixels close to the torch backend's."""
    from fasttrain.data import jpeg, resize
    _, loaders = quick
    (full, labels), = list(loaders.val)
    monkeypatch.setattr(jpeg, "AVAILABLE", False)
    monkeypatch.setattr(resize, "AVAILABLE", False)
    fallback = ffcv_loader._ffcv.__wrapped__()
    monkeypatch.setattr(ffcv_loader, "_ffcv", lambda: fallback)
    cfg = load(QUICKSTART, [f"--data.path={digits}", "--data.backend=ffcv"])
    (images, fallback_labels), = list(_build(cfg, channels_last=True, seed=0).val)
    assert torch.equal(labels, fallback_labels) and images.shape == full.shape
    diff = (images - full).abs().mean(dim=(1, 2, 3))
    assert 0 < diff.mean() and diff.max() < 0.1, diff.max()


def test_same_seed_same_batches_and_each_epoch_reshuffles(quick):
    """Order and augmentation follow (seed, epoch) only: a second loader with another thread
    count gives the same batches, bit for bit."""
    cfg, loaders = quick
    first, again, second = (_epoch(loaders.train, e) for e in (0, 0, 1))
    one_thread = load(QUICKSTART, [f"--data.path={cfg.data.path}", "--data.backend=ffcv",
                                   "--data.num_workers=1"])
    other = _epoch(_build(one_thread, channels_last=True, seed=0).train, 1)
    for (x, y), (x2, y2) in zip(first + second, again + other, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    labels = [torch.cat([y for _, y in b]) for b in (first, second)]
    assert not torch.equal(labels[0], labels[1])


def test_resume_inside_an_epoch_skips_its_first_batches(quick):
    _, loaders = quick
    full = _epoch(loaders.train, 1)
    loaders.train.set_epoch(1, start_batch=5)
    assert len(loaders.train) == 22 - 5
    tail = list(loaders.train)
    loaders.train.set_epoch(0)
    assert len(tail) == 17
    for (x, y), (x2, y2) in zip(full[5:], tail):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_an_epoch_left_after_one_batch_stops_its_decoding_thread(quick):
    """A script taking one batch and exiting aborted now and then ("terminate called without
    an active exception"): FFCV's close() signalled its thread but did not wait for it."""
    import threading

    _, loaders = quick
    loaders.train.set_epoch(2)
    batches = iter(loaders.train)
    next(batches)
    batches.close()  # what leaving a for loop early or garbage collection does
    assert not [t for t in threading.enumerate() if type(t).__name__ == "EpochIterator"]
    assert len(_epoch(loaders.train, 2)) == 22  # the loader still works


def test_pad_random_is_the_cifar_crop_and_labels_follow_images(cifar):
    """Each training image is its source shifted by (dy, dx) in [-4, 4] with zero fill, maybe
    mirrored (checked pixel for pixel against torch); shifts and flips are uniform, change
    with the epoch, and the label is the image's."""
    cfg = _cifar_cfg(cifar, "--aug.train_crop=pad_random", "--aug.padding=4")
    loaders = _build(cfg, channels_last=False, seed=3)
    assert len(loaders.train) == CIFAR_TRAIN // 40
    source = torch.from_numpy(_coded(CIFAR_TRAIN + CIFAR_VAL)).permute(0, 3, 1, 2)
    padded = F.pad(source, (4, 4, 4, 4))
    draws = {}
    for epoch in range(3):
        for images, labels in _epoch(loaders.train, epoch):
            assert images.is_contiguous()
            for image, label in zip(_pixels(images).astype(np.int64), labels.tolist()):
                # Columns 12..20 of the centre row always come from the image (|shift| <= 4).
                sid, flip = image[2, 16, 16], image[0, 16, 17] < image[0, 16, 16]
                dx = image[0, 16, 16] // 8 - (15 if flip else 16)
                dy = image[1, 16, 16] // 8 - 16
                expected = padded[sid, :, 4 + dy:36 + dy, 4 + dx:36 + dx]
                expected = expected.flip(-1) if flip else expected
                assert np.array_equal(image, expected.numpy()) and label == sid % 10
                draws[epoch, sid] = (int(dy), int(dx), bool(flip))
    assert sorted({sid for _, sid in draws}) == list(range(CIFAR_TRAIN))  # no padding here
    values = list(draws.values())
    assert {d[0] for d in values} == set(range(-4, 5)) == {d[1] for d in values}
    assert abs(np.mean([d[2] for d in values]) - 0.5) < 0.1
    assert abs(np.mean([d[0] for d in values])) < 0.5 and abs(np.mean([d[1] for d in values])) < 0.5
    same = sum(draws[0, s] == draws[1, s] for s in range(CIFAR_TRAIN))
    assert same < CIFAR_TRAIN * 0.1  # the augmentation changes with the epoch
    (images, labels), = list(loaders.val)
    ids = _pixels(images)[:, 2, 16, 16].tolist()
    assert ids == list(range(CIFAR_TRAIN, CIFAR_TRAIN + CIFAR_VAL))
    assert labels.tolist() == [i % 10 for i in ids]


def test_random_resized_crop_statistics_match_the_torch_backend(cifar):
    """Crop boxes read back from the colour ramps: mean and spread of the kept area and the
    aspect agree with `random_resized_crop_params` (the torch backend's sampler) on the same
    image size; with progressive resizing the output size follows the epoch."""
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    cfg = _cifar_cfg(cifar, "--aug.scale=[0.08,1.0]", "--aug.ratio=[0.75,1.3333333333]",
                     "--aug.hflip=0", "--data.min_res=16", "--data.max_res=32",
                     "--data.start_ramp=0", "--data.end_ramp=1")
    loaders = _build(cfg, channels_last=True, seed=1)
    areas, aspects, sizes = [], [], []
    for epoch in range(4):
        for images, _ in _epoch(loaders.train, epoch):
            size = images.shape[-1]
            sizes.append(size)
            pixels = _pixels(images).astype(np.float64)
            # Output column j samples source column left + (j + 0.5) * w / size - 0.5: the red
            # ramp (8 levels per source column) rises by 8 * w / size per output column.
            inner = np.arange(2, size - 2)
            columns = pixels[:, 0].mean(axis=1)[:, inner]  # (N, size - 4): red across the crop
            rows = pixels[:, 1].mean(axis=2)[:, inner]  # green down the crop
            w = np.polyfit(inner, columns.T, 1)[0] * size / 8
            h = np.polyfit(inner, rows.T, 1)[0] * size / 8
            areas += list(w * h / 1024)
            aspects += list(np.log(w / h))
    assert sizes == [16] * 5 + [32] * 15  # min_res at epoch 0, max_res from epoch 1
    rng = random.Random(0)
    ref = [random_resized_crop_params(32, 32, scale, ratio, rng) for _ in range(20000)]
    ref_areas = [h * w / 1024 for _, _, h, w in ref]
    assert len(areas) == 4 * CIFAR_TRAIN
    assert abs(np.mean(areas) - np.mean(ref_areas)) < 0.03, (np.mean(areas), np.mean(ref_areas))
    assert abs(np.std(areas) - np.std(ref_areas)) < 0.03, (np.std(areas), np.std(ref_areas))
    assert abs(np.mean(aspects)) < 0.05 and min(areas) > 0.05 and max(areas) < 1.05


def _crop_and_box(ff, image: np.ndarray, size: int, key: int, native: bool = True,
                  flip_prob: float = 0.0):
    """ff.crop_flip's output for one stored image and the box it drew."""
    import numba
    seed_sample, random_box = ff.seed_sample, ff.random_box

    @numba.njit
    def draw(key, height, width, scale, ratio):
        seed_sample(key)
        return random_box(height, width, scale, ratio)

    scale, ratio = np.array([0.08, 1.0]), np.array([3 / 4, 4 / 3])
    out = np.zeros((size, size, 3), np.uint8)
    ff.crop_flip(image, out, np.uint64(key), scale, ratio, flip_prob, -1, native)
    return out, draw(np.uint64(key), image.shape[0], image.shape[1], scale, ratio)


def test_crops_are_the_torch_backends_resize_of_the_drawn_box():
    """FFCV's RandomResizedCrop resizes with torch's antialiased bilinear kernel
    (fasttrain.data.resize): pixel for pixel what the torch backend makes of the same box."""
    from fasttrain.data.transforms import resize_square
    ff = ffcv_loader._ffcv()
    image = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    for key in range(12):
        out, (top, left, h, w) = _crop_and_box(ff, image, 224, key)
        crop = torch.from_numpy(image[top:top + h, left:left + w].copy()).permute(2, 0, 1)
        assert torch.equal(torch.from_numpy(out), resize_square(crop, 224).permute(1, 2, 0))


@pytest.mark.parametrize("native", [True, False])
def test_flipped_crops_are_the_same_crops_mirrored(native):
    """aug.hflip=1: the same box, mirrored (by the C function with torch's resize, by numba's
    loop after INTER_AREA)."""
    ff = ffcv_loader._ffcv()
    image = np.random.default_rng(1).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    for key in range(6):
        out, box = _crop_and_box(ff, image, 96, key, native)
        flipped, flipped_box = _crop_and_box(ff, image, 96, key, native, flip_prob=1.0)
        assert flipped_box == box and np.array_equal(flipped, out[:, ::-1])


def test_opencv_resize_and_a_build_without_the_native_one_crop_the_same_box(monkeypatch):
    """data.ffcv_resize=opencv, and a build without fasttrain_resize_flip_rgb_u8, resize with FFCV's
    INTER_AREA: the same box, a different filter (close on a smooth image, not equal)."""
    from fasttrain.data import resize
    from test_jpeg import photo
    image = photo(375, 500, seed=2)
    ff = ffcv_loader._ffcv()
    native = [_crop_and_box(ff, image, 64, key) for key in range(4)]
    opencv = [_crop_and_box(ff, image, 64, key, native=False) for key in range(4)]
    monkeypatch.setattr(resize, "AVAILABLE", False)
    fallback = ffcv_loader._ffcv.__wrapped__()  # a fresh namespace, compiled without it
    for key, ((out, box), (area, area_box)) in enumerate(zip(native, opencv)):
        other, other_box = _crop_and_box(fallback, image, 64, key)
        assert other_box == area_box == box and np.array_equal(other, area)
        diff = np.abs(area.astype(int) - out.astype(int))
        assert 0 < diff.mean() < 4 and not np.array_equal(area, out), diff.mean()


def test_ffcv_resize_opencv_is_ffcvs_own_pipeline(odd_sizes):
    """data.ffcv_resize=opencv: the same training boxes and flips with INTER_AREA, and FFCV's
    center-crop decoder for validation (the same region, other pixels)."""
    args = [f"--data.path={odd_sizes}", "--data.dataset=imagefolder", "--data.val_res=24",
            "--data.val_resize=32", "--data.train_res=24", "--data.batch_size=5",
            "--data.num_workers=2", "--data.backend=ffcv"]
    batches = {}
    for how in ("torch", "opencv"):
        loaders = _build(load(None, [*args, f"--data.ffcv_resize={how}"]), channels_last=False,
                         seed=4, dtype=torch.uint8)
        assert loaders.train.decoder.native_resize == (how == "torch")
        batches[how] = (_epoch(loaders.train, 2), [torch.cat(p) for p in zip(*loaders.val)])
    for (x, y), (xo, yo) in zip(batches["torch"][0], batches["opencv"][0]):
        assert torch.equal(y, yo) and not torch.equal(x, xo)
        assert (x.float() - xo.float()).abs().mean() < 6
    (val, labels), (val_o, labels_o) = batches["torch"][1], batches["opencv"][1]
    assert torch.equal(labels, labels_o) and val.shape == val_o.shape
    assert 0 < (val.float() - val_o.float()).abs().mean() < 8


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """An ImageFolder of 48 photo-like 120x160 JPEGs, written to FFCV as JPEG (jpg mode)."""
    from test_jpeg import encode, photo
    root = tmp_path_factory.mktemp("photos")
    for split, n in (("train", 48), ("val", 6)):
        for i in range(n):
            folder = root / split / f"c{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.jpg").write_bytes(encode(photo(120, 160, seed=i)))
    data = DataConfig(dataset="imagefolder", path=str(root))
    write_beton(data, write_mode="jpg", max_resolution=256, num_workers=1)
    return root


def test_region_decode_gives_the_whole_decode_batches(photos):
    """The same seed draws the same boxes and flips with and without region decoding; pixels
    differ only by FFCV's fast IDCT (whole decode) vs the accurate one, the band edges and,
    for boxes of 80 px and more (decoded at 1/2 scale for the 40 px output), the DCT-domain
    downscale."""
    batches = {}
    for region in (True, False):
        cfg = load(None, ["--data.dataset=imagefolder", f"--data.path={photos}",
                          "--data.backend=ffcv", "--data.train_res=40",
                          "--data.batch_size=16", "--data.num_workers=2",
                          f"--data.region_decode={str(region).lower()}"])
        loaders = _build(cfg, channels_last=False, seed=3, dtype=torch.uint8)
        batches[region] = _epoch(loaders.train, 1)
    assert len(batches[True]) == len(batches[False]) == 3
    for (xr, yr), (xw, yw) in zip(batches[True], batches[False]):
        assert torch.equal(yr, yw) and xr.shape == xw.shape == (16, 3, 40, 40)
        diff = (xr.float() - xw.float()).abs().mean()
        assert diff < 6, diff


def test_small_stored_images_warn_once(cifar):
    cfg = _cifar_cfg(cifar, "--data.train_res=64", "--data.val_res=16", "--data.val_resize=32")
    # stored at their own 32 px (the 512 px cap did not apply): no rewrite would help
    with pytest.warns(UserWarning, match=r"at most 32 px \(their original size\), smaller than "
                                         r"the 64 px training crop: .*lower data.train_res"):
        _build(cfg, seed=0)


def test_small_stored_images_with_progressive_resizing_name_max_res(cifar, monkeypatch):
    monkeypatch.setattr(ffcv_loader, "_warned", set())  # warned once per file and process
    cfg = _cifar_cfg(cifar, "--data.min_res=16", "--data.max_res=64", "--data.start_ramp=0",
                     "--data.end_ramp=2", "--data.val_res=16", "--data.val_resize=32")
    # data.train_res is not the largest crop here: lowering it would change nothing
    with pytest.warns(UserWarning, match=r"smaller than the 64 px training crop: every crop is "
                                         r"upsampled; lower data.max_res to avoid it"):
        _build(cfg, seed=0)


def test_small_images_shrunk_by_the_writer_suggest_a_larger_cap(cifar, tmp_path):
    data = DataConfig(dataset="cifar10", path=str(cifar), download=False)
    write_beton(data, tmp_path, write_mode="raw", max_resolution=16, num_workers=1)
    cfg = _cifar_cfg(cifar, f"--data.ffcv_dir={tmp_path}", "--data.train_res=24",
                     "--data.val_res=16", "--data.val_resize=16")
    with pytest.warns(UserWarning, match=r"at most 16 px \(written with --max-resolution=16\).*"
                                         r"rewrite with a larger --max-resolution"):
        _build(cfg, seed=0)


def _small_folder(root: Path, data_root: Path) -> Path:
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((data_root / "digits" / split / "3").iterdir())[:3]:
                (root / split / cls / f.name).write_bytes(f.read_bytes())
    return root


def test_a_split_that_fails_publishes_neither(tmp_path, data_root):
    root = _small_folder(tmp_path / "folder", data_root)
    data = DataConfig(dataset="imagefolder", path=str(root))
    write_beton(data, num_workers=1)
    before = {p.name: p.read_bytes() for p in (root / "ffcv").iterdir()}
    for f in (root / "val").rglob("*.jpg"):
        f.write_bytes(b"")
    (root / "train" / "a" / "extra.jpg").write_bytes((root / "train" / "b").iterdir()
                                                     .__next__().read_bytes())
    with pytest.raises(DatasetError, match="no readable image in the val split"):
        write_beton(data, num_workers=1)
    # train.beton is not replaced by a newer file whose val partner is missing
    assert {p.name: p.read_bytes() for p in (root / "ffcv").iterdir()} == before


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() if p.is_file() else None for p in folder.iterdir()}


def test_a_file_that_cannot_be_replaced_puts_back_the_ones_replaced(tmp_path, data_root,
                                                                    monkeypatch):
    """Publishing is all or nothing: an old val.beton that cannot be replaced (immutable) left
    train.beton and val.beton.json new beside it, a mismatched pair whose sidecar described
    another file, and the error named the temporary file."""
    root = _small_folder(tmp_path / "folder", data_root)
    data = DataConfig(dataset="imagefolder", path=str(root))
    write_beton(data, num_workers=1, max_resolution=32)
    before = _snapshot(root / "ffcv")
    replace = os.replace

    def immutable_val(src, dst):
        if Path(dst).name == "val.beton":
            raise PermissionError(1, "Operation not permitted", str(dst))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", immutable_val)
    with pytest.raises(DatasetError) as raised:
        write_beton(data, num_workers=1, max_resolution=16, overwrite=True)
    assert str(raised.value) == (f"{root / 'ffcv' / 'val.beton'}: cannot write it in place "
                                 f"(Operation not permitted); no file was replaced")
    assert _snapshot(root / "ffcv") == before  # no temporary or moved-aside file either
    # Ctrl-C (or SIGTERM) between two renames: put back too (train.beton was missing, its old
    # file hidden under a temporary name for good)
    calls = []

    def interrupted_third(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted_third)
    with pytest.raises(KeyboardInterrupt):
        write_beton(data, num_workers=1, max_resolution=16, overwrite=True)
    assert _snapshot(root / "ffcv") == before


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_writes_hidden_files_are_removed_or_put_back(tmp_path, data_root, capsys):
    """A write killed by SIGKILL (the OOM killer) left its hidden temporary file, as large as
    the data set, for good; each later write added one more. Now the next write removes them,
    and puts back an old file that the killed write had moved aside (a file system without
    hard links) and not yet replaced, so no published file is lost."""
    root = _small_folder(tmp_path / "folder", data_root)
    data = DataConfig(dataset="imagefolder", path=str(root))
    write_beton(data, num_workers=1, max_resolution=32)
    ffcv = root / "ffcv"
    published = _snapshot(ffcv)
    dead, alive = _dead_pid(), os.getpid()
    (ffcv / f".train.beton.tmp-{dead}-0123abcd").write_bytes(b"half a beton")
    (ffcv / f".train.beton.json.tmp-{dead}-0123abcd").write_text("{}")
    (ffcv / f".val.beton.tmp-{dead}-4567cdef.old").write_bytes(published["val.beton"])
    os.replace(ffcv / "val.beton.json", ffcv / f".val.beton.json.tmp-{dead}-4567cdef.old")
    mine = ffcv / f".train.beton.tmp-{alive}-89abcdef"  # a live writer's (another host's)
    mine.write_bytes(b"being written")
    unrelated = ffcv / ".train.beton.tmp-notes"
    unrelated.write_text("not a writer's name")
    capsys.readouterr()
    _clear_stale_temporaries(ffcv)
    err = capsys.readouterr().err.splitlines()
    assert _snapshot(ffcv) == {**published, mine.name: b"being written",
                               unrelated.name: b"not a writer's name"}
    assert len(err) == 4 and sum(line.startswith("removed ") for line in err) == 3, err
    assert f"val.beton.json: put back from .val.beton.json.tmp-{dead}-4567cdef" in "".join(err)
    # and a write does it first: before the settings check, which reads the put-back sidecar
    for split in ("train", "val"):
        os.replace(ffcv / f"{split}.beton.json", ffcv / f".{split}.beton.json.tmp-{dead}-"
                                                          f"4567cdef.old")
    (ffcv / f".val.beton.tmp-{dead}-0123abcd").write_bytes(b"half a beton")
    with pytest.raises(DatasetError, match="other settings"):
        write_beton(data, num_workers=1, max_resolution=16)
    assert _snapshot(ffcv) == {**published, mine.name: b"being written",
                               unrelated.name: b"not a writer's name"}


def test_a_folder_in_a_files_place_is_refused_before_anything_is_replaced(tmp_path, data_root):
    root = _small_folder(tmp_path / "folder", data_root)
    data = DataConfig(dataset="imagefolder", path=str(root))
    write_beton(data, num_workers=1, max_resolution=32)
    (root / "ffcv" / "val.beton").unlink()
    (root / "ffcv" / "val.beton" / "x").mkdir(parents=True)
    before = _snapshot(root / "ffcv")
    with pytest.raises(DatasetError, match=r"val.beton: is a folder, not a file; .*nothing was "
                                           r"replaced"):
        write_beton(data, num_workers=1, max_resolution=16, overwrite=True)
    assert _snapshot(root / "ffcv") == before


def _copy_pair(folder: Path, train_from: Path, val_from: Path) -> Path:
    folder.mkdir()
    for name, source in (("train.beton", train_from), ("val.beton", val_from)):
        for suffix in ("", ".json"):
            (folder / f"{name}{suffix}").write_bytes((source / f"{name}{suffix}").read_bytes())
    return folder


def test_a_mismatched_pair_of_files_is_refused(tmp_path, digits, cifar, data_root):
    mixed = _copy_pair(tmp_path / "mixed", cifar / "ffcv", digits / "ffcv")
    cfg = _cifar_cfg(cifar, f"--data.ffcv_dir={mixed}")
    with pytest.raises(DatasetError, match=r"val.beton: written from data.dataset=digits, but "
                                           r"the config has data.dataset=cifar10"):
        build_loaders(cfg.data, cfg.aug)
    # two image folders with other classes: the class lists differ
    other = _small_folder(tmp_path / "other", data_root)
    write_beton(DataConfig(dataset="imagefolder", path=str(other)), num_workers=1)
    pair = _copy_pair(tmp_path / "pair", other / "ffcv", digits / "ffcv")
    sidecar = json.loads((pair / "val.beton.json").read_text())
    sidecar["dataset"] = "imagefolder"  # as if the digits folder was written as an ImageFolder
    (pair / "val.beton.json").write_text(json.dumps(sidecar))
    cfg = load(None, ["--data.backend=ffcv", "--data.dataset=imagefolder",
                      f"--data.path={other}", f"--data.ffcv_dir={pair}"])
    with pytest.raises(DatasetError, match=r"were written from different data sets \(2 and 10 "
                                           r"classes"):
        build_loaders(cfg.data, cfg.aug)
    # files of another folder, given by data.ffcv_dir: trained its 10 classes silently
    elsewhere = _copy_pair(tmp_path / "elsewhere", digits / "ffcv", digits / "ffcv")
    for name in ("train.beton.json", "val.beton.json"):  # as if written as an ImageFolder
        sidecar = json.loads((elsewhere / name).read_text())
        (elsewhere / name).write_text(json.dumps({**sidecar, "dataset": "imagefolder"}))
    cfg = load(None, ["--data.backend=ffcv", "--data.dataset=imagefolder",
                      f"--data.path={other}", f"--data.ffcv_dir={elsewhere}"])
    with pytest.raises(DatasetError, match=rf"train.beton: written from 10 classes \(0, 1, 2, "
                                           rf"\.\.\.\), but {re.escape(str(other))}/train holds "
                                           rf"2 \(a, b, \.\.\.\): the files are of another"):
        build_loaders(cfg.data, cfg.aug)
    # the files without their images (copied to a training machine): nothing to compare with
    moved = _copy_pair(tmp_path / "moved", other / "ffcv", other / "ffcv")
    cfg = load(None, ["--data.backend=ffcv", "--data.dataset=imagefolder",
                      f"--data.path={tmp_path / 'gone'}", f"--data.ffcv_dir={moved}",
                      "--data.batch_size=2", "--data.val_batch_size=2"])
    assert build_loaders(cfg.data, cfg.aug).num_classes == 2


def test_runs_of_neighbouring_seeds_do_not_share_their_epoch_orders(cifar, monkeypatch):
    """FFCV orders epoch e by its seed + e: given train.seed as is, seed 1's epoch 0 was seed
    0's epoch 1 (multi-seed comparisons got correlated sample orders)."""
    seeds = []

    class Recorded(Exception):
        pass

    def loader(*args, seed, **kwargs):
        seeds.append(seed)
        raise Recorded

    monkeypatch.setattr(ffcv_loader._ffcv(), "Loader", loader)
    for seed in (0, 1, 0):
        with pytest.raises(Recorded):
            build_loaders(_cifar_cfg(cifar).data, _cifar_cfg(cifar).aug, seed=seed)
    assert seeds[0] == seeds[2] and abs(seeds[1] - seeds[0]) > 100
    assert all(0 <= s < 2**31 for s in seeds)


def test_pad_random_needs_images_stored_at_train_res(cifar):
    cfg = _cifar_cfg(cifar, "--aug.train_crop=pad_random", "--data.train_res=28")
    with pytest.raises(ConfigError, match=r"data.train_res=28 px; .* holds 32x32"):
        build_loaders(cfg.data, cfg.aug, seed=0)
    # images stored at train_res, progressive resizing on: the setting is named, not the file
    cfg = _cifar_cfg(cifar, "--aug.train_crop=pad_random", "--data.min_res=32",
                     "--data.max_res=64", "--data.end_ramp=2")
    with pytest.raises(ConfigError, match=r"no progressive resizing \(data.min_res=32; set it "
                                          r"to 0\)$"):
        build_loaders(cfg.data, cfg.aug, seed=0)


def test_missing_beton_names_the_file_and_the_command(tmp_path):
    cfg = load(None, ["--data.backend=ffcv", "--data.dataset=imagefolder",
                      f"--data.path={tmp_path}/imagenet"])
    with pytest.raises(DatasetError) as e:
        build_loaders(cfg.data, cfg.aug)
    assert str(e.value) == (f"{tmp_path}/imagenet/ffcv/train.beton: FFCV file not found; write "
                            f"it with: python tools/write_ffcv.py --dataset=imagefolder "
                            f"--path={tmp_path}/imagenet")


@pytest.mark.parametrize("keep", [20, 0.5])  # bytes of the header, or half the file
def test_truncated_beton_is_a_dataset_error(tmp_path, cifar, keep):
    folder = tmp_path / "ffcv"
    folder.mkdir()
    for split in ("train", "val"):
        data = (cifar / "ffcv" / f"{split}.beton").read_bytes()
        (folder / f"{split}.beton").write_bytes(data[:int(keep if keep > 1 else len(data) * keep)])
    cfg = _cifar_cfg(cifar, f"--data.ffcv_dir={folder}")
    with pytest.raises(DatasetError, match="train.beton: (not a readable|truncated) FFCV file.*"
                                           "rewrite it with: python tools/write_ffcv.py"):
        build_loaders(cfg.data, cfg.aug)


def _corrupt_header(path: Path, field: str, value: int) -> None:
    header = np.memmap(path, dtype=ffcv.types.HeaderType, mode="r+", shape=(1,))
    header[field] = value
    header.flush()


def _corrupt_image(path: Path, sample: int, **values: int) -> None:
    reader = ffcv.reader.Reader(str(path))
    offset = ffcv.types.HeaderType.itemsize + reader.field_descriptors.nbytes
    metadata = np.memmap(path, dtype=reader.metadata_type, mode="r+", offset=offset,
                         shape=(reader.num_samples,))
    image = metadata[f"f{reader.field_names.index('image')}"]
    for name, value in values.items():
        image[name][sample] = value
    metadata.flush()


@pytest.mark.parametrize("corrupt,sidecar,message", [
    # FFCV's memory manager raised OverflowError
    (lambda p: _corrupt_header(p, "page_size", 0), True,
     r"not a readable FFCV file \(page_size 0 is not a power of two\)"),
    # FFCV allocated ~22 GiB for the metadata
    (lambda p: _corrupt_header(p, "num_samples", 10 ** 9), True,
     r"not a readable FFCV file \(num_samples 1000000000: their metadata do not fit in its "
     r"\d+ bytes\)"),
    # numpy raised OverflowError seeking there
    (lambda p: _corrupt_header(p, "alloc_table_ptr", 2 ** 63), True,
     r"not a readable FFCV file \(alloc_table_ptr 9223372036854775808 is outside its data"),
    # FFCV allocated 65535 x 65535 x 3 bytes per image of a batch at the first epoch; the
    # sidecar says how large the writer let images be, else a raw image must fit in a page
    (lambda p: _corrupt_image(p, 7, height=65535, width=65535), True,
     r"corrupt FFCV file \(sample 7 \(65535x65535 px\) is larger than the 512 px it was "
     r"written with"),
    (lambda p: _corrupt_image(p, 7, height=65535, width=65535), False,
     r"corrupt FFCV file \(sample 7 \(65535x65535 px\) has more raw pixels than its "
     r"\d+-byte page holds\)"),
    (lambda p: _corrupt_image(p, 7, height=0), True,
     r"corrupt FFCV file \(sample 7 \(0x32 px\) is stored as an empty image\)"),
    # FFCV would read the image there, or copy it as raw pixels (mode 1) or decode it (0)
    (lambda p: _corrupt_image(p, 7, data_ptr=2 ** 62), True,
     r"corrupt FFCV file \(sample 7 \(32x32 px\) points past the image data\)"),
    (lambda p: _corrupt_image(p, 7, mode=9), True,
     r"corrupt FFCV file \(sample 7 \(32x32 px\) has an unknown storage mode\)"),
])
def test_a_corrupt_header_or_image_size_is_one_line_not_a_huge_allocation(tmp_path, cifar,
                                                                           corrupt, sidecar,
                                                                           message):
    """Numbers FFCV allocates or seeks by are checked against the file's size and the sidecar
    when the file is opened: they gave tracebacks (OverflowError, MemoryError) or, for image
    sizes, a 257 GB allocation at the first epoch."""
    folder = _copy_pair(tmp_path / "ffcv", cifar / "ffcv", cifar / "ffcv")
    if not sidecar:
        (folder / "train.beton.json").unlink()
    corrupt(folder / "train.beton")
    cfg = _cifar_cfg(cifar, f"--data.ffcv_dir={folder}")
    with pytest.raises(DatasetError, match=rf"^{folder / 'train.beton'}: {message}.*; rewrite "
                                           rf"it with: python tools/write_ffcv.py"):
        build_loaders(cfg.data, cfg.aug)


@pytest.mark.parametrize("text, shown", [("{not json", "unreadable sidecar (Expecting"),
                                         ("[]", "unreadable sidecar (not a JSON object but "
                                                "list [])"),
                                         ("7", "unreadable sidecar (not a JSON object but int 7)")])
def test_a_sidecar_that_is_not_a_json_object_is_one_line(tmp_path, cifar, text, shown):
    """Valid JSON that is not an object (`[]`) was an AttributeError traceback."""
    folder = _copy_pair(tmp_path / "ffcv", cifar / "ffcv", cifar / "ffcv")
    (folder / "train.beton.json").write_text(text)
    cfg = _cifar_cfg(cifar, f"--data.ffcv_dir={folder}")
    with pytest.raises(DatasetError) as e:
        build_loaders(cfg.data, cfg.aug)
    assert str(e.value).startswith(f"{folder / 'train.beton.json'}: {shown}"), str(e.value)
    assert "; rewrite it with: python tools/write_ffcv.py" in str(e.value)
    assert "\n" not in str(e.value)


def test_quasi_random_with_two_ranks_is_a_config_error(cifar):
    cfg = _cifar_cfg(cifar, "--data.ffcv_order=quasi_random")
    with pytest.raises(ConfigError, match="quasi_random does not work with 2 ranks"):
        build_loaders(cfg.data, cfg.aug, rank=0, world_size=2)


def test_missing_ffcv_is_a_run_error(monkeypatch, cifar):
    cfg = _cifar_cfg(cifar)
    monkeypatch.setitem(sys.modules, "ffcv", None)  # `import ffcv` now raises ImportError
    ffcv_loader._ffcv.cache_clear()
    try:
        with pytest.raises(RunError) as e:
            build_loaders(cfg.data, cfg.aug)
    finally:
        ffcv_loader._ffcv.cache_clear()
    assert str(e.value) == ("data.backend=ffcv needs FFCV: pip install --no-build-isolation "
                            "-e .[ffcv] (and Debian libopencv-dev libturbojpeg0-dev pkg-config)")


# ------------------------------------------------------------------------------- distributed

def _ddp_rank(rank: int, store: str, root: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=2)
    try:
        cfg = _cifar_cfg(Path(root), "--data.val_batch_size=16", "--data.num_workers=1")
        loaders = build_loaders(cfg.data, cfg.aug, rank=rank, world_size=2, seed=5,
                                channels_last=True)
        result = {"len": len(loaders.train), "val_sizes": [], "val_ids": []}
        for epoch in (0, 1):
            result[epoch] = [int(i) for images, _ in _epoch(loaders.train, epoch)
                             for i in _pixels(images)[:, 2, 16, 16]]
        for images, labels in loaders.val:
            result["val_sizes"].append(len(labels))
            result["val_ids"] += _pixels(images)[:, 2, 16, 16].tolist()
        torch.save(result, out)
    finally:
        torch.distributed.destroy_process_group()


def _ddp_rank_main(rank: int, store: str, root: str, outs: list[str]) -> None:
    _ddp_rank(rank, store, root, outs[rank])


@pytest.mark.slow
def test_two_ranks_split_training_and_see_each_validation_image_once(cifar, tmp_path):
    """Two gloo processes: equal training lengths, disjoint training shards covering the set
    and reshuffled each epoch; validation sees every image exactly once across the ranks.

    Spawned, not forked: after earlier tests have started torch's OpenMP pool and numba's
    threads in this process, a forked child deadlocks in its first parallel op."""
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.multiprocessing.spawn(_ddp_rank_main, args=(str(tmp_path / "store"), str(cifar), outs),
                                nprocs=2)
    r0, r1 = (torch.load(o) for o in outs)
    assert r0["len"] == r1["len"] == CIFAR_TRAIN // 40  # 100 samples per rank, 20 per batch
    for epoch in (0, 1):
        assert sorted(r0[epoch] + r1[epoch]) == list(range(CIFAR_TRAIN))
    assert r0[0] != r0[1]
    assert r0["val_sizes"] == r1["val_sizes"] == [8, 8, 4]  # 20 each, batch 16 / 2 ranks
    assert sorted(r0["val_ids"] + r1["val_ids"]) == list(range(CIFAR_TRAIN,
                                                               CIFAR_TRAIN + CIFAR_VAL))


# -------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_train_in_a_process_leaves_no_ffcv_file_open(digits, tmp_path):
    """A notebook's train(ffcv) kept both .beton files open (descriptors and memory maps, in
    FFCV's reference cycles) until Python happened to collect them."""
    import shutil

    from fasttrain.engine import train

    files = tmp_path / "ffcv"
    shutil.copytree(digits / "ffcv", files)  # the module's fixtures keep their own open

    def open_here():
        held = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                held.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                continue
        held += [line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()]
        return sorted({h for h in held if h.startswith(str(files))})

    cfg = load(QUICKSTART, [f"--data.path={digits}", "--data.backend=ffcv",
                            f"--data.ffcv_dir={files}", "--schedule.epochs=1",
                            "--schedule.warmup_epochs=0", "--train.max_steps=2",
                            f"--log.dir={tmp_path}", "--log.progress=plain"])
    train(cfg)
    assert open_here() == []


def test_quickstart_trains_with_ffcv(digits, run_tool, tmp_path):
    """tools/train.py on the files the write tool put in the default folder (data.path empty:
    $FASTTRAIN_DATA/digits/ffcv)."""
    result = run_tool("train.py", str(QUICKSTART), "--data.backend=ffcv",
                      "--schedule.epochs=1", "--schedule.warmup_epochs=0",
                      "--train.max_steps=4", f"--log.dir={tmp_path}", "--log.name=ffcv",
                      extra_env={"FASTTRAIN_DATA": str(digits.parent)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backend: ffcv" in (tmp_path / "ffcv" / "config.yaml").read_text()
    (metrics,) = [json.loads(line) for line in
                  (tmp_path / "ffcv" / "metrics.jsonl").read_text().splitlines()]
    assert metrics["train_images"] == 4 * 64 and metrics["step"] == 4
    assert math.isfinite(metrics["train_loss"]) and 0 <= metrics["val_top1"] <= 100
    assert metrics["skipped_files"] == 0
