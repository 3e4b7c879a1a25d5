"""Exponential moving average of the weights, as torchvision's reference scripts keep it."""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def adjusted_decay(decay: float, global_batch: int, ema_steps: int, epochs: int) -> float:
    """torchvision's adjustment (references/classification/train.py): the decay is given per
    image-batch unit; updating every `ema_steps` steps at `global_batch` over `epochs` epochs
    rescales 1 - decay by global_batch * ema_steps / epochs (capped at 1)."""
    alpha = min(1.0, (1.0 - decay) * global_batch * ema_steps / epochs)
    return 1.0 - alpha


class ModelEma(AveragedModel):
    """EMA of parameters and buffers: ema = d * ema + (1 - d) * model, updated every `every`
    optimizer steps. During LR warmup the average restarts from the current weights at each
    update (torchvision resets `n_averaged` after each update while epoch < warmup epochs), so
    the first update after warmup copies the weights too."""

    def __init__(self, model: nn.Module, decay: float, every: int) -> None:
        super().__init__(model, device=next(model.parameters()).device,
                         multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay, self.every = decay, every

    @torch.no_grad()
    def step(self, model: nn.Module, optimizer_step: int, in_warmup: bool) -> None:
        """Call after every optimizer step (1-based count)."""
        if optimizer_step % self.every:
            return
        self.update_parameters(model)
        if in_warmup:
            # After the update, as torchvision does: the next update copies the weights, the
            # first one after warmup included (the average starts from the warmed-up weights).
            self.n_averaged.zero_()
