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
        self._copy_next = True  # host mirror of `n_averaged == 0`: no device sync per update

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict, assign)
        self._copy_next = bool(self.n_averaged == 0)  # one sync, at resume
        return result

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """AveragedModel.update_parameters' arithmetic without its two `bool(n_averaged ...)`
        device syncs, and with the integer buffers (num_batches_tracked) updated in one batch
        instead of four kernels each."""
        ema = list(self.module.parameters()) + list(self.module.buffers())
        src = [t.detach() for t in list(model.parameters()) + list(model.buffers())]
        if self._copy_next:
            torch._foreach_copy_(ema, src)
        else:
            floats = [(e, m) for e, m in zip(ema, src) if e.is_floating_point()]
            ints = [(e, m) for e, m in zip(ema, src) if not e.is_floating_point()]
            if floats:
                torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats],
                                     1 - self.decay)
            # The same formula as torch's per-tensor fallback, on one stacked copy per shape
            # (a ResNet's integer buffers are its BatchNorms' num_batches_tracked scalars).
            by_kind: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for e, m in ints:
                by_kind.setdefault((e.shape, e.dtype), []).append((e, m))
            for group in by_kind.values():
                e_all = torch.stack([e for e, _ in group])
                m_all = torch.stack([m for _, m in group])
                mixed = (e_all * self.decay + m_all * (1 - self.decay)).to(e_all.dtype)
                torch._foreach_copy_([e for e, _ in group], list(mixed.unbind(0)))
        self.n_averaged += 1
        self._copy_next = False

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
            self._copy_next = True
