"""The paper's learning-rate schedule, lr_t = lr_0 / (1 + decay * t) over completed epochs, for either optimizer."""

from __future__ import annotations

import torch

__all__ = ["InverseTimeDecay", "paper_lr_scheduler"]


class InverseTimeDecay:
    """``lr_lambda`` of the paper's schedule, lr / (1 + decay * epoch); a class so LambdaLR can checkpoint it."""

    def __init__(self, decay: float = 1e-4) -> None:
        self.decay = float(decay)

    def __call__(self, epoch: int) -> float:
        return 1.0 / (1.0 + self.decay * epoch)


def paper_lr_scheduler(optimizer: torch.optim.Optimizer, decay: float = 1e-4) -> torch.optim.lr_scheduler.LambdaLR:
    """lr_t = lr_0 / (1 + decay * t), t = completed epochs; use with ``LrScheduleHandler(epoch_level=True)``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=InverseTimeDecay(decay))
