"""The optimiser and schedule: the paper's AdamW + per-step one-cycle, at any step count."""

from __future__ import annotations

import pytest
import torch

from quakeray.config import OptimConfig
from quakeray.optim import build_optimizer


@pytest.mark.parametrize("steps_per_epoch", [1, 5, 10, 11, 100])
def test_one_cycle_steps_through_any_short_schedule(steps_per_epoch: int) -> None:
    # 1 epoch of 10 steps at pct_start 0.1 used to crash OneCycleLR (0 / 0 on step one).
    model = torch.nn.Linear(2, 1)
    opt = OptimConfig(epochs=1, lr=1e-2, pct_start=0.1)
    optimizer, scheduler = build_optimizer(model, opt, steps_per_epoch)
    lrs = []
    for _ in range(steps_per_epoch):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert all(0 <= lr <= 1e-2 for lr in lrs)
    assert max(lrs) > 0
