"""Structured channel pruning of a fasttrain ResNet to a target MAC count (Torch-Pruning).

The pruned network is *physically smaller* and dense: its convolutions and norms have fewer
channels, it is described as data by a channel spec (`fasttrain.models.resnet`, module doc) and
rebuilt from that spec by the ordinary fasttrain model classes, so the trainer, the benchmark and
the exporter treat it like any other fasttrain model.

How channels are chosen:
- Torch-Pruning's dependency graph finds the *groups* of coupled channels: a block's inner
  channels (conv → norm → next conv's input), and, across residual additions, every layer that
  writes or reads one residual stream (all block outputs of a stage, the projection shortcut, the
  next stage's first convs). A group is pruned as a whole, so residual additions stay consistent.
- The classifier's outputs are never pruned. In CIFAR option-A networks the residual streams are
  kept too (stem and block outputs): the parameter-free shortcut zero-pads channels by position,
  which a pruned stream cannot follow, so only the blocks' inner channels are pruned there.
- Importance, per channel of a group (Torch-Pruning estimators, each normalised by the group's
  mean so groups compare): `l1` = `MagnitudeImportance(p=1)`, the L1 norm of every weight coupled
  to the channel (filters, the next layers' input slices, norm affine weights) averaged over the
  group; `bn_scale` = `BNScaleImportance`, the |gamma| of the group's BatchNorms (network
  slimming).
- `uniform` keeps `round(C * (1 - ratio))` channels of every group (at least 1); `global` ranks
  all channels of all groups together and removes the `round(ratio * total)` least important,
  always keeping each group's most important channel.
- The ratio is found by bisection until the pruned network's conv+fc MACs (fvcore, as
  `fasttrain.measure.count_macs` counts everywhere in this project) are within the tolerance of
  the target; MACs never increase with the ratio in either scheme.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import importlib.metadata
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..cli import check_output as check_writable
from ..errors import ConfigError, UserError
from ..measure import count_macs, count_params, git_commit
from ..measure.sources import first_line
from ..models.resnet import ShortcutA, channels_of

IMPORTANCES = ("l1", "bn_scale")
SCOPES = ("uniform", "global")
TORCH_PRUNING = "torch-pruning==1.6.1"


class PruneError(UserError, ValueError):
    """Pruning cannot be done as asked (missing package, unreachable target, bad model)."""


def require_torch_pruning():
    """The `torch_pruning` module, or a PruneError saying how to install it."""
    try:
        import torch_pruning
    except ImportError:
        raise PruneError(f"pruning needs Torch-Pruning: pip install --no-build-isolation "
                         f"-e .[prune] (or pip install {TORCH_PRUNING})") from None
    return torch_pruning


def _tp_version() -> str:
    return _installed_tp() or str(getattr(require_torch_pruning(), "__version__", "unknown"))


def _importance(name: str):
    tp = require_torch_pruning()
    if name == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    raise PruneError(f"importance must be one of {', '.join(IMPORTANCES)}, got {name!r}")


def _ignored(model: nn.Module) -> list[nn.Module]:
    # The classifier's outputs are the classes. With option-A shortcuts, the dependency graph
    # couples all residual streams through the zero-padding into one group that also holds the
    # stem conv: ignoring the stem leaves that group (and only it) unpruned.
    ignored = [model.fc]
    if any(isinstance(m, ShortcutA) for m in model.modules()):
        ignored.append(model.conv1)
    return ignored


def _groups(model: nn.Module, resolution: int):
    """(dependency graph, [(root module name, root module, pruning fn, group)]) of `model`."""
    tp = require_torch_pruning()
    example = torch.zeros(1, 3, resolution, resolution)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    names = {m: n for n, m in model.named_modules()}
    out = []
    for group in graph.get_all_groups(ignored_layers=_ignored(model),
                                      root_module_types=[nn.Conv2d, nn.Linear]):
        root = group[0].dep.target.module
        out.append((names[root], root, group[0].dep.handler, group))
    return graph, out


def channel_importance(model: nn.Module, importance: str, resolution: int
                       ) -> dict[str, torch.Tensor]:
    """Importance of every prunable channel: {root module name of its group: scores (C,)}."""
    estimator = _importance(importance)
    model = copy.deepcopy(model).eval()
    _, groups = _groups(model, resolution)
    scores = {}
    for name, _, _, group in groups:
        imp = estimator(group)
        if imp is None:  # a group without weights the estimator reads
            continue
        scores[name] = imp.detach().float().cpu()
    if not scores:
        raise PruneError("the model has no prunable channel group")
    return scores


def channel_plan(scores: dict[str, torch.Tensor], ratio: float, scope: str
                 ) -> dict[str, list[int]]:
    """Channels to remove per group at `ratio` (0 = none; 1 = all but one per group).

    Args:
        scores: `channel_importance` output.
        scope: "uniform" (every group loses the same fraction) or "global" (one ranking over all
            channels, each group keeping its most important one).

    Returns:
        {group root name: sorted channel indices to remove}; groups left whole are omitted.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    plan: dict[str, list[int]] = {}
    if scope == "uniform":
        for name, imp in scores.items():
            keep = max(1, math.floor(len(imp) * (1.0 - ratio) + 0.5))
            order = torch.argsort(imp, stable=True)  # least important first
            drop = order[:len(imp) - keep]
            if len(drop):
                plan[name] = sorted(drop.tolist())
        return plan
    if scope != "global":
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    total = sum(len(imp) for imp in scores.values())
    candidates = []  # (score, tie-break, group, channel): every channel but each group's best
    for g, (name, imp) in enumerate(scores.items()):
        best = int(torch.argmax(imp))
        candidates += [(float(s), g, name, c) for c, s in enumerate(imp.tolist()) if c != best]
    n_drop = min(math.floor(ratio * total + 0.5), len(candidates))
    candidates.sort(key=lambda t: (t[0], t[1], t[3]))
    for _, _, name, c in candidates[:n_drop]:
        plan.setdefault(name, []).append(c)
    return {name: sorted(idx) for name, idx in plan.items()}


def apply_plan(model: nn.Module, plan: dict[str, list[int]], resolution: int) -> nn.Module:
    """A pruned deep copy of `model` (eval mode): each planned group loses its channels through
    Torch-Pruning's dependency graph, so every coupled layer shrinks with it."""
    model = copy.deepcopy(model).eval()
    graph, groups = _groups(model, resolution)
    for name, root, fn, _ in groups:
        if plan.get(name):
            graph.get_pruning_group(root, fn, plan[name]).prune()
    return model


@dataclass
class PruneResult:
    """A pruned network and how it was found.

    Attributes:
        model: the pruned network, rebuilt from `channels` by the fasttrain model class and
            holding the pruned weights (eval mode).
        channels: its channel spec (JSON-able).
        ratio: the ratio that reached the target.
        macs / params: conv+fc MACs per image at `resolution` (fvcore) and parameters.
        source_macs / source_params: the same for the unpruned input.
        target_macs, resolution, importance, scope, tolerance: what was asked.
        search: every evaluated (ratio, MACs), in order.
    """

    model: nn.Module
    channels: dict[str, Any]
    ratio: float
    macs: int
    params: int
    source_macs: int
    source_params: int
    target_macs: int
    resolution: int
    importance: str
    scope: str
    tolerance: float
    search: list[tuple[float, int]] = field(default_factory=list)

    @property
    def error(self) -> float:
        """Relative distance of the achieved MACs from the target."""
        return self.macs / self.target_macs - 1.0


def prune_to_macs(model: nn.Module, target_macs: int, resolution: int,
                  rebuild: Callable[[dict[str, Any]], nn.Module], *, importance: str = "l1",
                  scope: str = "global", tolerance: float = 0.05, max_evals: int = 40
                  ) -> PruneResult:
    """Prune `model` until its conv+fc MACs are within `tolerance` of `target_macs`.

    Args:
        model: a fasttrain `ResNet` / `CifarResNet` (not modified).
        resolution: input size the MACs are counted at.
        rebuild: channel spec → a fresh fasttrain model of that architecture (its state dict
            must take the pruned weights with `strict=True`; this is checked).
        importance: one of IMPORTANCES; scope: one of SCOPES.
        tolerance: accepted relative MAC error.

    Raises:
        PruneError: the target is not below the model's MACs, cannot be reached (even at one
            channel per prunable group), or no ratio lands within the tolerance.
    """
    if scope not in SCOPES:
        raise PruneError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    model = copy.deepcopy(model).eval()
    source_macs = count_macs(model, resolution).conv_fc
    if target_macs >= source_macs:
        raise PruneError(f"target {target_macs:,} MACs is not below the model's "
                         f"{source_macs:,} MACs at {resolution} px")
    scores = channel_importance(model, importance, resolution)
    cache: dict[tuple, tuple[int, nn.Module]] = {}
    search: list[tuple[float, int]] = []

    def evaluate(ratio: float) -> int:
        plan = channel_plan(scores, ratio, scope)
        key = tuple(sorted((k, tuple(v)) for k, v in plan.items()))
        if key not in cache:  # a step function of the ratio: equal plans, equal networks
            pruned = apply_plan(model, plan, resolution)
            cache[key] = (count_macs(pruned, resolution).conv_fc, pruned)
        macs = cache[key][0]
        search.append((ratio, macs))
        return macs

    lo, hi = 0.0, 1.0
    floor_macs = evaluate(hi)
    if floor_macs > target_macs * (1 + tolerance):
        raise PruneError(f"target {target_macs:,} MACs is out of reach: one channel per "
                         f"prunable group still costs {floor_macs:,} MACs at {resolution} px")
    # Invariant: MACs(lo) > target >= MACs(hi). Stop when close, or when the bracket has shrunk
    # below the finest channel step (the two ends are then adjacent steps of the function).
    while len(search) < max_evals and hi - lo > 1e-5:
        mid = (lo + hi) / 2
        macs = evaluate(mid)
        if macs < source_macs and abs(macs / target_macs - 1) <= tolerance / 10:
            break
        if macs > target_macs:
            lo = mid
        else:
            hi = mid
    # A ratio that prunes nothing is no result, though within the tolerance of a target near
    # the source's MACs: it was written as a "pruned" checkpoint of the unchanged network.
    pruning = [rm for rm in search if rm[1] < source_macs]
    if not pruning:
        raise PruneError(f"target {target_macs:,} MACs: no ratio within reach prunes a channel "
                         f"of the model's {source_macs:,} (its groups are down to one channel, "
                         f"or the target is within the tolerance of its MACs)")
    ratio, macs = min(pruning, key=lambda rm: (abs(rm[1] / target_macs - 1), rm[0]))
    if abs(macs / target_macs - 1) > tolerance:
        raise PruneError(f"no pruning ratio lands within {tolerance * 100:.3g} % of "
                         f"{target_macs:,} MACs: the closest is {macs:,} "
                         f"({miss_percent(macs / target_macs - 1, tolerance)} %) at ratio "
                         f"{ratio:.4f}; try the other --scope or a larger --tolerance")
    plan = channel_plan(scores, ratio, scope)
    pruned = cache[tuple(sorted((k, tuple(v)) for k, v in plan.items()))][1]
    spec = channels_of(pruned)
    clean = rebuild(spec)
    try:
        clean.load_state_dict(pruned.state_dict())
    except RuntimeError as e:  # a coupling the spec cannot express: a bug, not a user error
        raise RuntimeError(f"pruned weights do not fit the model rebuilt from its channel "
                           f"spec: {str(e).splitlines()[0]}") from None
    _check_blur_kept(pruned, clean)
    clean.eval()
    _check_same_function(pruned, clean, resolution)
    return PruneResult(clean, spec, ratio, macs, count_params(clean), source_macs,
                       count_params(model), int(target_macs), resolution, importance, scope,
                       tolerance, search)


def miss_percent(miss: float, tolerance: float) -> str:
    """`miss` (a signed relative error beyond `tolerance`) as a signed percentage with the fewest
    decimals, at least one, that still show it outside the tolerance: "-0.2 %" for a miss of
    -0.221 % against a 0.2 % tolerance read as a result within it."""
    for decimals in range(1, 12):
        text = f"{miss * 100:+.{decimals}f}"
        if abs(float(text)) > tolerance * 100:
            return text
    return f"{miss * 100:+.3g}"


def _blurred(model: nn.Module) -> set[str]:
    from ..models.regularize import BlurPoolConv2d

    return {name for name, m in model.named_modules() if isinstance(m, BlurPoolConv2d)}


def _check_blur_kept(pruned: nn.Module, clean: nn.Module,
                     remedy: str = "choose a larger target, or prune a network trained "
                                   "without blurpool") -> None:
    """model.blurpool blurs strided convs by their input count (>= 16): one pruned below that
    keeps its blur here but would lose it in every rebuild from the saved config (export,
    hub, fine-tuning), a different network from the one selected and measured."""
    lost = sorted(_blurred(pruned) - _blurred(clean))
    if lost:
        conv = pruned.get_submodule(lost[0])
        raise PruneError(f"pruning leaves {lost[0]} (stride {max(conv.stride)}) with "
                         f"{conv.in_channels} inputs, too few for model.blurpool's blur (16 or "
                         f"more): the saved network would compute without it"
                         + (f" ({len(lost) - 1} more such layers)" if len(lost) > 1 else "")
                         + f"; {remedy}")


def _check_same_function(pruned: nn.Module, clean: nn.Module, resolution: int) -> None:
    """The network saved (rebuilt from its channel spec) computes what the pruned one does."""
    was_training = pruned.training
    pruned.eval()
    x = torch.randn(2, clean.conv1.in_channels, resolution, resolution,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = pruned(x), clean(x)
    pruned.train(was_training)
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):  # a bug, not a user error
        raise RuntimeError(f"the network rebuilt from the pruned channel spec computes "
                           f"otherwise (max difference {(got - expected).abs().max().item():.3g})")


# --------------------------------------------------------------------------- checkpoints

def check_output(source: str | Path, out: str | Path) -> None:
    """Refuse, before any pruning work, an output path the pruned checkpoint could not be
    written to or that would replace `source`; creates the output's folder.

    Raises:
        PruneError: `out` is `source` (same path after resolving, a symlink to it or a hard
            link), a folder or another non-regular file, or its folder cannot be created or
            written; the message names the path.
    """
    from ..cli import same_file

    named_folder = str(out).endswith(("/", os.sep))  # Path() drops the trailing slash
    source, out = Path(source), Path(out)
    if same_file(source, out):
        raise PruneError(f"output {out} is the source checkpoint {source} itself; writing the "
                         f"pruned network there would lose the trained one: choose another "
                         f"output path")
    if out.is_dir() or named_folder:
        raise PruneError(f"output {out}{os.sep if named_folder else ''} "
                         f"{'is' if out.is_dir() else 'names'} a folder; name the file to "
                         f"write, e.g. {out / 'pruned.pt'}")
    if out.exists() and not out.is_file():
        # save_atomic renames over the path: a device or a pipe would be replaced by a file
        raise PruneError(f"output {out} exists and is not a regular file")
    try:
        check_writable(out, f"output {out}")
    except UserError as e:
        raise PruneError(str(e)) from None


def prune_checkpoint(path: str | Path, out: str | Path, *, target_macs: int | None = None,
                     target_width: float | None = None, importance: str = "l1",
                     scope: str = "global", tolerance: float = 0.05,
                     weights: str = "model") -> PruneResult:
    """Prune the model of a fasttrain checkpoint and write a checkpoint of the pruned network.

    The target is `target_macs`, or the MACs of the same model at `target_width` under the
    uniform width rule (both at the checkpoint's validation resolution). The written checkpoint
    holds `model` (pruned weights), `config` (the source's, with `model.channels` = the pruned
    spec), `versions` and `pruning` (source path, epoch and validation top-1, source and pruned
    MACs/params, target, ratio, importance, scope, the bisection trace). It loads with
    `weights_only=True`; `--model.init_from=OUT` fine-tunes it with any recipe, and
    tools/benchmark.py and tools/export.py accept it like any checkpoint. `weights` picks the
    source's trained weights ("model") or their moving average ("ema").

    The output path is checked (`check_output`) once the checkpoint has been read and before
    the pruning; an existing file at `out` is replaced atomically, never torn.

    Raises:
        CheckpointError: unreadable checkpoint. PruneError: see `prune_to_macs` and
            `check_output`, or `out` cannot be written (the message names it).
    """
    require_torch_pruning()
    if (target_macs is None) == (target_width is None):
        raise PruneError("give exactly one of target_macs and target_width")
    path, state, model, mc, resolution = _read_source(path, out, weights)
    rebuild = _rebuilder(mc)
    if target_width is not None:
        # MACs grow with the width (a pruned network's `width` is its source's, which it is
        # below): a width not below it is no target, and building it (a typo such as 25 for
        # 0.25) could take all the memory there is
        if target_width >= mc["width"]:
            raise PruneError(f"--target-width {target_width:g} is not below the checkpoint's "
                             f"model.width {mc['width']:g}")
        try:
            thinner = rebuild(None, target_width)
        except (ValueError, ConfigError) as e:  # "width 0.001 leaves no channel of base 16"
            raise PruneError(f"--target-width {target_width:g}: {str(e).removeprefix('model: ')}"
                             ) from None
        if mc.get("channels") is None and channels_of(thinner) == channels_of(model):
            raise PruneError(f"--target-width {target_width:g} builds the same channel counts "
                             f"as the checkpoint's model.width {mc['width']:g} (model."
                             f"channel_divisor {mc.get('channel_divisor', 1)} rounds both up "
                             f"alike): nothing to prune; choose a smaller width")
        target_macs = count_macs(thinner, resolution).conv_fc
    result = prune_to_macs(model, int(target_macs), resolution, rebuild, importance=importance,
                           scope=scope, tolerance=tolerance)
    _write_pruned(path, state, mc, result, out, weights,
                  {"target_macs": result.target_macs, "target_width": target_width,
                   "ratio": result.ratio, "tolerance": tolerance,
                   "search": [list(s) for s in result.search], "torch_pruning": _tp_version()})
    return result


def save_pruned(model: nn.Module, source: str | Path, out: str | Path, *, method: str,
                weights: str = "model") -> PruneResult:
    """Write a network pruned by other code from the model of the fasttrain checkpoint
    `source` (Torch-Pruning used directly, or any method that removes channels in place) as
    the pruned checkpoint tools/prune.py would write: `--model.init_from=OUT` fine-tunes it,
    tools/compare.py sets it against its source (Δ top-1, MAC reduction) and the thin
    networks, and benchmark, export, evaluate and torch.hub take it. `method` names the method
    in compare's labels ("<model> w0.5 pruned (<method>, custom)"); `weights` says which of the
    source's weights it was pruned from ("model" or "ema": the baseline top-1).

    The network keeps the fasttrain module structure with fewer channels: its channel spec is
    read (`channels_of`), and the network rebuilt from the spec must take its weights and
    compute what it computes. The returned result's `ratio` is NaN (no search ran).

    Raises:
        CheckpointError: unreadable source. PruneError: not a channel-pruned network of the
            source's model (a module missing, weights that fit no network of its spec, another
            function, no fewer MACs), or `out` cannot be written.
    """
    path, state, source_model, mc, resolution = _read_source(source, out, weights)
    name = mc["name"]
    # checked and saved as a checkpoint holds a network: on the CPU in float32 (a copy: the
    # caller's network stays where and what it is, say bf16 on a GPU)
    model = copy.deepcopy(model).cpu().float()
    try:
        spec = channels_of(model)
        clean = _rebuilder(mc)(spec)
    except (AttributeError, TypeError, ValueError, IndexError) as e:
        raise PruneError(f"the pruned network is not a {name} with channels removed "
                         f"({first_line(e)})") from None
    try:
        clean.load_state_dict(model.state_dict())
    except RuntimeError as e:
        raise PruneError(f"the pruned network's weights do not fit the {name} its channel counts "
                         f"describe ({_size_mismatch(e)}): a layer was pruned out of step with "
                         f"the layers it is coupled to (in CIFAR option-A networks the residual "
                         f"streams cannot be pruned: leave the stem and the blocks' outputs)"
                         ) from None
    _check_blur_kept(model, clean, "prune a network trained without blurpool, or keep 16 "
                                    "or more inputs there")
    clean.eval()
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, clean.conv1.in_channels, resolution, resolution))
    except Exception as e:
        raise PruneError(f"the pruned network fails on a {resolution} px input "
                         f"({first_line(e)})") from None
    try:
        _check_same_function(model, clean, resolution)
    except RuntimeError as e:
        raise PruneError(f"the pruned network is not a channel-pruned {name}: the {name} "
                         f"rebuilt from its channel counts computes otherwise "
                         f"({str(e).rpartition('(')[2].rstrip(')')})") from None
    macs, source_macs = (count_macs(m, resolution).conv_fc for m in (clean, source_model))
    if macs >= source_macs:
        raise PruneError(f"the pruned network has {macs:,} MACs at {resolution} px, not fewer "
                         f"than its source's {source_macs:,}")
    result = PruneResult(clean, spec, math.nan, macs, count_params(clean), source_macs,
                         count_params(source_model), macs, resolution, method, "custom", 0.0)
    _write_pruned(path, state, mc, result, out, weights,
                  {"target_macs": None, "target_width": None, "ratio": None,
                   "tolerance": None, "search": [], "torch_pruning": _installed_tp()})
    return result


def _installed_tp() -> str | None:
    """Torch-Pruning's version where it is installed (the user's pruning may have used it)."""
    try:
        return importlib.metadata.version("torch-pruning")
    except importlib.metadata.PackageNotFoundError:
        return None


def _size_mismatch(e: RuntimeError) -> str:
    """The first size-mismatch line of a load_state_dict error (its first line is a header)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return next((line for line in lines if "size mismatch" in line or "Missing" in line),
                lines[0] if lines else "")


def _read_source(path: str | Path, out: str | Path, weights: str):
    """(path, state, model, model_config, resolution) of the checkpoint to prune, `out`
    checked as an output; a pruned network not trained since is refused."""
    from ..engine import checkpoint as ckpt
    from ..export import model_from_checkpoint

    path = Path(path)
    state = ckpt.load(path)
    model, meta = model_from_checkpoint(path, weights=weights, state=state)
    if state.get("pruning") and not state.get("train_state"):
        # Its record would name this intermediate network as the source: no top-1, and the
        # MAC reduction and accuracy change measured against it, not the trained network.
        record = state["pruning"]
        raise PruneError(f"{path} is a pruned network not trained since ({record.get('source')} "
                         f"pruned to {record.get('macs')} MACs): prune that source to the new "
                         f"target instead, or fine-tune this one first")
    check_output(path, out)
    resolution = meta["input_size"][1]
    with torch.no_grad():
        # NaN weights failed the check that the pruned network computes what the rebuilt one
        # does (NaN is never close to NaN): a traceback blaming pruning for a diverged run.
        x = torch.randn(2, *meta["input_size"], generator=torch.Generator().manual_seed(0))
        if not torch.isfinite(model.eval()(x)).all():
            raise PruneError(f"{path}: the network's own output is not finite (NaN or inf "
                             f"weights or BatchNorm statistics: a diverged run?); nothing was "
                             f"pruned")
    return path, state, model, dict(meta["model_config"]), resolution


def _rebuilder(mc: dict[str, Any]) -> Callable[..., nn.Module]:
    """The model section `mc` (num_classes resolved) built with a channel spec or a width."""
    from ..config import ModelConfig
    from ..engine.loop import build_model

    known = {f.name for f in dataclasses.fields(ModelConfig)}

    def rebuild(channels: dict[str, Any] | None, width: float | None = None) -> nn.Module:
        cfg = ModelConfig(**{k: v for k, v in mc.items() if k in known})
        cfg.channels, cfg.init_from = channels, ""
        if width is not None:
            cfg.width = width
        return build_model(cfg, cfg.num_classes)

    return rebuild


def _write_pruned(path: Path, state: dict[str, Any], mc: dict[str, Any], result: PruneResult,
                  out: str | Path, weights: str, search: dict[str, Any]) -> None:
    """The pruned checkpoint: `model` (pruned weights), `config` (the source's, with
    `model.channels`), `versions` and the `pruning` record (source, counts, how it was found:
    `search`)."""
    from ..engine import checkpoint as ckpt

    config = copy.deepcopy(state["config"])
    config["model"] = {**config["model"], "channels": result.channels, "init_from": "",
                       "num_classes": mc["num_classes"]}
    metrics = state.get("metrics") or {}
    source_top1 = metrics.get("val_top1_ema" if weights == "ema" else "val_top1")
    train_state = state.get("train_state") or {}
    # The epoch whose validation gave source_val_top1: a checkpoint cut inside an epoch
    # (train.max_steps) validated that partial epoch, which train_state does not count.
    record = {"source": str(path.resolve()),
              "source_epoch": metrics.get("epoch", train_state.get("epoch")),
              "source_step": train_state.get("step"),
              "source_val_top1": source_top1, "source_model": mc["name"],
              "source_width": mc["width"], "source_channels": mc.get("channels"),
              # a source fine-tuned from a pruned network: that pruning, and its own source's
              "source_pruning": (state.get("pruned_from")
                                 if isinstance(state.get("pruned_from"), dict) else None),
              "source_macs": result.source_macs, "source_params": result.source_params,
              "macs": result.macs, "params": result.params, "resolution": result.resolution,
              "source_weights": weights, "importance": result.importance,
              "scope": result.scope, **search,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    versions = {**(state.get("versions") or {}), "torch": str(torch.__version__),
                "prune_commit": git_commit()}
    out = Path(out)
    try:
        ckpt.save_atomic({"model": result.model.state_dict(), "config": config, "metrics": {},
                          "versions": versions, "pruning": record,
                          "classes": state.get("classes")}, out)
    except OSError as e:  # disk full, or the folder changed since check_output
        raise PruneError(f"output {out}: cannot write the pruned checkpoint "
                         f"({e.strerror or e})") from None
