"""Engine: precision, optimizer, schedule, loop, checkpoints, distributed."""
from .loop import build_model, evaluate, train

__all__ = ["build_model", "evaluate", "train"]
