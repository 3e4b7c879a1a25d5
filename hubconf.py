"""torch.hub entry points: every registered fasttrain model.

    model = torch.hub.load("path/to/fasttrain", "thin_resnet50", width=0.5, source="local")
    model = torch.hub.load("path/to/fasttrain", "thin_resnet50", source="local",
                           checkpoint="runs/.../checkpoints/best.pt")

Keyword arguments go to the model constructor (`width`, `channel_divisor`, `num_classes`, ...;
see fasttrain.models). `checkpoint` loads a local fasttrain checkpoint (`weights_only=True`): the
architecture then comes from the checkpoint's config, and a keyword argument that disagrees with
it is an error; `weights="ema"` takes the checkpoint's moving average of the weights (a
`train.ema` run) instead of the trained weights. Without a checkpoint the weights are random.
Models are returned in eval mode.
"""
# What torch.hub checks before importing this file (module names): the models, the config
# (width bounds) and a checkpoint's loading (config, engine).
dependencies = ["torch", "torchvision", "yaml", "rich", "PIL"]

import os  # noqa: E402

import fasttrain.models as _models  # noqa: E402  (hub reads `dependencies` first)


def _model_arguments(name: str) -> list[str]:
    """The keyword arguments `name`'s constructor takes, plus hub's `norm_act`, less the layer
    classes (`norm_layer`, `norm_act_layer`: internal, `norm_act` picks them by name)."""
    import inspect

    cls = _models.CifarResNet if name.startswith("cifar_") else _models.ResNet
    taken = [p for p in inspect.signature(cls.__init__).parameters
             if p not in ("self", "block", "layers", "depth", "norm_layer", "norm_act_layer")]
    return sorted({*taken, "norm_act"})


def _entry(name: str):
    def load(checkpoint: str | None = None, weights: str | None = None, **kwargs):
        accepted = _model_arguments(name)
        for key in kwargs:  # the constructor's TypeError named ResNet.__init__, not the model
            if key not in accepted:
                raise ValueError(f"{key}= is not an argument of {name}; it takes "
                                 f"{', '.join(accepted)}")
        if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
            raise ValueError(f"checkpoint= must be a path (str or os.PathLike), got "
                             f"{checkpoint!r}")
        choice = kwargs.get("norm_act")
        if "norm_act" in kwargs and (choice is not None or checkpoint is None) and (
                not isinstance(choice, str) or choice not in _models.NORM_ACT_LAYERS):
            # checked here with a checkpoint too: it was the loader's UserError, no ValueError
            raise ValueError(f"norm_act={choice!r}: choose from "
                             f"{', '.join(sorted(_models.NORM_ACT_LAYERS))}")
        if checkpoint is None:
            if weights is not None:
                raise ValueError("weights= needs checkpoint= (without one the weights are "
                                 "random)")
            if "norm_act" in kwargs:  # the config's name for the layer choice, as with checkpoints
                kwargs["norm_act_layer"] = _models.NORM_ACT_LAYERS[kwargs.pop("norm_act")]
            from fasttrain.config import model_bound_exceeded

            if problem := model_bound_exceeded(kwargs):
                raise ValueError(problem)
            return _models.create_model(name, **kwargs).eval()
        if not str(checkpoint).strip():
            raise ValueError("checkpoint= is empty: give the path of a fasttrain checkpoint")
        from fasttrain.export import WEIGHTS, model_from_checkpoint

        if weights is not None and weights not in WEIGHTS:  # '' loaded the trained weights
            raise ValueError(f"weights={weights!r}: choose from {', '.join(WEIGHTS)}")

        # norm_act only picks the implementation of the same math (state dicts are identical).
        model, meta = model_from_checkpoint(checkpoint, norm_act=kwargs.pop("norm_act", None),
                                            weights="model" if weights is None else weights)
        if meta["model"] != name:
            raise ValueError(f"{checkpoint} holds a {meta['model']}, not a {name}")
        # the architecture the checkpoint was trained as; models train on RGB images only
        fixed = {**meta["model_config"], "in_chans": model.conv1.in_channels}
        for key, value in kwargs.items():
            if key not in fixed or key in ("name", "init_from", "channels"):
                raise ValueError(f"{key}= cannot be combined with checkpoint= (the checkpoint "
                                 f"fixes the model)")
            if fixed.get("channels") and key in ("width", "channel_divisor"):
                raise ValueError(f"{key}= cannot be combined with a pruned checkpoint= (its "
                                 f"per-layer channels fix every width)")
            if fixed[key] != value:
                raise ValueError(f"{checkpoint}: {key}={value!r} disagrees with the "
                                 f"checkpoint's {key}={fixed[key]!r}")
        return model

    load.__name__ = load.__qualname__ = name
    load.__doc__ = (f"fasttrain `{name}`, in eval mode. Keyword arguments are the model's: "
                    f"width, channel_divisor, num_classes, zero_init_residual, drop_path_rate, "
                    f"blurpool, in_chans, norm_act (native | fused)"
                    f"{', shortcut' if name.startswith('cifar_') else ''} "
                    f"(see fasttrain.models.{'CifarResNet' if name.startswith('cifar_') else 'ResNet'}). "
                    f"`checkpoint=PATH` loads trained weights from a fasttrain checkpoint; the "
                    f"architecture is then the checkpoint's (`norm_act='fused'` may pick the "
                    f"fused kernel), and `weights='ema'` picks its moving average of the "
                    f"weights.")
    return load


for _name in _models.list_models():
    globals()[_name] = _entry(_name)
