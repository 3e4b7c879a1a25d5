"""The one typed configuration: dataclass sections, YAML recipes, `--section.key=value` overrides.

`load(path, overrides)` is the only place that reads YAML or argv. A recipe may name one `base:`
recipe (a path relative to itself) whose values it overrides, section by section. Every value is
checked against its field's type and range before any work starts; a problem raises `ConfigError`
whose one-line message names the file (or override), the key and the value.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import operator
import re
import reprlib
import shlex
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import ConfigError, one_line

# YAML 1.1 (PyYAML) reads a float only with a dot, so `lr: 1e-3` would be the string '1e-3';
# this is YAML 1.2's float, which is what anyone writing a learning rate means.
_FLOAT_1_2 = re.compile(r'''^(?:
     [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$''', re.X)


# YAML 1.1 (PyYAML) reads `010` as octal 8, `1:20` as sexagesimal 80 and `off`, `no`, `y`
# as booleans (`name: no` would be False); YAML 1.2's core schema reads decimal digits as a
# decimal integer (underscores allowed, as in Python), 0o/0x as octal/hex, and only
# true/false as booleans.
_INT_1_2 = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$")
_BOOL_1_2 = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


def _construct_int_1_2(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    try:
        if text[:2] in ("0o", "0x"):
            return int(text[2:], 8 if text[1] == "o" else 16)
        return int(text, 10)
    except ValueError:
        raise yaml.constructor.ConstructorError(
            None, None, f"not a YAML 1.2 integer: {text!r}", node.start_mark) from None


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"line {line}: duplicate key {key!r}")
        self.key, self.line = key, line


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader with YAML 1.2 numbers and booleans, refusing duplicate keys
    (PyYAML keeps the last one silently, so `lr: 0.1` followed by `lr: 0.5` would train at
    0.5 unnoticed)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` may be overridden, by design
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            except TypeError:  # unhashable: the base class reports it
                pass
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """Quotes strings that `_Loader` would read as floats (a run named 1e3), so `dump`
    round-trips."""


def _add_yaml_1_2_scalars(cls: type, replace: bool) -> None:
    """Add YAML 1.2's (core schema) implicit float, int and bool resolvers to `cls`,
    replacing YAML 1.1's int and bool ones when `replace`. `_Dumper` keeps both, so it quotes
    every string either would read as a number or a boolean (a run named 0o17, or off: a
    dumped recipe is read the same by `_Loader` and by other YAML 1.1 tools)."""
    if replace:
        replaced = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:bool")
        cls.yaml_implicit_resolvers = {
            first: [(tag, regexp) for tag, regexp in resolvers if tag not in replaced]
            for first, resolvers in cls.yaml_implicit_resolvers.items()}
    cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))
    cls.add_implicit_resolver("tag:yaml.org,2002:int", _INT_1_2, list("-+0123456789"))
    cls.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL_1_2, list("tTfF"))


_add_yaml_1_2_scalars(_Loader, replace=True)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int_1_2)
_add_yaml_1_2_scalars(_Dumper, replace=False)


def _f(default: Any, help: str = "", **bounds: Any) -> Any:
    """A field with a default, a help text and optional bounds (ge, gt, le, lt, len)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d),
                     metadata={"help": help, **bounds})
    return field(default=default, metadata={"help": help, **bounds})


# Upper bounds of sizes a typo can make absurd: past them torch allocates until the process is
# killed (a 100000 px crop, 10^8 classes) or the machine forks thousands of workers.
MAX_RESOLUTION = 8192
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841
MAX_WORKERS = 1024
# Global batches: 64k is the largest ImageNet batch published (LARS/LAMB); 10**30 overflowed
# torch's samplers in a traceback after the first training step.
MAX_BATCH = 1 << 24


class _Keys:
    """Attribute assignment limited to the declared keys: `cfg.model.widht = 0.5` (a typo in a
    notebook) was kept as a stray attribute that train() never read, training the recipe's
    width without a word. A section of Config must be its section's class (a dict put there
    read as a recipe's partial section, every other key at its default)."""

    def __setattr__(self, name: str, value: Any) -> None:
        fields = self.__dataclass_fields__  # type: ignore[attr-defined]
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            raise AttributeError(f"{type(self).__name__} has no key {name!r}"
                                 + (f" (did you mean {close[0]!r}?)" if close else ""))
        section = fields[name].default_factory
        if isinstance(section, type) and issubclass(section, _Keys) and \
                not isinstance(value, section):
            raise TypeError(f"{type(self).__name__}.{name} must be a {section.__name__}, got "
                            f"{type(value).__name__}")
        object.__setattr__(self, name, value)


@dataclass
class DataConfig(_Keys):
    dataset: Literal["digits", "imagefolder", "cifar10"] = _f(
        "digits", "digits: built-in UCI digits as JPEGs; imagefolder: path/{train,val}/CLASS/*; "
        "cifar10: torchvision's cifar-10-batches-py")
    path: str = _f("", "dataset root; empty = $FASTTRAIN_DATA/<dataset> (default "
                   "$FASTTRAIN_CACHE/data/<dataset>, ~/.cache/fasttrain/data/<dataset>)")
    download: bool = _f(True, "cifar10: download when the files are missing")
    backend: Literal["torch", "ffcv", "dali", "resident"] = _f(
        "torch", "torch: DataLoader workers decoding with libjpeg-turbo/torchvision.io; ffcv: .beton files "
        "written by tools/write_ffcv.py; dali: NVIDIA DALI pipeline over the image folders "
        "(nvJPEG on GPU, CPU otherwise); resident: the whole set decoded once and kept on the "
        "device, augmented with batched tensor ops (small data sets)")
    ffcv_dir: str = _f("", "ffcv: folder holding train.beton and val.beton; empty = "
                       "<dataset root>/ffcv")
    ffcv_order: Literal["random", "quasi_random"] = _f(
        "random", "ffcv: sample order; quasi_random reads the file in chunks (for files larger "
        "than RAM; single process only, FFCV does not support it with distributed=True)")
    ffcv_os_cache: bool = _f(True, "ffcv: read through the OS page cache (file fits in RAM); "
                             "false = FFCV's own page reader")
    ffcv_resize: Literal["torch", "opencv"] = _f(
        "torch", "ffcv: torch = training crops resized by torch's antialiased bilinear kernel "
        "(the torch backend's pixels, ~4x faster) and validation as the torch backend's "
        "(shorter side to val_resize, center crop); opencv = FFCV's own: crops resized with "
        "OpenCV INTER_AREA, validation by FFCV's center-crop decoder (ffcv-imagenet's "
        "pipeline)")
    region_decode: bool = _f(
        True, "torch and ffcv backends, RandomResizedCrop: decode only the crop box of each JPEG "
        "(libjpeg-turbo region decoding, DCT-domain downscaling while the box stays at least "
        "twice the output) instead of the whole image; needs the decoder setup.py builds "
        "(fasttrain.data.jpeg), whole images are decoded without it")
    batch_size: int = _f(256, "global training batch, split evenly across ranks", ge=1,
                         le=MAX_BATCH)
    val_batch_size: int = _f(0, "global validation batch; 0 = batch_size", ge=0, le=MAX_BATCH)
    num_workers: int = _f(4, "per rank: torch = DataLoader worker processes (0 = in the main "
                          "process); ffcv = decoding threads, resident = threads of the one-time "
                          "decode (0 = one per core); dali = DALI CPU threads (0 = 1)", ge=0,
                          le=MAX_WORKERS)
    train_res: int = _f(224, "training crop size (pixels)", ge=1, le=MAX_RESOLUTION)
    val_res: int = _f(224, "validation center-crop size", ge=1, le=MAX_RESOLUTION)
    val_resize: int = _f(256, "validation resize of the shorter side before the crop", ge=1,
                         le=MAX_RESOLUTION)
    mean: list[float] = _f([0.485, 0.456, 0.406], "per-channel mean (0..1 scale)", len=3)
    std: list[float] = _f([0.229, 0.224, 0.225], "per-channel std (0..1 scale)", len=3, gt=0)
    ra_reps: int = _f(1, "repeated augmentation: an epoch (its length kept) holds about "
                      "1/ra_reps of the images, each this many times, differently augmented "
                      "and spread over ranks and micro-batches; 1 = off", ge=1, le=64)
    min_res: int = _f(0, "progressive resizing: training resolution up to start_ramp; "
                      "0 = off (train_res throughout)", ge=0, le=MAX_RESOLUTION)
    max_res: int = _f(0, "progressive resizing: resolution from end_ramp on", ge=0,
                      le=MAX_RESOLUTION)
    start_ramp: int = _f(0, "progressive resizing: last epoch at min_res", ge=0)
    end_ramp: int = _f(0, "progressive resizing: first epoch at max_res", ge=0)


@dataclass
class AugConfig(_Keys):
    train_crop: Literal["random_resized", "pad_random"] = _f(
        "random_resized", "random_resized: RandomResizedCrop(train_res, scale, ratio); "
        "pad_random: pad by `padding` then a random train_res crop (CIFAR style)")
    scale: list[float] = _f([0.08, 1.0], "RandomResizedCrop area range", len=2, gt=0, le=1)
    ratio: list[float] = _f([0.75, 4.0 / 3.0], "RandomResizedCrop aspect range", len=2, gt=0)
    padding: int = _f(4, "pad_random: pixels of zero padding on each side", ge=0, le=256)
    hflip: float = _f(0.5, "probability of a horizontal flip", ge=0, le=1)
    auto_augment: Literal["none", "trivialaugment", "randaugment"] = _f(
        "none", "per-image policy after crop and flip (TrivialAugmentWide or RandAugment)")
    auto_augment_interpolation: Literal["bilinear", "nearest"] = _f(
        "bilinear", "resampling of the policy's rotate, shear and translate (torchvision's "
        "reference recipe passes its bilinear; nearest is the transforms' own default)")
    randaug_ops: int = _f(2, "RandAugment: operations per image", ge=1, le=16)
    randaug_magnitude: float = _f(9.0, "RandAugment: magnitude level out of 10 (timm scale)",
                                  ge=0, le=10)
    randaug_magnitude_std: float = _f(0.0, "RandAugment: std of the per-op magnitude noise", ge=0)
    randaug_prob: float = _f(1.0, "RandAugment: probability that each drawn operation is applied "
                             "(torchvision: 1; timm's rand-m*: 0.5)", ge=0, le=1)
    random_erase: float = _f(0.0, "probability of random erasing (filled with the mean colour)",
                             ge=0, le=1)
    mixup_alpha: float = _f(0.0, "mixup Beta(alpha, alpha); 0 = off", ge=0)
    cutmix_alpha: float = _f(0.0, "cutmix Beta(alpha, alpha); 0 = off (with both on, one is "
                             "chosen at random per batch)", ge=0)
    mix_prob: float = _f(1.0, "probability that a batch is mixed at all", ge=0, le=1)
    test_flip: bool = _f(False, "validation averages the logits of the image and its mirror")


MAX_WIDTH = 16
"""Upper bound of `model.width` (and of the benchmark tools' widths): it stops a typo such as
100 before torch allocates until the process is killed."""


@dataclass
class ModelConfig(_Keys):
    name: str = _f("thin_resnet50", "a name from fasttrain.models.list_models()")
    # Upper bounds: beyond them the allocation fails deep inside torch, not with a message.
    # Wide ResNets go to 10, the thinning paper stays <= 1.
    width: float = _f(1.0, "uniform width multiplier of every layer", gt=0, le=MAX_WIDTH)
    channel_divisor: int = _f(1, "round the base width up to a multiple of this", ge=1, le=512)
    num_classes: int = _f(0, "classifier outputs; 0 = the dataset's class count", ge=0,
                          le=MAX_CLASSES)
    zero_init_residual: bool = _f(True, "zero the last norm weight of each residual block")
    shortcut: Literal["A", "B"] = _f("A", "CIFAR ResNets: A = parameter-free, B = 1x1 conv")
    norm_act: Literal["native", "fused"] = _f("native", "norm+ReLU implementation")
    drop_path_rate: float = _f(0.0, "stochastic depth: drop rate of the last block (linear in "
                               "block index from 0)", ge=0, lt=1)
    blurpool: bool = _f(False, "blur (3x3 binomial) before every strided conv with >= 16 inputs")
    channels: Optional[dict] = _f(None, "explicit channel counts of every layer ({stem, stages: "
                                  "[{out, blocks}]}, see fasttrain.models.resnet), e.g. a "
                                  "pruned network's; null = the width rule")
    init_from: str = _f("", "start from this checkpoint (tools/prune.py output or any fasttrain "
                        "checkpoint): its architecture (name, width, channel_divisor, "
                        "num_classes, shortcut, channels) replaces this section's and its "
                        "weights are loaded; optimizer and schedule start fresh")


@dataclass
class OptimConfig(_Keys):
    name: Literal["sgd", "lamb"] = _f("sgd", "optimizer")
    lr: float = _f(0.1, "peak learning rate for the global batch", gt=0)
    lr_reference_batch: int = _f(0, "linear scaling rule: lr is for this global batch and is "
                                 "scaled by data.batch_size / this; 0 = off", ge=0)
    momentum: float = _f(0.9, "SGD momentum", ge=0, lt=1)
    nesterov: bool = _f(False, "Nesterov momentum")
    betas: list[float] = _f([0.9, 0.999], "LAMB moment decay rates", len=2, ge=0, lt=1)
    eps: float = _f(1e-6, "LAMB denominator epsilon", gt=0)
    max_grad_norm: float = _f(0.0, "clip the global gradient norm to this; 0 = off", ge=0)
    weight_decay: float = _f(1e-4, "L2 weight decay (decoupled inside LAMB's update)", ge=0)
    decay_norm_and_bias: bool = _f(False, "also decay 1-D tensors (norm weights, biases)")
    loss: Literal["ce", "bce"] = _f("ce", "ce: softmax cross-entropy; bce: per-class binary "
                                    "cross-entropy on (mixed) one-hot targets (RSB)")
    label_smoothing: float = _f(0.0, "label smoothing", ge=0, lt=1)
    bce_target_thresh: float = _f(0.0, "bce: targets above this become 1, others 0; 0 = off",
                                  ge=0, lt=1)


@dataclass
class ScheduleConfig(_Keys):
    epochs: int = _f(90, "training epochs", ge=1)
    kind: Literal["cosine", "step", "constant", "triangular"] = _f(
        "cosine", "LR shape after warmup; triangular: linear from 1e-4 x lr to lr at "
        "peak_epoch, then linear to 0 at the end (ffcv-imagenet 'cyclic'; no warmup)")
    peak_epoch: float = _f(2.0, "triangular: epoch of the peak LR (< epochs)", ge=0)
    warmup_epochs: float = _f(0.0, "linear warmup length (may be fractional)", ge=0)
    warmup_start_factor: float = _f(0.01, "LR factor at the first warmup step", gt=0, le=1)
    min_lr_factor: float = _f(0.0, "cosine: final LR as a fraction of the peak", ge=0, le=1)
    cosine_span: Literal["after_warmup", "whole_run"] = _f(
        "after_warmup", "cosine: after_warmup = the cosine starts at the end of warmup "
        "(torchvision); whole_run = it spans every epoch and warmup replaces its start "
        "(timm's default, warmup_prefix=False)")
    milestones: list[int] = _f([30, 60, 80], "step: epochs at which the LR is multiplied by "
                               "gamma (increasing)", ge=0)
    gamma: float = _f(0.1, "step: LR factor at each milestone", gt=0)


@dataclass
class TrainConfig(_Keys):
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto = CUDA when available")
    precision: Literal["bf16", "fp16", "fp32"] = _f("bf16", "autocast dtype (fp16 adds a GradScaler)")
    channels_last: bool = _f(True, "NHWC memory format for model and inputs")
    compile: Optional[bool] = _f(None, "torch.compile the model; null = on for CUDA, off for CPU")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = _f(
        "default", "torch.compile mode; reduce-overhead replays the compiled kernels as CUDA "
        "graphs (thin networks: launches cost more than the kernels)")
    # torch.manual_seed takes up to 2**64 - 1; the signed range fits every int64 consumer.
    seed: int = _f(0, "seed of weights, shuffling and augmentation", ge=0, le=2**63 - 1)
    # Each is an OS thread: a typo like 100000 fails with "can't start new thread" otherwise.
    threads: int = _f(0, "CPU intra-op threads per rank; 0 = cores / local ranks", ge=0,
                      le=4096)
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step (the global batch and its "
                               "LR stay the recipe's on fewer devices)", ge=1)
    sync_bn: bool = _f(False, "BatchNorm statistics over all ranks (torch.nn.SyncBatchNorm + "
                       "ReLU, in place of model.norm_act's layers); CUDA, 2+ ranks")
    ema: bool = _f(False, "keep an exponential moving average of the weights, validated too")
    ema_decay: float = _f(0.99998, "EMA decay per image-batch step: 1 - decay is scaled by "
                          "global batch x ema_steps / epochs (torchvision reference)", ge=0,
                          lt=1)
    ema_steps: int = _f(32, "update the EMA every this many optimizer steps", ge=1)
    max_steps: int = _f(0, "stop after this many optimizer steps (smoke tests); 0 = all", ge=0)
    checkpoint_every: int = _f(0, "also checkpoint every this many optimizer steps (a resume "
                               "continues inside the epoch); 0 = at epoch ends only", ge=0)
    deterministic: bool = _f(False, "deterministic kernels (torch.use_deterministic_algorithms)"
                             "; with fixed threads a CPU run is then bit-reproducible")


@dataclass
class LogConfig(_Keys):
    dir: str = _f("runs", "where run directories are created")
    name: str = _f("", "run directory name (a plain folder name under log.dir); empty = "
                   "<recipe stem>-<timestamp>")
    interval: int = _f(50, "steps between progress updates (each one syncs the device)", ge=1)
    progress: Literal["auto", "rich", "plain"] = _f("auto", "auto = rich on a terminal")
    tensorboard: bool = _f(False, "also write TensorBoard scalars to <run>/tensorboard")


@dataclass
class Config(_Keys):
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS: list[str] = [f.name for f in dataclasses.fields(Config)]


def model_bound_exceeded(values: dict[str, Any]) -> str | None:
    """The first ModelConfig upper bound a number in `values` (model keyword arguments) goes
    past, as "key=value: must be <= top", else None (inf and NaN are the model's to refuse,
as not finite). For callers that build a model without a
    config (torch.hub, export.model_from_name): a typo (100 for width 1.0, 10**9 classes)
    allocated gigabytes before failing; types and lower bounds the model checks itself."""
    for f in dataclasses.fields(ModelConfig):
        top, value = f.metadata.get("le"), values.get(f.name)
        if top is not None and isinstance(value, (int, float)) and \
                not isinstance(value, bool) and math.isfinite(value) and value > top:
            return f"{f.name}={value}: must be <= {top:,}"
    return None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin is list:
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}[
            typing.get_args(tp)[0]]
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a mapping"}[tp]


def _coerce(tp: Any, value: Any) -> Any:
    """Return `value` as type `tp`, or raise TypeError (no silent conversions but int → float)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            raise TypeError
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(inner, value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        (inner,) = typing.get_args(tp)
        return [_coerce(inner, v) for v in value]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is dict and isinstance(value, dict):  # structure checked by its consumer
        return value
    raise TypeError


def _check_bounds(meta: dict[str, Any], value: Any) -> str | None:
    """The first bound `value` violates, as text, or None."""
    if value is None:
        return None
    if "len" in meta and len(value) != meta["len"]:
        return f"must have {meta['len']} elements"
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, float) and not math.isfinite(v):  # YAML's .inf / .nan, argv's inf
            return "must be a finite number"
        # int against int exactly: as floats, 2**63 would pass `le=2**63 - 1`.
        for key, op, word in (("ge", operator.ge, ">="), ("gt", operator.gt, ">"),
                              ("le", operator.le, "<="), ("lt", operator.lt, "<")):
            if key in meta and not op(v, meta[key]):
                return f"must be {word} {meta[key]}"
    return None


def _bounds_text(meta: dict[str, Any]) -> str:
    words = [f"{word} {meta[key]}" for key, word in (("ge", ">="), ("gt", ">"), ("le", "<="),
                                                     ("lt", "<")) if key in meta]
    if "len" in meta:
        words.insert(0, f"{meta['len']} elements")
    return ", ".join(words)


def describe(cfg: Config | None = None) -> list[str]:
    """One line per key: `section.key = value  (type[; bounds])  help`, where value is
    `cfg`'s (default: the built-in defaults) in recipe YAML syntax. This is what
    `tools/train.py --keys [RECIPE]` prints."""
    cfg = cfg or Config()
    lines = []
    for section in SECTIONS:
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = yaml.dump(getattr(obj, f.name), Dumper=_Dumper, default_flow_style=True,
                              width=math.inf).strip().removesuffix("\n...").strip()
            kind = _type_name(hints[f.name])
            bounds = _bounds_text(dict(f.metadata))
            lines.append(f"{section}.{f.name} = {value}  ({kind}{'; ' + bounds if bounds else ''})"
                         f"  {f.metadata.get('help', '')}".rstrip())
    return lines


def _read_yaml(path: Path, chain: tuple[Path, ...] = (),
               origins: dict[tuple[Any, Any], str] | None = None) -> dict[str, Any]:
    """Read a recipe and its `base:` ancestors, merged section by section (child wins).

    `origins`, when given, is filled with the file each value comes from: (section, key) ->
    path, and (section, None) -> the file that last gave the section, so that an error in a
    base file names that file, not the recipe that names it."""
    origins = {} if origins is None else origins
    if path.resolve() in chain:
        raise ConfigError(f"{path}: base: cycle through {' -> '.join(map(str, chain))}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read recipe: {e.strerror}") from None
    except UnicodeDecodeError as e:  # e.g. a checkpoint given where the recipe goes
        raise ConfigError(f"{path}: not a text (YAML) recipe file (byte "
                          f"0x{e.object[e.start]:02x} at offset {e.start} is not UTF-8)") from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.reader.ReaderError as e:  # valid UTF-8 but control characters: still binary
        raise ConfigError(f"{path}: not a text (YAML) recipe file (character "
                          f"#x{e.character:04x} at offset {e.position})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML: "
                          f"{getattr(e, 'problem', None) or e}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, "
                          f"got {type(raw).__name__}")
    base = raw.pop("base", None)
    merged: dict[str, Any] = {}
    if base is not None:
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{path}: base: must be a recipe file's path, got {_shown(base)}")
        base_path = path.parent / Path(base).expanduser()  # `~/recipes/x.yaml` as a shell would
        if not base_path.is_file():
            why = "is a directory" if base_path.is_dir() else "recipe file not found"
            raise ConfigError(f"{path}: base: {base}: {why} ({base_path})")
        merged = _read_yaml(base_path, chain + (path.resolve(),), origins)
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
            for stale in [k for k in origins if k[0] == section]:  # the base's, replaced
                del origins[stale]
        origins[(section, None)] = str(path)
        if isinstance(values, dict):
            origins.update({(section, key): str(path) for key in values})
    return merged


_SHOWN = reprlib.Repr()  # attributes, not arguments: Python 3.11's takes none
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict = 2, 6, 6
_SHOWN.maxstring = _SHOWN.maxother = 120


def _shown(value: Any) -> str:
    """A value as an error message shows it: repr, cut short (a YAML of nested aliases
    is a few lines whose full repr has billions of elements)."""
    return _SHOWN.repr(value)


def _suggest(name: str, options: list[str]) -> str:
    # compared in lower case: `optim.LR` or `Optim` is as close to its key as a typo
    lowered = {option.lower(): option for option in options}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else ""


def _set(cfg: Config, origin: str, section: str, key: str, value: Any) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"{origin}: unknown section {section!r}{_suggest(section, SECTIONS)}"
                          f"; sections: {', '.join(SECTIONS)}")
    obj = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if key not in fields:
        raise ConfigError(f"{origin}: unknown key {one_line(f'{section}.{key}')}"
                          f"{_suggest(key, list(fields))}")
    tp = typing.get_type_hints(type(obj))[key]
    try:
        coerced = _coerce(tp, value)
    except TypeError:
        raise ConfigError(f"{origin}: {section}.{key} must be {_type_name(tp)}, "
                          f"got {_shown(value)}") from None
    problem = _check_bounds(dict(fields[key].metadata), coerced)
    if problem:
        raise ConfigError(f"{origin}: {section}.{key} {problem}, got {_shown(value)}")
    texts = coerced if isinstance(coerced, (list, tuple)) else [coerced]
    if any(isinstance(text, str) and "\0" in text for text in texts):
        # no path, name or choice holds one: os functions raise "embedded null byte" later
        raise ConfigError(f"{origin}: {section}.{key} contains a NUL character, "
                          f"got {_shown(value)}")
    setattr(obj, key, coerced)


def parse_override(arg: str, following: str | None = None) -> tuple[str, str, Any]:
    """`--section.key=value` → (section, key, value); the value is parsed as YAML (safe).
    `following`: the argument after `arg`, named in the error when `arg` lacks its `=`
    (`--optim.lr 0.2`, the form argparse options take)."""
    body = arg[2:] if arg.startswith("--") else arg
    name, sep, text = body.partition("=")
    section, dot, key = name.partition(".")
    if not (sep and dot and section and key):
        hint = ""
        if not sep and dot and section and key and following is not None \
                and not following.startswith("--"):
            hint = f" (write {arg}={shlex.quote(following)})"
        raise ConfigError(f"override {arg!r}: expected --section.key=value{hint}")
    try:
        value = yaml.load(text, Loader=_Loader) if text.strip() else ""
    except _DuplicateKey as e:
        raise ConfigError(f"{one_line(arg)}: duplicate key {e.key!r}") from None
    except yaml.YAMLError:
        value = text
    return section, key, value


def _text_for_text_keys(arg: str, section: str, key: str, value: Any) -> tuple[str, str, Any]:
    """A text key's override as typed: YAML reads `--log.name=2024-01-01` as a date and `123`
    as a number, which the key would refuse although the user typed a name, and `exp #2` as
    `exp` (a comment), `'a'` as `a`: another run folder than the one typed. A choice's value
    as typed too, less surrounding spaces (none is part of a choice)."""
    obj = getattr(Config(), section, None)
    if obj is not None and dataclasses.is_dataclass(obj):
        tp = typing.get_type_hints(type(obj)).get(key)
        if tp is str:
            return section, key, arg.partition("=")[2]
        if (typing.get_origin(tp) is Literal
                and all(isinstance(a, str) for a in typing.get_args(tp))):
            return section, key, arg.partition("=")[2].strip()
    return section, key, value


def load(path: str | Path | None, overrides: list[str] = (), *,
         require_data_path: bool = True) -> Config:
    """Build a validated `Config` from a recipe file (or defaults) and `--section.key=value` args.

    Args:
        require_data_path: False to accept an ImageFolder recipe without `data.path` (to list
            its keys; a run needs the path).

    Raises:
        ConfigError: one line naming the file or override, the key and the value.
    """
    origins: dict[tuple[Any, Any], str] = {}
    mapping = _read_yaml(Path(path), origins=origins) if path is not None else {}
    return load_mapping(mapping, str(path) if path is not None else "config", overrides,
                        require_data_path=require_data_path, origins=origins)


def load_mapping(mapping: dict[str, Any], origin: str, overrides: list[str] = (), *,
                 require_data_path: bool = True,
                 origins: dict[tuple[Any, Any], str] | None = None) -> Config:
    """`load` of sections already read (a checkpoint's stored `config`): every key checked as
    a recipe's, errors naming `origin` (or the file `origins` gives for a section or key: a
    recipe's `base:` file; cross-key errors name `origin`).

    Raises:
        ConfigError: one line naming `origin` or the override, the key and the value.
    """
    if not isinstance(mapping, dict):
        raise ConfigError(f"{origin}: a config must be a mapping of sections, got "
                          f"{type(mapping).__name__}")
    cfg = Config()
    origins = origins or {}
    for section, values in mapping.items():
        where = origins.get((section, None), origin)
        # checked before the values: an unknown section with no keys (`optimm: {}`) is a typo
        # too, and a key that is not text (`1:`) has no suggestion
        if not isinstance(section, str) or section not in SECTIONS:
            close = _suggest(section, SECTIONS) if isinstance(section, str) else ""
            raise ConfigError(f"{where}: unknown section {_shown(section)}{close}; sections: "
                              f"{', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping, "
                              f"got {_shown(values)}")
        for key, value in values.items():
            _set(cfg, origins.get((section, key), where), section, str(key), value)
    recipe = copy.deepcopy(cfg)
    overrides = list(overrides)
    parsed = [(arg, *_text_for_text_keys(arg, *parse_override(arg, following)))
              for arg, following in zip(overrides, overrides[1:] + [None])]
    for arg, section, key, value in parsed:  # in order: a later override of a key wins
        _set(cfg, one_line(arg), section, key, value)  # one line: a value may hold a newline
    try:
        _check_consistency(cfg, origin, require_data_path)
    except ConfigError as e:
        blamed = _blame(e, recipe, parsed, origin, require_data_path)
        if blamed == origin:
            raise
        raise ConfigError(blamed + str(e).removeprefix(origin)) from None
    return cfg


def _blame(error: ConfigError, recipe: Config, parsed: list[tuple[str, str, str, Any]],
           origin: str, require_data_path: bool = True) -> str:
    """Who a cross-key `error` should name: the overrides that set a key its message names,
    alone when the recipe by itself is consistent (then they caused it), else together with the
    recipe; the recipe alone when no override touched those keys."""
    message = str(error).removeprefix(origin)
    named = [arg for arg, section, key, _ in parsed
             if re.search(rf"(?<![\w.]){re.escape(section)}\.{re.escape(key)}(?!\w)", message)]
    if not named:
        return origin
    try:
        _check_consistency(recipe, origin, require_data_path)
    except ConfigError:
        return f"{origin} with {one_line(' '.join(named))}"
    return one_line(" ".join(named))


def _check_consistency(cfg: Config, origin: str, require_data_path: bool = True) -> None:
    """Checks that involve several keys (and text keys that may not be empty)."""
    if not cfg.log.dir.strip():  # Path("") is the current folder: runs landed there
        raise ConfigError(f"{origin}: log.dir must name a folder (empty: an unset shell "
                          f"variable?), got {_shown(cfg.log.dir)}")
    name = cfg.log.name
    if name and (name in (".", "..") or "/" in name or "\\" in name
                 or one_line(name) != name):
        # A path would put the run into any existing folder (`..` is log.dir's parent), over
        # a config.yaml that is not a run's.
        raise ConfigError(f"{origin}: log.name must be a plain folder name (no path separator, "
                          f"not . or .., no control character; log.dir says where runs go), got "
                          f"{_shown(name)}")
    m = cfg.model
    # Only the CIFAR ResNets have a shortcut choice (ImageNet ResNets always project), so on
    # another model B would be silently ignored. (model.init_from replaces these keys.)
    if m.shortcut != "A" and not m.name.startswith("cifar_") and not m.init_from:
        raise ConfigError(f"{origin}: model.shortcut={m.shortcut} applies to the cifar_resnet* "
                          f"models only (model.name={m.name} always projects); remove it")
    if m.channels is not None and not m.init_from:
        _check_channels(m, origin)
    if cfg.aug.scale[0] > cfg.aug.scale[1]:
        raise ConfigError(f"{origin}: aug.scale must be [low, high], got {cfg.aug.scale}")
    if cfg.aug.ratio[0] > cfg.aug.ratio[1]:
        raise ConfigError(f"{origin}: aug.ratio must be [low, high], got {cfg.aug.ratio}")
    if cfg.schedule.warmup_epochs > cfg.schedule.epochs:
        raise ConfigError(f"{origin}: schedule.warmup_epochs must be <= schedule.epochs "
                          f"({cfg.schedule.epochs}), got {cfg.schedule.warmup_epochs}")
    if cfg.data.dataset == "imagefolder" and not cfg.data.path and require_data_path:
        raise ConfigError(f"{origin}: data.path is required for data.dataset=imagefolder "
                          f"(an ImageNet-layout folder: see README, 'Preparing ImageNet')")
    d = cfg.data
    if d.min_res and not (d.max_res >= d.min_res and d.end_ramp >= d.start_ramp):
        raise ConfigError(f"{origin}: progressive resizing needs data.max_res >= data.min_res "
                          f"and data.end_ramp >= data.start_ramp, got min_res={d.min_res} "
                          f"max_res={d.max_res} start_ramp={d.start_ramp} "
                          f"end_ramp={d.end_ramp}")
    _check_backend(cfg, origin)
    s = cfg.schedule
    if s.kind == "triangular" and s.warmup_epochs:
        raise ConfigError(f"{origin}: schedule.kind=triangular has its own ramp; set "
                          f"schedule.warmup_epochs to 0, got {s.warmup_epochs}")
    # Past the end, the triangle never comes down (and the LR ends at its peak).
    if s.kind == "triangular" and s.peak_epoch >= s.epochs:
        raise ConfigError(f"{origin}: schedule.peak_epoch must be < schedule.epochs "
                          f"({s.epochs}) for schedule.kind=triangular, got {s.peak_epoch}")
    # Milestones past the end are allowed (a run cut short of its recipe's length keeps the
    # recipe's milestones); out of order they would be a typo.
    if s.kind == "step" and any(b <= a for a, b in zip(s.milestones, s.milestones[1:])):
        raise ConfigError(f"{origin}: schedule.milestones must be increasing for "
                          f"schedule.kind=step, got {s.milestones}")


def _check_channels(m: ModelConfig, origin: str) -> None:
    """`model.channels` checked against `model.name`'s depth and block type when the config is
    read, like every other key (a bad spec was refused only when the model was built, past
    `--keys`, without the file or override it came from). The network is built on the meta
    device: the check is the model's own, and nothing is allocated."""
    import torch  # here, not at the top: a config without explicit channels needs no torch

    from .models import create_model, list_models

    if m.name not in list_models():  # the model build names an unknown model
        return
    try:
        with torch.device("meta"):
            create_model(m.name, channels=m.channels)
    except ValueError as e:
        raise ConfigError(f"{origin}: model.{e}") from None


# What each data backend implements beyond crop + flip + normalisation (the torch backend does
# everything). A setting outside this table is rejected before any work starts rather than
# silently ignored, so a recipe means the same augmentation whatever loader runs it.
BACKEND_SUPPORT = {
    "ffcv": {"train_crop": ("random_resized", "pad_random"), "ra_reps": False},
    "dali": {"train_crop": ("random_resized",), "ra_reps": False, "dataset": ("digits",
                                                                              "imagefolder")},
    "resident": {"train_crop": ("random_resized", "pad_random"), "ra_reps": True,
                 "auto_augment": ("none", "trivialaugment")},
}


# data.* keys that only some backends read, and those backends: set to anything but the default
# on another backend, they are an error rather than silently ignored. (data.ffcv_dir is not
# here: tools/write_ffcv.py reads it whatever the recipe's backend.)
BACKEND_KEYS = {
    "ffcv_order": ("ffcv",),
    "ffcv_os_cache": ("ffcv",),
    "ffcv_resize": ("ffcv",),
    # DALI always decodes the crop window only; resident decodes whole images once.
    "region_decode": ("torch", "ffcv"),
}


def _yaml_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _check_backend(cfg: Config, origin: str) -> None:
    backend = cfg.data.backend
    where = f"{origin}: data.backend={backend}"
    defaults = DataConfig()
    for key, readers in BACKEND_KEYS.items():
        value = getattr(cfg.data, key)
        if backend not in readers and value != getattr(defaults, key):
            raise ConfigError(f"{where} does not read data.{key}={_yaml_value(value)} (only "
                              f"the {' and '.join(readers)} backend{'s' * (len(readers) > 1)} "
                              f"do{'es' * (len(readers) == 1)}); remove it or use "
                              f"data.backend={' or '.join(readers)}")
    # FFCV's decoder crops inside the resized image; torch's center_crop (the other backends)
    # zero-pads a crop larger than it.
    if backend == "ffcv" and cfg.data.val_res > cfg.data.val_resize:
        raise ConfigError(f"{where} center-crops inside the resized image: data.val_res="
                          f"{cfg.data.val_res} must be <= data.val_resize={cfg.data.val_resize} "
                          f"(the other backends zero-pad the border)")
    support = BACKEND_SUPPORT.get(backend)
    if support is None:
        return
    if cfg.aug.train_crop not in support["train_crop"]:
        raise ConfigError(f"{where} does not implement aug.train_crop={cfg.aug.train_crop} "
                          f"(only {', '.join(support['train_crop'])}); use data.backend=torch")
    if cfg.aug.auto_augment not in support.get("auto_augment", ("none",)):
        raise ConfigError(f"{where} does not implement aug.auto_augment="
                          f"{cfg.aug.auto_augment}; use data.backend=torch")
    if cfg.aug.random_erase:
        raise ConfigError(f"{where} does not implement aug.random_erase; "
                          f"use data.backend=torch")
    if cfg.data.ra_reps > 1 and not support["ra_reps"]:
        raise ConfigError(f"{where} does not implement repeated augmentation "
                          f"(data.ra_reps={cfg.data.ra_reps}); use data.backend=torch or resident")
    if cfg.data.dataset not in support.get("dataset", (cfg.data.dataset,)):
        raise ConfigError(f"{where} reads image folders, not data.dataset={cfg.data.dataset}; "
                          f"use data.backend=resident, ffcv or torch")


def dump(cfg: Config) -> str:
    """The resolved config as YAML; `load` of it gives back an equal Config."""
    return yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=None)
