"""Checkpoints: unwrapped model state, atomic writes, safe loads."""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import stat
import sys
import warnings
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import torch
from torch import nn

from ..errors import CheckpointError


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def write_atomic(path: Path, write: Callable[[IO], None], mode: str = "wb") -> None:
    """Call `write(f)` on a temporary file next to `path`, fsync it and rename it to `path`, then
    fsync the folder: a crash or a failed write (disk full, interrupted) at any point leaves
    either the old file or the new one, never a torn file, and no temporary file. A file
    replaced keeps its permissions (a private 0600 file became the umask's 0644)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            # the file's own mode: a symbolic link is replaced, not its target (the tools refuse
            # one; /dev/null's 0666 made a world-writable file)
            if not path.is_symlink():
                os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            pass
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only folder: unlink fails too (EROFS); the first error counts
            pass
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename or link in it survives a power loss."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def lock_folder(folder: Path, *, wait: bool) -> int | None:
    """Take an exclusive flock on `folder` itself (no lock file to leave behind; the kernel
    drops it when the descriptor is closed or the process ends, kill -9 included) and return
    the descriptor, whose closing releases it; None where the folder cannot be opened or its
    file system has no flock (unprotected: the writes that follow say what is wrong).

    Raises:
        BlockingIOError: `wait` is False and another process holds the lock.
    """
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def folder_locked(directory: Path) -> Iterator[None]:
    """`lock_folder` on `directory` (created if missing) for the block: read-modify-write of a
    file shared by processes (a results record, a points CSV) one process at a time. Waits for
    the lock, saying so on stderr once when another process holds it (a training holds its run
    folder's until it ends)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:  # the writes in the block say what is wrong
        fd = None
    else:
        try:
            fd = lock_folder(directory, wait=False)
        except BlockingIOError:
            print(f"waiting for another process writing in {directory} ...", file=sys.stderr,
                  flush=True)
            fd = lock_folder(directory, wait=True)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` (folders created) with `write_atomic`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Serialised in memory, written by Python: torch's zip writer turns the OSError of a full
    # disk into "RuntimeError: [enforce fail at inline_container.cc] unexpected pos" when the
    # first record fails, which no caller recognises as a write failure.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, lambda f: f.write(buffer.getbuffer()))


TORCHSCRIPT_NOT_CHECKPOINT = ("a TorchScript archive (an exported model?), not a fasttrain "
                              "checkpoint")


EXPORT_NOT_CHECKPOINT = ("a torch.export program (an exported model?), not a fasttrain "
                         "checkpoint")


def zip_names(path: str | Path) -> list[str]:
    """The member names of a zip file (torch.save, TorchScript and torch.export files are zips);
    empty for anything else or an unreadable file."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return []


def _is_torch_export_archive(path: Path) -> bool:
    """A torch.export .pt2 package (a zip holding `<name>/models/` or `<name>/archive_format`)."""
    return any("/models/" in n or n.endswith("/archive_format") for n in zip_names(path))


def damaged_zip(path: Path) -> str | None:
    """Why `path` cannot be read when it starts like a zip archive (what torch.save,
    TorchScript and torch.export write) but the archive's directory at its end cannot be read:
    most often a copy or download cut short, for which torch says "[Errno 22] Invalid argument"
    or "failed finding central directory" depending on where the cut fell. None otherwise."""
    import zipfile

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return None
        with zipfile.ZipFile(path):
            return None
    except zipfile.BadZipFile:
        size = Path(path).stat().st_size
        # which of torch's formats cannot be told from the start of a file cut short
        return (f"truncated or damaged: a zip archive (as torch writes checkpoints and exports) "
                f"whose directory at the end is missing; {size:,} bytes")
    except OSError:
        return None


def load(path: Path, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`: tensors and plain containers only, so a file
    crafted to run code on unpickling is refused. `mmap`: tensors map the file instead of being
    read (for a look at the other entries)."""
    try:
        with warnings.catch_warnings():
            # torch's notes on TorchScript archives and legacy pickles: the one-line errors
            # below say what matters
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            warnings.filterwarnings("ignore", message=".*Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... here
        if isinstance(e, (EOFError, KeyError)):
            # torch's legacy-format reader: EOFError for an empty file, KeyError(<a number>)
            # for bytes that are no pickle at all; neither message means anything to a user.
            raise CheckpointError(f"{path}: cannot load checkpoint (empty, truncated or not "
                                  f"written by torch.save)") from None
        damage = damaged_zip(path)
        if damage:
            raise CheckpointError(f"{path}: cannot load checkpoint ({damage}; copy it again or "
                                  f"use another checkpoint)") from None
        lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
        reason = lines[0]
        if "TorchScript archives" in reason:  # torch's advice (weights_only=False) is wrong here
            raise CheckpointError(f"{path}: {TORCHSCRIPT_NOT_CHECKPOINT}") from None
        if _is_torch_export_archive(path):  # torch's "internal miniz error ... corrupted"
            raise CheckpointError(f"{path}: {EXPORT_NOT_CHECKPOINT}") from None
        if reason.startswith("Weights only load failed"):
            # torch's weights-only refusal: a paragraph of advice around the real reason (the
            # offending global, or the opcode of bytes that are no pickle), which may follow
            # a "... WeightsUnpickler error:" prefix on its own line or the same one.
            marker = "WeightsUnpickler error:"
            at = next((i for i, l in enumerate(lines) if marker in l), None)
            details = (lines[1:] if at is None else
                       [lines[at].rpartition(marker)[2].strip(), *lines[at + 1:]])
            details = [d for d in details
                       if d and not d.startswith("Check the documentation of torch.load")]
            # its allow-listing advice ("Please use torch.serialization.add_safe_globals")
            # is for code calling torch.load, not for a user of the tools
            detail = details[0].split(" Please use ")[0] if details else ""
            reason = f"refused by weights-only loading: {detail}" if detail else reason
            if detail.startswith("Unsupported operand"):
                # the first byte is no pickle opcode: another format, not a refused pickle
                onnx = Path(path).suffix.lower() == ".onnx"
                raise CheckpointError(
                    f"{path}: not a checkpoint ("
                    + ("an ONNX file: tools/evaluate.py and tools/benchmark.py take exported "
                       "files with --file" if onnx else
                       "not written by torch.save: another format, or damaged")
                    + f"; {detail})") from None
            named = re.search(r"GLOBAL ([\w.]+)", detail)
            if named and named[1].rpartition(".")[2][:1].isupper():
                # a class: most often a whole model pickled with torch.save(model) (a function
                # such as os.system is no model, and no hint to load the file is given then)
                reason += ("; if it is a model you saved whole with torch.save(model), "
                           "tools/evaluate.py and tools/benchmark.py take it through "
                           "--factory, a function of yours that loads it")
        raise CheckpointError(f"{path}: cannot load checkpoint ({reason})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a fasttrain checkpoint (no 'model' entry)")
    if isinstance(state["model"], dict):
        state["model"] = strip_wrapper_prefixes(state["model"])
    return state


# What exports, and the checkpoints of a network fine-tuned from a pruned one (`pruned_from`),
# keep of a pruned checkpoint's `pruning` record (the bisection trace and dates stay in it).
# `source_width` is the thin network's at the root of the lineage (a pruned network keeps its
# source's width); `source_channels` and `source_pruning` are set when the source was itself
# pruned (then fine-tuned), `source_pruning` holding that pruning's summary in turn.
PRUNING_SUMMARY = ("source", "source_epoch", "source_step", "source_weights", "source_val_top1",
                   "source_model", "source_width", "source_channels", "source_pruning",
                   "source_macs", "source_params", "macs", "params", "ratio", "importance",
                   "scope", "torch_pruning")

WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def strip_wrapper_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state dict saved from a torch.compile (`_orig_mod.`) or DDP (`module.`) wrapper, with
    the plain module's keys (what fasttrain saves); any other dict is returned as it is."""
    while state_dict and all(isinstance(k, str) for k in state_dict):
        prefix = next((p for p in WRAPPER_PREFIXES
                       if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            break
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def link_or_copy_atomic(src: Path, dst: Path) -> None:
    """Make `dst` a snapshot of `src`: a hard link (no copy; `src` is later replaced by rename,
    so the link keeps this version), or a copy where links are not supported; swapped in
    atomically either way."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here: a copy, on disk before it replaces dst
        copy_atomic(src, dst)
        return
    os.replace(tmp, dst)
    fsync_folder(dst.parent)


def copy_atomic(src: Path, dst: Path) -> None:
    """Make `dst` a copy of `src`, on disk before it replaces `dst` atomically."""
    with open(src, "rb") as source:
        write_atomic(dst, lambda f: shutil.copyfileobj(source, f))
