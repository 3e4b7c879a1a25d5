"""Training: `train(cfg, ...)` builds data, model and optimizer from a Config and runs the
epochs, validating, logging and checkpointing after each one."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import config as config_mod
from ..cli import same_file
from ..config import Config, ModelConfig
from ..errors import (CheckpointError, ConfigError, DatasetError, RunError, ShardError,
                      TrainingError, UnsharedCheckpointError, UserError, first_problem,
                      one_line)
from ..data import build_loaders, sample_seed
from ..data.transforms import progressive_resolution
from ..data.datasets import broken_links, loose_images
from ..data.loader import DeviceLoader
from ..measure import count_macs, count_params, git_commit
from ..measure.env import usable_cores
from ..models import NORM_ACT_LAYERS, convert_sync_batchnorm, create_model, list_models
from . import checkpoint as ckpt
from . import distributed
from . import rundir as rundir_mod
from .ema import ModelEma, adjusted_decay
from .mix import BatchMixer, classification_loss
from .optim import build_optimizer
from .precision import Precision, resolve_precision
from .progress import Reporter
from .rundir import (BEST, CHECKPOINTS, LAST, check_log_dir, check_name_usable, checkpoint_file,
                     discard_unused_run_dir, find_resume, lock_run_dir, new_run_dir,
                     release_run_dirs, run_dir_of)
from .schedule import build_scheduler, warmup_steps

MODEL_IDENTITY = ("name", "width", "channel_divisor", "num_classes", "shortcut", "channels")
"""ModelConfig keys that fix the architecture: a checkpoint must agree on all of them, and
`model.init_from` copies them from its checkpoint."""


def json_line(record: dict[str, Any]) -> str:
    """`record` as one line of strict JSON: a non-finite number (a diverged validation loss) is
    null, since JSON has no NaN or Infinity and strict parsers (JavaScript's JSON.parse, most
    non-Python readers) refuse the NaN Python writes by default."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                       for k, v in record.items()}, allow_nan=False)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The model a ModelConfig describes, with `num_classes` outputs."""
    if cfg.name not in list_models():
        import difflib
        close = difflib.get_close_matches(cfg.name, list_models(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"model.name {cfg.name!r} is not a registered model{hint}; "
                          f"registered: {', '.join(list_models())}")
    kwargs: dict[str, Any] = dict(width=cfg.width, channel_divisor=cfg.channel_divisor,
                                  num_classes=num_classes,
                                  zero_init_residual=cfg.zero_init_residual,
                                  norm_act_layer=NORM_ACT_LAYERS[cfg.norm_act],
                                  drop_path_rate=cfg.drop_path_rate, blurpool=cfg.blurpool)
    if cfg.name.startswith("cifar_"):
        kwargs["shortcut"] = cfg.shortcut
    if cfg.channels is not None:
        kwargs["channels"] = cfg.channels
    try:
        return create_model(cfg.name, **kwargs)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def apply_init_from(cfg: ModelConfig, notes: list[str] | None = None,
                    lineage: dict[str, Any] | None = None) -> dict[str, torch.Tensor] | None:
    """`model.init_from`: copy the checkpoint's architecture keys (`MODEL_IDENTITY`) into `cfg`
    (in place; `init_from` made absolute) and return its weights; None when `init_from` is
    empty. `notes` gets a line naming the config's architecture values the checkpoint's replace
    (an override such as `--model.width=0.5` would otherwise be dropped without a word), and a
    line for each option that changes what the network computes but not its weights' shapes
    and that differs from the checkpoint's training (`model.blurpool`: its filters were part of
    what the weights learned), which nothing else would mention.
    `lineage` gets the summary of the pruning the weights came from (`PRUNING_SUMMARY` and
    `fine_tuned_from`, the pruned file), when `init_from` was written by tools/prune.py or
    trained on from such a file, so that the run's checkpoints and exports still say so.

    Raises:
        CheckpointError: unreadable file (loaded with weights_only=True) or no model config.
    """
    if not cfg.init_from:
        return None
    path = Path(cfg.init_from).expanduser()
    saved = ckpt.load(path)
    saved_model = (saved.get("config") or {}).get("model")
    if not isinstance(saved_model, dict) or not saved_model.get("num_classes"):
        raise CheckpointError(f"model.init_from={cfg.init_from}: checkpoint has no model config "
                              f"with num_classes ('config'['model'])")
    replaced = []  # the config's own values the checkpoint's replace (given, or the recipe's)
    for key in MODEL_IDENTITY:
        if key in saved_model:
            # num_classes 0 is "the data set's", no value of the config's own
            if saved_model[key] != getattr(cfg, key) and (key, getattr(cfg, key)) != \
                    ("num_classes", 0):
                replaced.append(f"model.{key} {_yaml_text(saved_model[key])} (the config "
                                f"had {_yaml_text(getattr(cfg, key))})" if key != "channels"
                                else "model.channels (the checkpoint's pruned widths)")
            setattr(cfg, key, saved_model[key])
    if saved_model.get("channels") is not None:  # a bad spec named the file it came from
        config_mod._check_channels(cfg, f"model.init_from={cfg.init_from}")
    if notes is not None and replaced:
        notes.append(f"note: model.init_from={cfg.init_from} sets the architecture: "
                     f"{', '.join(replaced)}")
    if notes is not None and saved_model.get("blurpool", cfg.blurpool) != cfg.blurpool:
        notes.append(f"note: model.init_from={cfg.init_from} was trained with model.blurpool="
                     f"{str(saved_model['blurpool']).lower()}, this run has "
                     f"{str(cfg.blurpool).lower()}")
    # Absolute in the run's config.yaml: tools/compare.py reads the pruning record through it
    # from wherever it runs.
    cfg.init_from = str(path.resolve())
    if lineage is not None:
        pruning, earlier = saved.get("pruning"), saved.get("pruned_from")
        if isinstance(pruning, dict):
            lineage.update({k: pruning[k] for k in ckpt.PRUNING_SUMMARY if k in pruning},
                           fine_tuned_from=cfg.init_from)
        elif isinstance(earlier, dict):  # fine-tuned again: the pruning is still the origin
            lineage.update(earlier)
    return saved["model"]


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Number of top-1 and top-5 hits (top-k capped at the class count), as device tensors.
    An image whose logits are not all finite is a miss: topk ranks NaN first, so a diverged
    network's NaN logits "predicted" arbitrary classes (~10 % top-1 on 10 classes)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (N, k)
    hits = (top == labels[:, None]) & logits.isfinite().all(dim=1, keepdim=True)
    return hits[:, 0].sum(), hits.any(dim=1).sum()


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    best_val_top1: float = -1.0
    train_time_s: float = 0.0  # cumulative training + validation wall time
    history: list[dict[str, Any]] = field(default_factory=list)
    # Progress inside the current epoch, for a resume from a step checkpoint (global sums).
    epoch_step: int = 0
    epoch_loss_sum: float = 0.0
    epoch_images: int = 0
    epoch_elapsed_s: float = 0.0
    epoch_world_size: int = 0  # ranks whose losses epoch_loss_sum adds up (0: unknown)


@dataclass
class Parts:
    """What one training run is made of; built once by `_train`."""
    cfg: Config
    model: nn.Module  # the plain module (checkpoints, EMA source)
    train_model: nn.Module  # DDP and/or compiled wrapper of `model`
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    precision: Precision
    mixer: BatchMixer
    ema: ModelEma | None
    device: torch.device
    steps_per_epoch: int  # optimizer steps
    graph_steps: bool = False  # train_model replays CUDA graphs (compile_mode reduce-overhead)
    classes: list[str] = field(default_factory=list)  # the data set's, in label order
    pruned_from: dict[str, Any] = field(default_factory=dict)  # apply_init_from's lineage


@functools.cache  # one git call per run (train() clears it), not one per checkpoint
def _versions() -> dict[str, str]:
    return {"torch": str(torch.__version__), "cuda": str(torch.version.cuda),
            "python": platform.python_version(), "commit": git_commit()}


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        # one state per device the saving process saw: a host showing fewer devices takes
        # the first ones (set_rng_state_all indexed past its generators)
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def _rank_rng(seed: int, rank: int, world_size: int, saved: dict[str, Any] | None,
              step: int) -> None:
    """Give this rank its own global RNG stream, which stochastic depth and dropout draw from:
    with one seed on every rank, every rank dropped the same blocks for its i-th sample. Rank 0
    keeps the single-process stream. A resume restores each rank's saved state (`rng_ranks`);
    from a checkpoint of another number of ranks, rank 0 takes the saved stream and the others
    start fresh ones (seeded by the step)."""
    fresh = sample_seed(seed, step, rank, repeat=-1000)  # a tag no data draw uses
    if saved is not None:
        ranks = saved.get("rng_ranks")
        if isinstance(ranks, list) and len(ranks) == world_size:
            _set_rng_state(ranks[rank])
            if rank > 0 and "cuda" not in ranks[rank] and torch.cuda.is_available():
                torch.cuda.manual_seed_all(fresh)  # saved by CPU ranks: no CUDA stream kept
            return
        _set_rng_state(saved["rng"])
    if rank > 0:
        torch.manual_seed(fresh)
        random.seed(fresh)


def _all_rng_states(dist: distributed.DistInfo) -> list[dict[str, Any]] | None:
    """Every rank's RNG state for a checkpoint (a collective: called on every rank)."""
    return distributed.all_gather_object(_rng_state()) if dist.enabled else None


RESUME_FIXED = (("optim", ("name", "lr", "lr_reference_batch", "momentum", "nesterov", "betas",
                            "eps", "weight_decay", "decay_norm_and_bias")),
                ("data", ("batch_size",)), ("train", ("grad_accum_steps",)))
"""Settings a resumed run cannot change: the optimizer's state carries them (its learning rate,
hyper-parameters and parameter groups are loaded from the checkpoint, so an override would be
recorded in config.yaml but silently not used), and the position inside an epoch is counted in
batches of this size."""


def _check_compatible(saved: dict[str, Any], cfg: Config, path: Path) -> None:
    if "optimizer" not in saved or "train_state" not in saved:
        raise CheckpointError(f"{path}: not a training checkpoint (no optimizer state); start "
                              f"from its weights with --model.init_from={path} instead")
    saved_cfg = saved.get("config") or {}
    saved_model = saved_cfg.get("model", {})
    for key in MODEL_IDENTITY:
        have, want = saved_model.get(key), getattr(cfg.model, key)
        if have != want:
            # A run fine-tuned from another checkpoint took its architecture from there: the
            # same --model.init_from gives it again (the recipe alone describes another model).
            hint = (f"; the run was started with --model.init_from={saved_model['init_from']}"
                    if saved_model.get("init_from") and not cfg.model.init_from else "")
            raise CheckpointError(f"{path}: checkpoint has model.{key}={have!r} but the "
                                  f"config has {want!r}{hint}")
    saved_seed = (saved_cfg.get("train") or {}).get("seed")
    if ((saved.get("train_state") or {}).get("epoch_step") and saved_seed is not None
            and saved_seed != cfg.train.seed):
        raise CheckpointError(f"{path}: checkpoint is inside an epoch trained with "
                              f"train.seed={saved_seed!r} but the config has {cfg.train.seed!r}; "
                              f"the rest of that epoch's sample order follows the seed")
    ts = saved.get("train_state") or {}
    if ts.get("epoch_step"):
        _check_same_order(saved_cfg.get("data") or {}, cfg, path, ts.get("epoch", 0) + 1)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if (cfg.data.backend == "ffcv" and ts.get("epoch_step")
            and ts.get("epoch_world_size") not in (None, 0, world)):
        # FFCV's order is a numpy permutation on one rank and torch's padded DistributedSampler
        # on several: skipping the batches done on another count would repeat and miss samples.
        raise CheckpointError(f"{path}: checkpoint is inside epoch {ts.get('epoch', 0) + 1} "
                              f"trained on {ts['epoch_world_size']} rank(s); data.backend=ffcv "
                              f"can continue it only on {ts['epoch_world_size']} rank(s), or "
                              f"resume from a checkpoint at an epoch boundary")
    for section, keys in RESUME_FIXED:
        saved_section = saved_cfg.get(section) or {}
        for key in keys:
            if key not in saved_section:  # written before the key existed
                continue
            have, want = saved_section[key], getattr(getattr(cfg, section), key)
            if have != want:
                raise CheckpointError(
                    f"{path}: checkpoint was trained with {section}.{key}={have!r} but the "
                    f"config has {want!r}; a resumed run keeps its optimizer state and batch "
                    f"size (start a new run from its weights with --model.init_from={path})")


ORDER_DEFAULTS = {"backend": "torch", "ffcv_order": "random", "ra_reps": 1}
"""The data keys that decide an epoch's sample order besides the seed, with the value a
checkpoint written before a key existed had."""


def _order(keys: dict[str, Any]) -> tuple[Any, ...]:
    """An epoch's sample order besides the seed, from the `ORDER_DEFAULTS` keys: FFCV orders
    its samples itself (by `ffcv_order`); torch, resident and dali follow the torch backend's
    permutation, which repeated augmentation (`ra_reps`) changes."""
    return ((("ffcv", keys["ffcv_order"]) if keys["backend"] == "ffcv" else ("torch",))
            + (keys["ra_reps"],))


def _check_same_order(saved_data: dict[str, Any], cfg: Config, path: Path, epoch: int) -> None:
    """Refuse to continue an epoch cut by the checkpoint in another sample order: the batches
    already trained are skipped by count, so another order trained 306 of digits' 1,408
    images twice and never saw 306 others (resident to ffcv), with nothing said.

    Raises:
        CheckpointError: naming the settings that order the epoch differently.
    """
    was = {k: saved_data.get(k, default) for k, default in ORDER_DEFAULTS.items()}
    now = {k: getattr(cfg.data, k) for k in ORDER_DEFAULTS}
    if not saved_data or _order(was) == _order(now):
        return
    keys = [k for k in ORDER_DEFAULTS if was[k] != now[k]]
    raise CheckpointError(f"{path}: checkpoint is inside epoch {epoch}, trained with "
                          f"{', '.join(f'data.{k}={was[k]}' for k in keys)}, which order that "
                          f"epoch's samples differently from "
                          f"{', '.join(f'data.{k}={now[k]}' for k in keys)}; continue it with "
                          f"the checkpoint's settings, or resume from a checkpoint at an epoch "
                          f"boundary")


def resume_changes(saved_cfg: dict[str, Any], cfg: Config) -> list[str]:
    """The settings (outside `log`) in which `cfg` differs from a checkpoint's `saved_cfg`,
    as "section.key old -> new"; a key the checkpoint's version did not have says so (its
    default now may not be what that version did, e.g. data.ffcv_resize before it existed)."""
    changes = []
    for section, values in cfg.to_dict().items():
        if section == "log":
            continue
        saved_section = saved_cfg.get(section) or {}
        for key, value in values.items():
            if key not in saved_section:
                changes.append(f"{section}.{key} (not recorded: set before the key existed) "
                               f"-> {value!r}")
            elif saved_section[key] != value:
                changes.append(f"{section}.{key} {saved_section[key]!r} -> {value!r}")
    return changes


def _on_main(dist: distributed.DistInfo, fn):
    """`fn()` on rank 0 only, its result on every rank; a user error raised there is raised on
    every rank (so the others stop with the same one line instead of a broken collective)."""
    outcome: tuple[Any, UserError | None] = (None, None)
    if dist.is_main:
        try:
            outcome = (fn(), None)
        except UserError as e:
            outcome = (None, e)
    result, error = distributed.broadcast_object(outcome)
    if error is not None:
        raise error
    return result


def _recompile_limit(cfg: Config) -> int:
    """Compiled graphs one run needs: each training resolution of progressive resizing is a new
    input shape, compiled anew (torch does not make H and W dynamic for it), plus validation
    (another grad mode, its own resolution) and a smaller last batch. Past torch's
    recompile_limit (8) the model silently runs eager."""
    sizes = {progressive_resolution(cfg.data, epoch) for epoch in range(cfg.schedule.epochs)}
    return len(sizes) + 4


def _restart_resume(resume: str | None, log_dir: Path, name: str) -> str | None:
    """What a torchelastic restart resumes: the run the first attempt was training.

    Where torchrun's agent store holds the run folder an earlier attempt claimed
    (`distributed.remembered_run_dir`), that folder: its last checkpoint, or, when it has none
    yet, what the first attempt started from (a `--resume PATH`, else nothing: fresh), the
    folder, holding no more than its config, removed first.

    Otherwise, from the arguments alone: without `--resume` or with `auto`, `auto` (the newest
    run of the recipe, which another job's may be). An explicit checkpoint of a run folder (its
    best.pt, an older copy) is that run's last.pt, which the first attempt has moved on since;
    a loose file continued into `log.dir/log.name` is that folder's last.pt once it has one.
    Otherwise (a loose file and no name, or no checkpoint written yet) the same file again."""
    pinned = distributed.remembered_run_dir()
    if pinned is not None:
        if (Path(pinned) / CHECKPOINTS / LAST).is_file():
            return pinned
        discard_unused_run_dir(Path(pinned))  # a SIGKILL before the first checkpoint left it
        if resume and resume != "auto":
            return resume
        # `auto` found nothing to continue then (it would have claimed that run's folder), and
        # must not find another job's run now; a named run is its own folder, which `auto`
        # starts again (dropping the metrics of an epoch whose checkpoint was never written)
        return "auto" if name else None
    if not resume or resume == "auto":
        return "auto"
    run = run_dir_of(checkpoint_file(resume))
    for last in ([run / CHECKPOINTS / LAST] if run is not None else []) + (
            [log_dir / name / CHECKPOINTS / LAST] if name else []):
        if last.is_file():
            return str(last)
    return resume


def _visible_here(path: Path) -> bool:
    return Path(path).is_file()


def _cpu_compiler_problem() -> str | None:
    """Why Inductor cannot build CPU kernels here (no working C++ compiler), or None.

    Without this, the first training step fails after the data and the model are set up (and
    `--dry-run` passes) with a ~100-line Inductor traceback. Inductor's own compiler search is
    asked, so `CXX` and `torch._inductor.config.cpp.cxx` count as they will at compile time; it
    is private API, so anything unexpected from it leaves the decision to the compile itself."""
    try:
        from torch._inductor import cpp_builder
        from torch._inductor.exc import InvalidCxxCompiler
    except ImportError:
        return None
    try:
        cpp_builder.get_cpp_compiler()
    except InvalidCxxCompiler:
        from torch._inductor import config as inductor_config
        cxx = inductor_config.cpp.cxx
        tried = ", ".join(c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c)
        return (f"Inductor found no working C++ compiler (tried: {tried or 'none'}); install "
                f"g++ or set CXX, or train with --train.compile=false")
    except Exception:
        return None
    return None


def _graph_steps(cfg: Config, device: torch.device, use_compile: bool) -> bool:
    """Whether the compiled model replays CUDA graphs (torch.compile's CUDA-graph trees)."""
    return (use_compile and device.type == "cuda"
            and cfg.train.compile_mode in ("reduce-overhead", "max-autotune"))


def _note_hidden_class_folders(classes: list[str], root: Path, report: Reporter) -> None:
    """A note for hidden folders taken as classes (`.ipynb_checkpoints`, `.git`): torchvision's
    ImageFolder takes them, so they are kept (labels stay torchvision's), but one is rarely
    meant as a class and, sorted first, shifts every other class's label."""
    hidden = [name for name in classes if name.startswith(".")]
    if hidden:
        report.print(f"note: hidden folder{'s' * (len(hidden) > 1)} of {root} taken as "
                     f"class{'es' * (len(hidden) > 1)} (as torchvision's ImageFolder does): "
                     f"{', '.join(hidden)}; remove {'them' if len(hidden) > 1 else 'it'} if "
                     f"not meant as a class (tools/check_data.py lists them)")


def _note_unread_entries(root: Path, report: Reporter) -> None:
    """A note for images directly in `root`/train or `root`/val, outside every class folder: no
    loader reads them, so a half-sorted split trains or validates on fewer images than it
    holds, which the image counts alone do not show; and one for broken links there (torchvision
    skips them: a class folder linked from an unmounted drive is silently no class)."""
    for split in ("train", "val"):
        loose = loose_images(root / split)
        if loose:
            names = one_line(", ".join(Path(p).name for p in loose[:3]))
            report.print(f"note: {len(loose)} image{'s' * (len(loose) > 1)} directly in "
                         f"{root / split}, outside every class folder, not read: {names}"
                         f"{', ...' if len(loose) > 3 else ''} (move them into their class "
                         f"folders; tools/check_data.py lists them)")
        broken = broken_links(root / split)
        if broken:
            names = one_line(", ".join(f"{Path(p).name} -> {target}" for p, target in broken[:3]))
            report.print(f"note: {len(broken)} broken link{'s' * (len(broken) > 1)} in "
                         f"{root / split}, not read (a class folder on an unmounted drive is "
                         f"no class): {names}{', ...' if len(broken) > 3 else ''}")


def _note_settings_without_effect(cfg: Config, device: torch.device, use_compile: bool,
                                  report: Reporter) -> None:
    """Notes for settings that run but not as a user would expect: a compile mode without
    compilation or without CUDA graphs to replay, fp16 on the CPU (torch's fp16 convolution
    backward there is tens of times slower than fp32's), the keys of one policy, optimizer,
    schedule or crop set under another (or of a feature that is off)."""
    mode = cfg.train.compile_mode
    if mode != "default" and not use_compile:
        compile_ = "null" if cfg.train.compile is None else str(cfg.train.compile).lower()
        report.print(f"note: train.compile_mode={mode} has no effect: the model is not "
                     f"compiled (train.compile={compile_} on {device.type})")
    elif mode in ("reduce-overhead", "max-autotune") and device.type != "cuda":
        like = "default" if mode == "reduce-overhead" else "max-autotune-no-cudagraphs"
        report.print(f"note: train.compile_mode={mode} replays CUDA graphs on CUDA only: on "
                     f"{device.type} it compiles as {like}")
    if cfg.train.precision == "fp16" and device.type == "cpu":
        report.print("note: train.precision=fp16 on the CPU is correct but slow: torch's fp16 "
                     "convolution backward there took 40-90x fp32's time (measured on an "
                     "Intel Xeon); bf16 or fp32 train at full speed")
    # Keys of one mode set under another (or with the feature off): not refused (overriding an
    # RSB recipe's policy would then need its four randaug_* keys reset too), but said.
    # `--optim.name=lamb` on an SGD recipe keeps its Nesterov momentum, which LAMB has no use
    # for; `--schedule.kind=constant` keeps the step schedule's milestones.
    defaults_cfg = type(cfg)()
    o, sch, d, a, t = cfg.optim, cfg.schedule, cfg.data, cfg.aug, cfg.train
    for keys, read, reader, setting in [
            (("aug.randaug_ops", "aug.randaug_magnitude", "aug.randaug_magnitude_std",
              "aug.randaug_prob"), a.auto_augment == "randaugment",
             "aug.auto_augment=randaugment", f"aug.auto_augment={a.auto_augment}"),
            (("aug.auto_augment_interpolation",), a.auto_augment != "none",
             "aug.auto_augment=trivialaugment or randaugment",
             f"aug.auto_augment={a.auto_augment}"),
            (("optim.momentum", "optim.nesterov"), o.name == "sgd", "optim.name=sgd",
             f"optim.name={o.name}"),
            (("optim.betas", "optim.eps"), o.name == "lamb", "optim.name=lamb",
             f"optim.name={o.name}"),
            (("optim.bce_target_thresh",), o.loss == "bce", "optim.loss=bce",
             f"optim.loss={o.loss}"),
            (("schedule.milestones", "schedule.gamma"), sch.kind == "step", "schedule.kind=step",
             f"schedule.kind={sch.kind}"),
            (("schedule.min_lr_factor", "schedule.cosine_span"), sch.kind == "cosine",
             "schedule.kind=cosine", f"schedule.kind={sch.kind}"),
            (("schedule.peak_epoch",), sch.kind == "triangular", "schedule.kind=triangular",
             f"schedule.kind={sch.kind}"),
            (("data.max_res", "data.start_ramp", "data.end_ramp"), d.min_res > 0,
             "data.min_res > 0", "data.min_res=0"),
            (("aug.padding",), a.train_crop == "pad_random", "aug.train_crop=pad_random",
             f"aug.train_crop={a.train_crop}"),
            (("aug.mix_prob",), a.mixup_alpha > 0 or a.cutmix_alpha > 0,
             "aug.mixup_alpha or aug.cutmix_alpha > 0", "no mixup or cutmix"),
            (("train.ema_decay", "train.ema_steps"), t.ema, "train.ema=true",
             "train.ema=false")]:
        unread = [f"{key}={_yaml_text(_value(cfg, key))}" for key in keys
                  if _value(cfg, key) != _value(defaults_cfg, key)]
        if unread and not read:
            report.print(f"note: {', '.join(unread)} ha{'ve' if len(unread) > 1 else 's'} no "
                         f"effect with {setting} (read with {reader} only)")


def _value(cfg: Config, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def _yaml_text(value: Any) -> str:
    """A config value as an override would give it (true, not True)."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def recipe_stem(recipe: str | Path | None) -> str:
    """What unnamed run folders of `recipe` are called (`<stem>-<date>-<time>`) and how
    `--resume auto` finds them: the file's stem, or for a run's own `config.yaml` (a run trained
    again from it) that run folder's name, so that reruns of different runs never continue
    each other ("config-<date>-<time>" for all of them did)."""
    if not recipe:
        return "run"
    path = Path(recipe)
    run = path.resolve().parent
    if path.name == "config.yaml" and run.name and ((run / "metrics.jsonl").is_file()
                                                    or (run / CHECKPOINTS).is_dir()):
        return run.name
    return path.stem


def _note_single_image_batch_norm(cfg: Config, world_size: int, num_classes: int,
                                   report: Reporter) -> None:
    """Say so when each BatchNorm of a training step sees one image (a per-rank micro-batch of
    one, not synchronised across ranks): it normalises every image with that image's own
    statistics, which validation's running statistics do not reproduce (2 images on 2 ranks
    ended an epoch at a validation loss of 2e7). A 1x1 feature map at the smallest training
    resolution is refused instead, here (the note came first, then the error at the first
    step), found by a forward on the meta device (shapes only, nothing computed).

    Raises:
        ConfigError: a micro-batch of one image reaches a 1x1 feature map.
    """
    micro = cfg.data.batch_size // (world_size * cfg.train.grad_accum_steps)
    synced = cfg.train.sync_bn and world_size > 1
    if micro == 1 and not synced:
        # train_res is unread under progressive resizing: the epochs' own resolutions
        res = min(progressive_resolution(cfg.data, e) for e in range(cfg.schedule.epochs))
        # BatchNorm's check is on shapes: the native layers' is the fused ones' too
        with torch.device("meta"):
            probe = build_model(dataclasses.replace(cfg.model, norm_act="native"), num_classes)
            try:
                probe.train()(torch.empty(1, 3, res, res))
            except ValueError as e:
                _raise_if_one_value_per_channel(e, cfg, 1)
                raise
        report.print(f"note: each training step's BatchNorm sees one image (data.batch_size="
                     f"{cfg.data.batch_size} over {world_size} rank{'s' * (world_size > 1)} x "
                     f"{cfg.train.grad_accum_steps} micro-batch"
                     f"{'es' * (cfg.train.grad_accum_steps > 1)}): its statistics are that "
                     f"image's, which validation's running statistics do not match; use a "
                     f"larger data.batch_size" + (" or train.sync_bn" if world_size > 1 else ""))


def _note_copies_mixed(cfg: Config, world_size: int, report: Reporter) -> None:
    """Say so when repeated augmentation puts copies of an image in one micro-batch (fewer
    ranks x micro-batches than data.ra_reps), where mixup/cutmix, which pairs neighbours,
    mixes many samples with another view of themselves."""
    reps, slots = cfg.data.ra_reps, world_size * cfg.train.grad_accum_steps
    mixing = (cfg.aug.mixup_alpha > 0 or cfg.aug.cutmix_alpha > 0) and cfg.aug.mix_prob > 0
    if mixing and reps > slots:
        batch = cfg.data.batch_size
        # the fewest micro-batches that separate the copies and split the global batch evenly
        fit = next((a for a in range(-(-reps // world_size), batch // world_size + 1)
                    if batch % (world_size * a) == 0), None)
        advice = (f"train.grad_accum_steps={fit} keeps them apart (the global batch stays)"
                  if fit else f"data.batch_size={batch} splits into no such number of "
                  f"micro-batches on {world_size} rank{'s' * (world_size > 1)}")
        report.print(f"note: data.ra_reps={reps} on {world_size} rank{'s' * (world_size > 1)}"
                     f" x {cfg.train.grad_accum_steps} micro-batch"
                     f"{'es' * (cfg.train.grad_accum_steps > 1)} per step puts copies of an "
                     f"image in one micro-batch: mixup/cutmix mixes about {1 - slots / reps:.0%}"
                     f" of the samples with another view of themselves; {advice}")


def _check_graph_accumulation(cfg: Config, device: torch.device, use_compile: bool) -> None:
    """Refuse CUDA-graph steps with gradient accumulation. A graph replay reuses its output
    memory, gradients included: the next micro-batch's backward overwrites the .grad tensors
    that the previous one left, and torch stops with "accessing gradient tensor output of
    CUDAGraphs that has been overwritten" (pytorch/pytorch#169545) after the data set-up."""
    accum = cfg.train.grad_accum_steps
    if accum > 1 and _graph_steps(cfg, device, use_compile):
        raise ConfigError(f"train.compile_mode={cfg.train.compile_mode} replays CUDA graphs, "
                          f"which cannot accumulate gradients over train.grad_accum_steps="
                          f"{accum} micro-batches; use train.compile_mode=default or "
                          f"max-autotune-no-cudagraphs, or train.grad_accum_steps=1")


def evaluate(model: nn.Module, loader: DeviceLoader, precision, device: torch.device,
             flip: bool = False, graph_steps: bool = False) -> dict[str, float]:
    """Loss, top-1 and top-5 (%) over the whole validation set, summed across ranks. With `flip`
    the logits of each image and its mirror image are averaged (test-time augmentation).
    `graph_steps`: `model` replays CUDA graphs, whose outputs the next call overwrites."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    # Counted on the host: a count made a tensor per batch is a host-to-device copy, which
    # waits for the stream (a sync per validation batch).
    count = 0
    # CUDA-graph trees recorded under inference_mode can break the training graphs that follow
    # (pytorch/pytorch#135892): no_grad there.
    no_grad = torch.no_grad if graph_steps else torch.inference_mode
    with no_grad(), precision.autocast(device):
        for images, labels in loader:
            if graph_steps:
                torch.compiler.cudagraph_mark_step_begin()
            logits = model(images)
            if flip:
                if graph_steps:  # the mirrored call reuses the graph's output memory
                    logits = logits.clone()
                logits = (logits + model(images.flip(3))) / 2
            top1, top5 = accuracy_counts(logits, labels)
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            totals[:3] += torch.stack([loss.double(), top1.double(), top5.double()])
            count += len(labels)
    totals[3] = count  # a fill kernel, no copy
    distributed.all_reduce_sum(totals)
    loss, top1, top5, n = totals.tolist()  # sync point: once per validation
    if n == 0:  # every validation file was skipped as unreadable (on every rank)
        first = _first_skipped(loader)
        raise DatasetError("validation: no readable image, every file was skipped"
                           + (f" (first: {first[0]}: {first[1]})" if first else "")
                           + "; tools/check_data.py lists them")
    return {"val_loss": loss / n, "val_top1": 100 * top1 / n, "val_top5": 100 * top5 / n}


def _summary_rows(cfg: Config, params: int, macs, res: int) -> list[tuple[str, str]]:
    m = cfg.model
    shape = (f"width {m.width} (divisor {m.channel_divisor})" if m.channels is None else
             f"explicit channels (stem {m.channels['stem']}, stage outputs "
             f"{'/'.join(str(st['out']) for st in m.channels['stages'])})")
    rows = [("model", f"{m.name} {shape}, {m.num_classes} classes")]
    if m.init_from:
        rows.append(("initial weights", m.init_from))
    return rows + [("params", f"{params:,}"),
                   ("MACs (conv+fc)", f"{macs.conv_fc:,} at {res}px"),
                   ("MACs (fvcore total, incl. BN)", f"{macs.total:,}")]


@contextlib.contextmanager
def _repeated_stops_ignored(stopping: bool):
    """While a stop (Ctrl-C, SIGTERM) is being cleaned up after, further SIGINT and SIGTERM
    are ignored: under torchrun a rank gets the terminal's Ctrl-C, torchrun's forwarded copy
    and then its SIGTERM, and one raised inside the clean-up left a half-removed run folder
    and lost what to continue from. Main thread only (signals are handled there)."""
    import signal
    import threading

    if not stopping or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def train(cfg: Config, recipe: str | None = None, resume: str | None = None,
          dry_run: bool = False) -> dict[str, Any]:
    """Train as `cfg` says; returns the final summary: run_dir, epoch (the last epoch trained,
    one cut by train.max_steps included), best_val_top1 (-1.0 before a complete epoch),
    train_time_s, step, skipped_files, and that epoch's val_top1 and train_loss; not the whole
    metrics line. A dry run returns params and macs only.

    Under torchrun every rank calls this; rank 0 writes the run directory. `cfg` is checked
    again as a recipe is (a Config changed by attribute too) and left unchanged (training
    fills in a copy: num_classes, model.init_from's architecture). The process's torch thread
    count, deterministic-algorithms setting, cudnn.benchmark, CUBLAS_WORKSPACE_CONFIG and
    torch._dynamo's recompile_limit are restored on return; the global RNGs stay
    seeded from `train.seed`, as after a training script.

    Raises:
        UserError subclasses (ConfigError, DatasetError, CheckpointError, RunError): one-line
        messages for the user.
        KeyboardInterrupt (Ctrl-C, or SIGTERM as tools/train.py turns it): re-raised with
        `fasttrain_resume`, the run folder to continue (one holding a checkpoint), "" when
        there is none.
    """
    cfg = config_mod.load_mapping(cfg.to_dict(), "config")
    threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn_benchmark = torch.backends.cudnn.benchmark
    cublas_workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    recompile_limit = torch._dynamo.config.recompile_limit  # raised for a compiled run
    try:
        dist = distributed.setup(cfg.train.device)
    except KeyboardInterrupt as e:  # waiting for the other ranks: nothing written yet
        e.fasttrain_resume = resume or ""
        raise
    made: list[Path] = []  # run folders this call claimed (new, or named and free)
    claimed: list[Path] = []  # the run folder it writes, new or resumed
    owner = rundir_mod.lock_owner.set(object())  # this call's run-folder locks
    report = Reporter(cfg.log.progress, dist.is_main)
    try:
        return _train(cfg, dist, report, recipe, resume, dry_run, made, claimed)
    except BaseException as e:
        # Refused after its folder was made (a check only the first step can do, e.g. a
        # one-image BatchNorm batch), interrupted (Ctrl-C, SIGTERM: a preemption) or stopped
        # by another rank's failure before its first checkpoint: the folder would only hold a
        # config.yaml, and each requeued `--resume auto` would leave one more.
        with _repeated_stops_ignored(isinstance(e, KeyboardInterrupt)):
            for run in made:
                discard_unused_run_dir(run)
            if isinstance(e, KeyboardInterrupt):  # what its one line tells to continue from
                # before a folder was claimed (loading the data) a resume's checkpoint is
                # intact: the same --resume continues
                e.fasttrain_resume = next((str(run) for run in claimed
                                           if (run / CHECKPOINTS / LAST).is_file()),
                                          resume if resume and not claimed else "")
        raise
    finally:
        report.close()  # a bar left running redraws itself and keeps the cursor hidden
        release_run_dirs()
        rundir_mod.lock_owner.reset(owner)
        distributed.teardown()
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch._dynamo.config.recompile_limit = recompile_limit
        if cublas_workspace is None:  # set for a deterministic run's cuBLAS calls only
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas_workspace
        if cfg.data.backend == "ffcv":
            # FFCV's loaders hold their .beton files (descriptors and memory maps) in reference
            # cycles: a notebook kept them open, and a deleted file's disk space, until Python
            # happened to collect them
            gc.collect()


def _train(cfg: Config, dist: distributed.DistInfo, report: Reporter, recipe: str | None,
           resume: str | None, dry_run: bool,
           made: list[Path] | None = None,
           claimed: list[Path] | None = None) -> dict[str, Any]:
    device = dist.device
    _versions.cache_clear()  # a notebook's code may have changed since its last run
    cores = usable_cores()
    torch.set_num_threads(cfg.train.threads or max(1, cores // dist.local_world_size))
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        # One input shape per resolution: cuDNN times its algorithms once per shape and keeps
        # the fastest, as torchvision's reference train.py does outside deterministic mode.
        torch.backends.cudnn.benchmark = True
    precision = resolve_precision(cfg.train.precision)
    # the architecture may come from it
    init_weights = apply_init_from(cfg.model, notes := [], lineage=(lineage := {}))
    for note in notes:
        report.print(note)
    build_model(cfg.model, 1)  # unknown name / bad width: fail before touching data
    if cfg.train.sync_bn and dist.enabled and device.type != "cuda":
        raise ConfigError(f"train.sync_bn=true needs CUDA devices (torch's SyncBatchNorm "
                          f"synchronises GPU tensors only); this run is on {device.type}")
    use_compile = device.type == "cuda" if cfg.train.compile is None else cfg.train.compile
    if use_compile and device.type == "cpu" and (problem := _cpu_compiler_problem()):
        raise ConfigError(f"train.compile=true on the CPU: {problem}")
    _check_graph_accumulation(cfg, device, use_compile)
    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("log.tensorboard=true needs the tensorboard package (pip install "
                          "tensorboard, or the [tensorboard] extra)")
    log_dir = Path(cfg.log.dir).expanduser()  # a `--log.dir=~/runs` the shell left as typed
    check_log_dir(log_dir)  # a dry run too
    stem = recipe_stem(recipe)
    if distributed.start_round() > 0:
        # torchrun --max-restarts restarted us: continue the interrupted run
        resume = _on_main(dist, lambda: _restart_resume(resume, log_dir, cfg.log.name))
    elif (resume and resume != "auto" and not cfg.log.name
          and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0
          and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
          and run_dir_of(checkpoint_file(resume)) is None):
        report.print(f"note: --resume {resume} is outside a run folder and the run has no "
                     f"--log.name: a torchrun restart would start from it again, in a new run "
                     f"folder; name the run to make a restart continue it")
    resume_path, fresh = None, ""
    if resume:  # read-only: a dry run checks what --resume names too
        resume_path = _on_main(dist, lambda: find_resume(resume, log_dir, cfg.log.name, stem))
        continued = run_dir_of(resume_path) if resume_path else None
        if continued is not None and cfg.log.name and cfg.log.name != continued.name:
            # The run continues in its own folder: the name was ignored, yet written into its
            # config.yaml, whose `--resume auto` then started a new run under that name.
            raise ConfigError(f"log.name={cfg.log.name}: --resume {resume} continues the run "
                              f"{continued.name} ({continued}) in its folder; drop --log.name, "
                              f"or start a new run from its weights with "
                              f"--model.init_from={resume_path}")
        if resume_path is None:
            where = (log_dir / cfg.log.name / CHECKPOINTS / LAST if cfg.log.name else
                     f"the newest {stem}-<date>-<time> run under {log_dir}")
            again = (cfg.log.name and (log_dir / cfg.log.name / "metrics.jsonl").is_file()
                     and " (its interrupted first epoch's metrics are dropped)" or "")
            # said once the run folder is this run's: a folder another training is writing
            # is refused in one line, without "starting fresh" before it
            fresh = f"--resume auto: no checkpoint at {where}, starting fresh{again}"

    accum = cfg.train.grad_accum_steps
    loaders = build_loaders(cfg.data, cfg.aug, rank=dist.rank, world_size=dist.world_size,
                            device=device, channels_last=cfg.train.channels_last,
                            seed=cfg.train.seed, grad_accum_steps=accum,
                            dtype=precision.autocast_dtype or torch.float32)
    steps_per_epoch = len(loaders.train) // accum
    if steps_per_epoch == 0:
        raise ConfigError(f"train.grad_accum_steps={accum} leaves no optimizer step per epoch "
                          f"({len(loaders.train)} micro-batches)")
    _note_copies_mixed(cfg, dist.world_size, report)
    _note_single_image_batch_norm(cfg, dist.world_size,
                                  cfg.model.num_classes or loaders.num_classes, report)
    _note_settings_without_effect(cfg, device, use_compile, report)
    _note_hidden_class_folders(loaders.classes, loaders.root, report)
    if cfg.data.dataset == "imagefolder":
        _note_unread_entries(loaders.root, report)
    if cfg.model.num_classes == 0:
        cfg.model.num_classes = loaders.num_classes
    elif cfg.model.num_classes < loaders.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the data set at "
                          f"{loaders.root} has {loaders.num_classes} classes")
    model = build_model(cfg.model, cfg.model.num_classes).to(device)
    if init_weights is not None:
        try:
            model.load_state_dict(init_weights)
        except RuntimeError as e:
            raise CheckpointError(f"model.init_from={cfg.model.init_from}: weights do not fit "
                                  f"its model config ({first_problem(e)[:300]})") from None
    params = count_params(model)
    macs = count_macs(model, cfg.data.val_res) if dist.is_main else None
    # One process has nothing to synchronise with: the layers (and a fused kernel) stay.
    sync_bn = cfg.train.sync_bn and dist.enabled
    if sync_bn:
        model = convert_sync_batchnorm(model)
    rows = _summary_rows(cfg, params, macs, cfg.data.val_res) if dist.is_main else []
    rows += [("data", f"{cfg.data.dataset} at {loaders.root}: {loaders.train_images:,} training"
                      f" / {loaders.val_images:,} validation images, {loaders.num_classes} "
                      f"classes; {steps_per_epoch} step{'s' * (steps_per_epoch != 1)}/epoch "
                      f"x {cfg.data.batch_size} global batch, {dist.world_size} "
                      f"rank{'s' * (dist.world_size > 1)}"
                      + (f", {accum} micro-batches per step" if accum > 1 else "")),
             ("device", f"{device} ({cfg.train.precision}, "
                        f"{'channels_last' if cfg.train.channels_last else 'contiguous'}"
                        + (", SyncBatchNorm" if sync_bn else "") + ")")]
    saved = None
    if resume_path:  # checked before a run directory is made for it (and by a dry run)
        if not dist.is_main and not _visible_here(resume_path):
            raise UnsharedCheckpointError(
                f"{resume_path}: rank 0 found this checkpoint, rank {dist.rank} does not see it: "
                f"a run on several nodes keeps log.dir (and a --resume PATH) on a disk they all "
                f"share")
        saved = ckpt.load(resume_path)
        _check_compatible(saved, cfg, resume_path)
        if cfg.train.ema and "ema" not in saved:  # before a run directory, in a dry run too
            raise CheckpointError(f"{resume_path}: checkpoint has no EMA weights but "
                                  f"train.ema is true")
        _check_no_later_history(saved, resume_path)
        try:  # before a run directory exists, and in a dry run too
            model.load_state_dict(saved["model"])
        except (RuntimeError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{resume_path}: weights do not fit the model config "
                                  f"({first_problem(e)[:300]})") from None
    changes = resume_changes(saved.get("config") or {}, cfg) if saved is not None else []
    if dry_run:
        if resume_path:
            rows.append(("resume", f"from {resume_path}"))
            rows.append(("changed since it", "; ".join(changes) or "nothing"))
        else:  # what new_run_dir would refuse, said on every rank (a lock it takes is
            # released when train() returns)
            _on_main(dist, lambda: check_name_usable(log_dir, cfg.log.name, resume == "auto"))
        if fresh:
            report.print(fresh)
        report.print(config_mod.dump(cfg).rstrip())
        report.summary(rows, "dry run: recipe is valid")
        return {"params": params, "macs": macs.conv_fc if macs else None}
    # A checkpoint inside <run>/checkpoints/ continues that run; a loose file (downloaded,
    # copied) starts a new run directory rather than writing next to it.
    def claim_run_dir() -> Path:
        if resume_path and (run := run_dir_of(resume_path)):
            lock_run_dir(run)
            return run
        run = new_run_dir(log_dir, cfg.log.name, stem, resume == "auto")
        if made is not None:  # before the broadcast, which fails if a peer died meanwhile
            made.append(run)
        return run

    run_dir = _on_main(dist, claim_run_dir)
    if fresh:
        report.print(fresh)
    if claimed is not None:
        claimed.append(run_dir)
    # for torchrun's restarts (after `made`: a store that fails leaves no folder behind)
    _on_main(dist, lambda: distributed.remember_run_dir(str(run_dir.resolve())))

    model = model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model
    optimizer = build_optimizer(cfg.optim, model, device, cfg.data.batch_size)
    scheduler = build_scheduler(cfg.schedule, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    ema = None
    if cfg.train.ema:
        decay = adjusted_decay(cfg.train.ema_decay, cfg.data.batch_size, cfg.train.ema_steps,
                               cfg.schedule.epochs)
        ema = ModelEma(model, decay, cfg.train.ema_steps)
    state = TrainState()
    nothing_left = False
    if saved is not None:  # its weights are in the model already (checked above)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        state = TrainState(**saved["train_state"])
        if state.epoch_step and state.epoch_world_size not in (0, dist.world_size):
            # a sum over the ranks' per-rank losses: the epoch's mean divides by world * steps
            state.epoch_loss_sum *= dist.world_size / state.epoch_world_size
            state.epoch_world_size = dist.world_size
        # A resume with nothing left to train (a finished run, a train.max_steps already
        # reached) leaves the folder's config, metrics and history describing the training it
        # holds; the cut epoch's line stays.
        nothing_left = (run_dir / "config.yaml").is_file() and (
            state.epoch >= cfg.schedule.epochs or _max_steps_reached(cfg, state))
        if not nothing_left:
            # an epoch that train.max_steps cut short is in the history; it is trained again now
            state.history = [h for h in state.history if h["epoch"] <= state.epoch]
        if dist.is_main:
            try:
                _trim_run_dir(run_dir, max([h["epoch"] for h in state.history]
                                           + [state.epoch]))
                _relink_best(run_dir, resume_path, saved, state)
            except OSError as e:  # a read-only or full run folder: one line, nothing lost
                where = e.filename or run_dir / "metrics.jsonl"
                raise RunError(f"{run_dir}: cannot update the run directory to resume it "
                               f"({where}: {e.strerror or e}); its files are unchanged") from None
        if run_dir_of(resume_path) is None:  # a loose file: this new folder has no best.pt
            _adopt_best(run_dir, resume_path, saved, state, dist.is_main, report)
        where = f"epoch {state.epoch}" + (f", step {state.epoch_step} of epoch {state.epoch + 1}"
                                          if state.epoch_step else "")
        report.print(f"resumed from {resume_path} after {where}")
        if changes:
            report.print(f"settings changed since that checkpoint: {'; '.join(changes)}")

    _rank_rng(cfg.train.seed, dist.rank, dist.world_size, saved, state.step)
    train_model: nn.Module = model
    if dist.enabled:
        train_model = distributed.data_parallel(model, device, cfg.train.deterministic)
    compile_mode = None if cfg.train.compile_mode == "default" else cfg.train.compile_mode
    if use_compile:
        # What an earlier compiled run of this process left (a notebook): its graphs count
        # against the recompile limit (later widths ran uncompiled) and its shapes made this
        # run's batch dimension dynamic. A fresh start, as in a new process.
        torch.compiler.reset()
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, _recompile_limit(cfg))
        train_model = torch.compile(train_model, mode=compile_mode)
    # Validation runs the plain model (compiled on its own when training is compiled), not DDP:
    # DDP's forward starts with a broadcast of rank 0's buffers, a collective that a rank
    # without validation batches (fewer images than ranks, or only unreadable ones) never
    # joins, so the others waited forever. The broadcast is done explicitly before each
    # validation instead: every rank evaluates rank 0's model, the one that is saved.
    eval_model = train_model
    if dist.enabled:
        eval_model = torch.compile(model, mode=compile_mode) if use_compile else model
    parts = Parts(cfg, model, train_model, optimizer, scheduler, scaler, precision,
                  BatchMixer(cfg.aug, cfg.model.num_classes, cfg.optim.label_smoothing), ema,
                  device, steps_per_epoch, graph_steps=_graph_steps(cfg, device, use_compile),
                  classes=list(loaders.classes), pruned_from=lineage)

    writer = None
    if dist.is_main and nothing_left:
        report.summary(rows + [("run directory", str(run_dir))], "fasttrain")
    elif dist.is_main:
        try:  # replaced whole on a resume: never left torn or empty
            ckpt.write_atomic(run_dir / "config.yaml", lambda f: f.write(config_mod.dump(cfg)),
                              mode="w")
        except OSError as e:
            raise RunError(f"{run_dir / 'config.yaml'}: cannot write the run's config "
                           f"({e.strerror or e})") from None
        report.summary(rows + [("run directory", str(run_dir))], "fasttrain")
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # Scalars of epochs after the checkpoint (a cut epoch, one logged before a kill, a
            # named run restarted before its first checkpoint) are hidden, as the trim of
            # metrics.jsonl drops their lines.
            writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=state.epoch + 1)
    epochs = cfg.schedule.epochs

    def save_step_checkpoint() -> None:
        rng_ranks = _all_rng_states(dist)
        if dist.is_main:
            _save(run_dir, parts, state, {}, is_best=False, rng_ranks=rng_ranks)

    reported: set[str] = set()
    shown_time = state.train_time_s
    for epoch in range(state.epoch, epochs):
        if _max_steps_reached(cfg, state):
            # reached before this epoch started (a resume with the same or a smaller cap):
            # training it for 0 steps would mark it done untrained
            report.print(f"train.max_steps={cfg.train.max_steps} reached: stopping")
            break
        t0 = time.perf_counter() - state.epoch_elapsed_s
        train_metrics = train_one_epoch(parts, loaders.train, state, epoch, report,
                                        save_step_checkpoint)
        t_train = time.perf_counter() - t0
        report.phase("validating")
        distributed.broadcast_buffers(model)
        val_metrics = evaluate(eval_model, loaders.val, precision, device, cfg.aug.test_flip,
                               parts.graph_steps)
        if ema is not None:
            # Each rank's EMA averages its own BatchNorm statistics; rank 0's is the one saved.
            distributed.broadcast_buffers(ema.module)
            val_metrics.update({f"{k}_ema": v for k, v in evaluate(
                ema.module, loaders.val, precision, device, cfg.aug.test_flip).items()})
        epoch_time = time.perf_counter() - t0
        skipped = _new_skipped_files(loaders, reported)
        for path, reason in skipped:
            report.print(f"skipped unreadable file {one_line(path)}: {one_line(reason)}")
        cut = state.epoch_step > 0  # train.max_steps stopped inside the epoch
        if not cut:
            state.epoch = epoch + 1
            state.train_time_s += epoch_time
        # A cut epoch's training time is carried in state.epoch_elapsed_s and counted when a
        # resume completes it; here it is only shown.
        shown_time = state.train_time_s + (epoch_time if cut else 0.0)
        metrics = {"epoch": epoch + 1, **train_metrics, **val_metrics, "epoch_time_s": epoch_time,
                   "train_images_per_s": train_metrics["train_images"] / t_train,
                   "train_res": progressive_resolution(cfg.data, epoch),
                   "train_time_s": shown_time, "world_size": dist.world_size,
                   "step": state.step, "skipped_files": len(reported)}
        if cut:  # a partial epoch's line says so (compare and readers skip it)
            metrics["epoch_step"] = state.epoch_step
        # An epoch cut by train.max_steps is trained again on resume (its line replaced): it is
        # no candidate for best.pt, which would otherwise hold a mid-epoch state whose score
        # no line of metrics.jsonl keeps.
        is_best = not cut and metrics["val_top1"] > state.best_val_top1
        if not cut:
            state.best_val_top1 = max(state.best_val_top1, metrics["val_top1"])
        # What best.pt holds and the summary shows: the best complete epoch (null before one).
        metrics["best_val_top1"] = state.best_val_top1 if state.best_val_top1 >= 0 else None
        state.history.append({k: metrics[k] for k in ("epoch", "val_top1", "train_loss",
                                                       "val_top1_ema") if k in metrics})
        report.end_epoch(metrics, epochs)
        rng_ranks = _all_rng_states(dist)
        if dist.is_main:
            try:
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json_line(metrics) + "\n")
                    f.flush()
                    os.fsync(f.fileno())  # before the checkpoint that claims this epoch is done
            except OSError as e:  # a full disk meets this write first at the default settings
                last = run_dir / CHECKPOINTS / LAST
                kept = (f"; the previous checkpoint {last} is intact" if last.exists() else
                        "; no checkpoint was written yet" if last.parent.is_dir() else
                        f"; {last.parent} is gone (was the run directory removed?)")
                raise TrainingError(f"cannot write {run_dir / 'metrics.jsonl'} after epoch "
                                    f"{epoch + 1} ({e.strerror or e}){kept}") from None
            if writer is not None:
                for key, value in metrics.items():
                    if value is not None:  # best_val_top1 before a complete epoch
                        writer.add_scalar(key, value, epoch + 1)
                writer.flush()
            _save(run_dir, parts, state, metrics, is_best, rng_ranks=rng_ranks)
        if _max_steps_reached(cfg, state):
            report.print(f"train.max_steps={cfg.train.max_steps} reached: stopping")
            break
    if writer is not None:
        writer.close()
    final = state.history[-1] if state.history else {}
    epochs_done = str(state.epoch) + (f" (+{state.epoch_step} steps of epoch {state.epoch + 1})"
                                      if state.epoch_step else "")
    best = (f"{state.best_val_top1:.2f} %" if state.best_val_top1 >= 0 else
            "- (no complete epoch)")
    report.summary([("epochs", epochs_done),
                    ("final val top-1", f"{final.get('val_top1', float('nan')):.2f} %"),
                    *([("final val top-1 (EMA)", f"{final['val_top1_ema']:.2f} %")]
                      if "val_top1_ema" in final else []),
                    ("best val top-1", best),
                    ("training time", f"{shown_time:.1f} s (train + validation)"),
                    ("run directory", str(run_dir))], "done")
    # `final`'s epoch (the last one trained, one cut by train.max_steps included) overrides
    # state.epoch, which stays only when no epoch has been trained
    return {"run_dir": str(run_dir), "epoch": state.epoch, "best_val_top1": state.best_val_top1,
            "train_time_s": shown_time, "step": state.step,
            "skipped_files": len(reported), **final}


def train_one_epoch(p: Parts, loader: DeviceLoader, state: TrainState, epoch: int,
                    report: Reporter, save_step_checkpoint) -> dict[str, float]:
    """One epoch of optimizer steps (each over `grad_accum_steps` micro-batches), starting at
    `state.epoch_step` when resuming inside the epoch. Checkpoints every
    `train.checkpoint_every` steps through `save_step_checkpoint`.

    Raises:
        TrainingError: the loss became non-finite (the message names the first such step).
    """
    cfg = p.cfg
    p.train_model.train()
    accum = cfg.train.grad_accum_steps
    start = state.epoch_step
    loader.set_epoch(epoch, start_batch=start * accum)
    steps = p.steps_per_epoch
    if cfg.train.max_steps:
        steps = max(start, min(steps, start + cfg.train.max_steps - state.step))
    report.start_epoch(epoch + 1, cfg.schedule.epochs, steps)
    # By step, as the LR warmup ends: a fractional warmup ends inside an epoch.
    warmup = warmup_steps(cfg.schedule, p.steps_per_epoch)
    no_sync = getattr(p.train_model, "no_sync", None) or getattr(
        getattr(p.train_model, "_orig_mod", None), "no_sync", None)
    loss_sum = torch.zeros((), dtype=torch.float64, device=p.device)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    bad_step = torch.full((), -1, dtype=torch.int64, device=p.device)  # first non-finite loss
    images_seen, step = 0, start
    t_start = time.perf_counter() - state.epoch_elapsed_s
    batches = iter(loader)
    while step < steps:
        for micro in range(accum):
            try:
                images, labels = next(batches)
            except StopIteration:
                raise _ran_short(loader, epoch, step * accum + micro, steps * accum) from None
            targets = None
            if p.mixer.enabled or cfg.optim.loss == "bce":
                # The mix of each step is a function of (seed, epoch, step): resumable.
                rng = random.Random(sample_seed(cfg.train.seed, epoch, step, repeat=-1))
                images, targets, _ = p.mixer(images, labels, rng)
            sync = micro == accum - 1 or no_sync is None
            with (contextlib.nullcontext() if sync else no_sync()):
                if p.graph_steps:  # a new iteration: the graphs may reuse their output memory
                    torch.compiler.cudagraph_mark_step_begin()
                with p.precision.autocast(p.device):
                    try:
                        logits = p.train_model(images)
                    except ValueError as e:
                        _raise_if_one_value_per_channel(e, cfg, len(labels))
                        raise
                loss = classification_loss(cfg.optim, logits, labels, targets)
                p.scaler.scale(loss).backward()
            step_loss = loss.detach() if micro == 0 else step_loss + loss.detach()
            loss_sum += loss.detach().double() / accum
            # Recorded on the device: no sync per step; checked at the sync points below.
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()),
                                   state.step + 1, bad_step)
            images_seen += len(labels)
        if accum > 1:
            # Summed undivided, divided once: the arithmetic of `accum` ranks' rank-ordered
            # mean, so one process equals them bit for bit for any k (a loss / k per
            # micro-batch rounds unless k is a power of two).
            torch._foreach_div_([q.grad for q in p.model.parameters() if q.grad is not None],
                                float(accum))
        if cfg.optim.max_grad_norm > 0:
            p.scaler.unscale_(p.optimizer)
            torch.nn.utils.clip_grad_norm_(p.model.parameters(), cfg.optim.max_grad_norm)
        p.scaler.step(p.optimizer)
        p.scaler.update()
        p.optimizer.zero_grad(set_to_none=True)
        step_lr = p.optimizer.param_groups[0]["lr"]  # what this step used; step() moves it on
        if p.scaler.is_enabled():
            # fp16: a first step whose gradients overflow is skipped by the scaler, and torch
            # then warns that the schedule stepped before the optimizer, advice for code that
            # calls them out of order; the schedule counts steps, skipped ones included.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                p.scheduler.step()
        else:
            p.scheduler.step()
        step += 1
        state.step += 1
        if p.ema is not None:
            p.ema.step(p.model, state.step, in_warmup=state.step <= warmup)
        checkpoint_now = (cfg.train.checkpoint_every and step < p.steps_per_epoch
                          and state.step % cfg.train.checkpoint_every == 0)
        if checkpoint_now:  # every rank: a collective, and the weights about to be saved
            _raise_if_diverged(bad_step, epoch, p.model, state.step)
        if (step % cfg.log.interval == 0 or step == steps) and report.due():
            _raise_if_diverged(bad_step, epoch)  # a sync point anyway (rank 0 only)
            report.update(step, step_loss.item() / accum, step_lr)
        if checkpoint_now:
            sums = torch.cat([loss_sum.view(1), torch.tensor([images_seen], dtype=torch.float64,
                                                             device=p.device)])
            distributed.all_reduce_sum(sums)  # global partial sums: rank 0 saves them
            state.epoch_step = step
            state.epoch_loss_sum += sums[0].item()
            state.epoch_images += int(sums[1].item())
            state.epoch_elapsed_s = time.perf_counter() - t_start
            state.epoch_world_size = world
            save_step_checkpoint()
            loss_sum.zero_()
            images_seen = 0
    _raise_if_diverged(bad_step, epoch, p.model, state.step)
    totals = torch.cat([loss_sum.view(1),
                        torch.tensor([images_seen], dtype=torch.float64, device=p.device)])
    distributed.all_reduce_sum(totals)
    loss_total, images_total = totals.tolist()  # sync point: once per epoch
    loss_total += state.epoch_loss_sum
    images_total += state.epoch_images
    if step < p.steps_per_epoch:
        # train.max_steps stopped inside the epoch: keep the position and the partial sums, so
        # the checkpoint saved next says where a resume continues (not "epoch done").
        state.epoch_step, state.epoch_loss_sum, state.epoch_images = step, loss_total, \
            int(images_total)
        state.epoch_elapsed_s = time.perf_counter() - t_start
        state.epoch_world_size = world
    else:
        state.epoch_step, state.epoch_loss_sum, state.epoch_images = 0, 0.0, 0
        state.epoch_elapsed_s, state.epoch_world_size = 0.0, 0
    return {"train_loss": loss_total / max(world * step, 1), "train_images": int(images_total),
            "lr": step_lr if step > start else p.optimizer.param_groups[0]["lr"]}


def _trim_run_dir(run_dir: Path, epochs_done: int) -> None:
    """Make the run directory agree with the checkpoint being resumed: drop metrics lines of
    epochs after it (written before a crash that came before their checkpoint) and temp files
    of interrupted checkpoint writes."""
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        keep, lines = [], []
        # errors="replace": a power loss can leave a torn last line or NUL bytes; such lines
        # are what this trim is for, and must not make the run impossible to resume.
        lines = metrics.read_text(errors="replace").splitlines()
        for line in lines:
            try:
                record = json.loads(line)
                done = isinstance(record, dict) and record["epoch"] <= epochs_done
            except (ValueError, KeyError, TypeError):
                done = False
            if done:
                keep.append(line)
        if keep != lines:  # nothing to drop: nothing written (a finished run resumed)
            # atomically: a kill during a plain rewrite (truncate, then write) lost the history
            ckpt.write_atomic(metrics, lambda f: f.write("".join(line + "\n" for line in keep)),
                              mode="w")
    for tmp in (run_dir / CHECKPOINTS).glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


def _relink_best(run_dir: Path, resume_path: Path, saved: dict[str, Any],
                 state: TrainState) -> None:
    """A run killed between last.pt's rename and best.pt's link left best.pt an earlier epoch
    for good (the resume does not repeat that epoch, and later ones are compared with the best
    score the checkpoint restored): link it now when last.pt is the best and best.pt is behind."""
    last, best = run_dir / CHECKPOINTS / LAST, run_dir / CHECKPOINTS / BEST
    score = (saved.get("metrics") or {}).get("val_top1")
    if (state.epoch_step or score is None or score != state.best_val_top1
            or not same_file(resume_path, last) or same_file(last, best)):
        return
    try:
        behind = (ckpt.load(best).get("metrics") or {}).get("val_top1", -1.0) < score
    except CheckpointError:  # missing or torn
        behind = True
    if behind:
        ckpt.link_or_copy_atomic(last, best)


def _max_steps_reached(cfg: Config, state: TrainState) -> bool:
    return bool(cfg.train.max_steps and state.step >= cfg.train.max_steps)


def _adopt_best(run_dir: Path, resume_path: Path, saved: dict[str, Any], state: TrainState,
                is_main: bool, report: Reporter) -> None:
    """A loose checkpoint continued in a new run folder restores the best score of its run,
    but that run's best.pt is not here: the file becomes best.pt when it is that best (a
    complete epoch with that score), else the best restarts with this folder's first epoch."""
    score = (saved.get("metrics") or {}).get("val_top1")
    if state.best_val_top1 < 0:
        return
    if not state.epoch_step and score is not None and score == state.best_val_top1:
        if is_main:  # a copy: a link would change with the user's file
            ckpt.copy_atomic(resume_path, run_dir / CHECKPOINTS / BEST)
        return
    report.print(f"note: {resume_path} is not its run's best checkpoint (val top-1 "
                 f"{state.best_val_top1:.2f} %, not in this folder): best.pt and best_val_top1 "
                 f"start again with this run's next epoch")
    state.best_val_top1 = -1.0


def _first_skipped(loader) -> tuple[str, str] | None:
    """(path, reason) of the first file `loader` skipped as unreadable, or None."""
    return next(iter(getattr(loader, "skipped", {}).items()), None)


def _ran_short(loader: DeviceLoader, epoch: int, got: int, want: int) -> ShardError:
    """The loader ended early: a batch held only unreadable files and was dropped (each rank
    must run the same number of steps, so the epoch cannot just be shorter)."""
    skipped = getattr(loader, "skipped", {})
    first = _first_skipped(loader)
    which = f"; first: {first[0]}: {first[1]}" if first else ""
    return ShardError(f"epoch {epoch + 1}: the training data ran out after {got} of {want} "
                        f"batches because a whole batch was unreadable files ({len(skipped)} "
                        f"skipped so far{which}); remove them (tools/check_data.py lists them) "
                        f"or raise data.batch_size")


def _raise_if_one_value_per_channel(e: ValueError, cfg: Config, micro_batch: int) -> None:
    """BatchNorm's refusal of a training batch with one value per channel (a micro-batch of one
    image reaching a 1x1 feature map) as a config error saying which keys to change."""
    if "Expected more than 1 value per channel" in str(e):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size}: a training micro-batch of "
                          f"{micro_batch} image(s) per rank leaves BatchNorm one value per "
                          f"channel at the network's smallest feature map; raise data.batch_size "
                          f"(or the resolution)") from None


def _raise_if_diverged(bad_step: torch.Tensor, epoch: int, model: nn.Module | None = None,
                       step: int = 0) -> None:
    """Stop at the first non-finite loss. With `model` (before anything is saved, called on
    every rank): also when a weight or BatchNorm statistic is non-finite (an overflowing update
    or running variance leaves the loss finite), and with the first bad step over all ranks,
    so every rank raises the same error (rank 0's is the one printed)."""
    never = torch.iinfo(torch.int64).max
    flags = torch.stack([torch.where(bad_step < 0, never, bad_step), torch.zeros_like(bad_step)])
    if model is not None:
        finite = torch.stack([t.isfinite().all() for t in model.state_dict().values()
                              if t.is_floating_point()]).all()
        flags[1] = (~finite).long()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags[:1], op=torch.distributed.ReduceOp.MIN)
            torch.distributed.all_reduce(flags[1:], op=torch.distributed.ReduceOp.MAX)
    first, weights_bad = flags.tolist()
    if first != never:
        raise TrainingError(f"non-finite loss at optimizer step {first} (epoch {epoch + 1}); "
                            f"stopping without saving over the last good checkpoint")
    if weights_bad:
        raise TrainingError(f"non-finite weights or BatchNorm statistics after optimizer step "
                            f"{step} (epoch {epoch + 1}); stopping without saving over the last "
                            f"good checkpoint")


def _new_skipped_files(loaders, reported: set[str]) -> list[tuple[str, str]]:
    """Unreadable files seen by any rank since the last call (gathered to every rank)."""
    mine = [(p, r) for loader in (loaders.train, loaders.val)
            for p, r in loader.skipped.items() if p not in reported]
    if torch.distributed.is_initialized():
        everyone: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, mine)
        mine = [item for part in everyone for item in part]
    new = sorted({p: r for p, r in mine if p not in reported}.items())
    reported.update(p for p, _ in new)
    return new


def _check_no_later_history(saved: dict[str, Any], path: Path) -> None:
    """Refuse to continue a run from an earlier checkpoint of it (a best.pt or a kept copy in
    its checkpoints/ folder) when its last.pt went further: the resume would cut the later
    epochs from metrics.jsonl and overwrite last.pt.

    Raises:
        RunError: names both checkpoints' steps and how to continue the earlier one.
    """
    run = run_dir_of(path)
    last = run / CHECKPOINTS / LAST if run is not None else None
    if last is None or not last.is_file() or last.samefile(path):
        return
    later = (ckpt.load(last).get("train_state") or {}).get("step", 0)
    here = (saved.get("train_state") or {}).get("step", 0)
    if later > here:
        raise RunError(f"--resume {path}: its run went on to step {later} ({last}); continuing "
                       f"from step {here} there would discard the later epochs. Copy the "
                       f"checkpoint out of {last.parent} to continue it in a new run directory")


def _save(run_dir: Path, p: Parts, state: TrainState, metrics: dict[str, Any],
          is_best: bool, rng_ranks: list[dict[str, Any]] | None = None) -> None:
    payload = {"model": ckpt.unwrap(p.model).state_dict(), "optimizer": p.optimizer.state_dict(),
               "scheduler": p.scheduler.state_dict(),
               # rank 0's stream, as in one process (already gathered under DDP)
               "rng": rng_ranks[0] if rng_ranks else _rng_state(),
               "train_state": dataclasses.asdict(state),
               "config": p.cfg.to_dict(), "metrics": metrics, "versions": _versions(),
               "classes": p.classes}
    if rng_ranks is not None:  # every rank's stream
        payload["rng_ranks"] = rng_ranks
    if p.precision.use_scaler:
        payload["scaler"] = p.scaler.state_dict()
    if p.ema is not None:
        payload["ema"] = p.ema.state_dict()
    if p.pruned_from:
        payload["pruned_from"] = p.pruned_from
    last = run_dir / CHECKPOINTS / LAST
    try:
        ckpt.save_atomic(payload, last)
        if is_best:
            ckpt.link_or_copy_atomic(last, run_dir / CHECKPOINTS / BEST)
    except OSError as e:
        kept = f"; the previous checkpoint {last} is intact" if last.exists() else ""
        raise TrainingError(f"cannot write checkpoint {last} at step {state.step}: "
                            f"{e.strerror or e}{kept}") from None
