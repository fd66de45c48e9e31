"""The paper's optimiser and schedule: AdamW with a per-step one-cycle learning rate."""

from __future__ import annotations

import math

import torch

from quakeray.config import OptimConfig

__all__ = ["build_optimizer"]


def build_optimizer(
    model: torch.nn.Module, opt: OptimConfig, steps_per_epoch: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.OneCycleLR]:
    """AdamW and a OneCycleLR stepped once per batch over ``opt.epochs`` epochs.

    Momentum cycling is off, as in the paper's code: AdamW's betas stay fixed.

    Args:
        model: The (unwrapped or DDP) model whose parameters are optimised.
        opt: Learning rate, weight decay, epochs and one-cycle shape.
        steps_per_epoch: Optimiser steps per epoch on this worker.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
    total_steps = opt.epochs * steps_per_epoch
    pct_start = opt.pct_start
    if math.isclose(pct_start * total_steps, 1.0):
        # OneCycleLR ends its warm-up at step pct_start * total - 1; at exactly 0 its first
        # step divides 0 by 0 (e.g. 10 steps at pct_start 0.1). A hair later is the same
        # schedule without the crash.
        pct_start *= 1 + 1e-6
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=opt.lr,
        total_steps=total_steps,
        pct_start=pct_start,
        div_factor=opt.div_factor,
        final_div_factor=opt.final_div_factor,
        cycle_momentum=False,
    )
    return optimizer, scheduler
