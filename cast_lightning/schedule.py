"""The learning-rate schedule of every training loop in the package (``CASTModule`` and the embedded world's base
model pretraining): linear warmup, then a cosine decay to a floor, as a ``LambdaLR`` factor stepped once per
optimizer step."""

from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """The multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    ``(step + 1) / warmup_steps`` during the ``warmup_steps`` warmup steps (the first step already trains), then
    ``min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + cos(pi * progress))`` with
    ``progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)`` held at 1 past ``total_steps``, so
    the factor falls from 1 to ``min_lr_ratio`` and stays there.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying ``warmup_cosine_factor``; call its ``step()`` after every optimizer step."""

    def factor(step: int) -> float:  # a plain function: LambdaLR then keeps no state for it in checkpoints
        return warmup_cosine_factor(step, total_steps, warmup_steps, min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
