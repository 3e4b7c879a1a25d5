"""torch.hub entry points: every registered fasttrain model.

    model = torch.hub.load("path/to/fasttrain", "thin_resnet50", width=0.5, source="local")
    model = torch.hub.load("path/to/fasttrain", "thin_resnet50", source="local",
                           checkpoint="runs/.../checkpoints/best.pt")

Keyword arguments go to the model constructor (`width`, `channel_divisor`, `num_classes`, ...;
see fasttrain.models). `checkpoint` loads a local fasttrain checkpoint (`weights_only=True`): the
architecture then comes from the checkpoint's config, and a keyword argument that disagrees with
it is an error. Without a checkpoint the weights are random. Models are returned in eval mode.
"""
dependencies = ["torch"]

import fasttrain.models as _models  # noqa: E402  (hub reads `dependencies` first)


def _entry(name: str):
    def load(checkpoint: str | None = None, **kwargs):
        if checkpoint is None:
            return _models.create_model(name, **kwargs).eval()
        from fasttrain.export import model_from_checkpoint

        model, meta = model_from_checkpoint(checkpoint)
        if meta["model"] != name:
            raise ValueError(f"{checkpoint} holds a {meta['model']}, not a {name}")
        for key, value in kwargs.items():
            if key not in meta:
                raise ValueError(f"{key}= cannot be combined with checkpoint= (the checkpoint "
                                 f"fixes the model)")
            if meta[key] != value:
                raise ValueError(f"{checkpoint}: {key}={value!r} disagrees with the "
                                 f"checkpoint's {key}={meta[key]!r}")
        return model

    load.__name__ = load.__qualname__ = name
    load.__doc__ = (f"fasttrain `{name}` (keyword arguments: see fasttrain.models.{name}); "
                    f"`checkpoint=PATH` loads trained weights from a fasttrain checkpoint.")
    return load


for _name in _models.list_models():
    globals()[_name] = _entry(_name)
