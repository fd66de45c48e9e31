"""Joint regression + ranking loss: ``L = MSE + rank_weight * margin_ranking(margin)``.

The ranking term is a hinge on ordered pairs: for a pair (i, j) with sign
``s = sign(y_i - y_j)`` it costs ``max(0, margin - s * (p_i - p_j))``, exactly
:class:`torch.nn.MarginRankingLoss`. The pairing modes decide which pairs count:

- ``halves``: the paper's. Element ``i`` is paired with ``i + B//2`` (an odd batch leaves the
  last element out), target ``+1`` if ``y_i >= y_j`` else ``-1``, so ties count as ``+1``.
  Kept for a faithful reproduction.
- ``all``: every ``i < j`` pair of the local batch with ``y_i != y_j`` (ties carry no order,
  and in QuakeSet every negative has magnitude 0, so ties are frequent), mean hinge.
- ``global``: every pair across the data-parallel batch. Predictions and targets are
  all-gathered; the gradient flows through the local predictions only. See
  :meth:`JointLoss._global` for how ``total`` is scaled so that DDP's gradient averaging
  yields exactly the single-process gradient of ``all`` on the concatenated batch.

Example:
    >>> loss = JointLoss(margin=0.02, rank_weight=1.0, pairing="all")
    >>> out = loss(torch.tensor([1.0, 5.0]), torch.tensor([0.0, 6.0]))
    >>> round(out.mse.item(), 3), out.rank.item()
    (1.0, 0.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from quakeray.config import Pairing
from quakeray.errors import ConfigError

if TYPE_CHECKING:
    from quakeray.config import LossConfig

__all__ = ["PAIRINGS", "JointLoss", "LossOutput", "build_loss"]

PAIRINGS: tuple[str, ...] = get_args(Pairing)
"""The valid pairing mode names."""


@dataclass(frozen=True)
class LossOutput:
    """The loss of one batch.

    Attributes:
        total: What to call ``.backward()`` on. Equal to ``value`` except in ``global`` mode
            on more than one process, where it is rescaled for DDP's gradient averaging.
        value: Detached ``mse + rank_weight * rank``, for logging.
        mse: Detached mean squared error (the local batch; the whole distributed batch in
            ``global`` mode).
        rank: Detached mean hinge over the valid pairs; 0 when there are none.
    """

    total: Tensor
    value: Tensor
    mse: Tensor
    rank: Tensor


class JointLoss(torch.nn.Module):
    """``MSE + rank_weight * margin_ranking(margin)`` with a choice of pairs.

    Args:
        margin: Margin of the ranking hinge, >= 0 (paper: 0.02).
        rank_weight: Weight lambda of the ranking term, >= 0; 0 is plain MSE.
        pairing: ``halves`` (paper), ``all`` (local batch) or ``global`` (across workers).

    Raises:
        ConfigError: Negative or non-finite margin or weight, or an unknown pairing.
    """

    def __init__(
        self, margin: float = 0.02, rank_weight: float = 1.0, pairing: Pairing = "all"
    ) -> None:
        super().__init__()
        # isfinite also rejects NaN, which would silently poison every step.
        if not (math.isfinite(margin) and margin >= 0):
            raise ConfigError(f"loss.margin must be a finite number >= 0, got {margin}")
        if not (math.isfinite(rank_weight) and rank_weight >= 0):
            raise ConfigError(
                f"loss.rank_weight must be a finite number >= 0 (0 = MSE only), got {rank_weight}"
            )
        if pairing not in PAIRINGS:
            raise ConfigError(f"loss.pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
        self.margin = float(margin)
        self.rank_weight = float(rank_weight)
        self.pairing: Pairing = pairing

    def extra_repr(self) -> str:
        """The settings, shown by ``print(loss)``."""
        return f"margin={self.margin}, rank_weight={self.rank_weight}, pairing={self.pairing!r}"

    def forward(self, pred: Tensor, target: Tensor) -> LossOutput:
        """Compute the loss of one batch.

        Args:
            pred: Predicted magnitudes, shape ``(B,)`` (``(B, 1)`` is accepted).
            target: True magnitudes, same number of elements.

        Returns:
            The total to back-propagate and its detached parts.

        Raises:
            ValueError: ``pred`` and ``target`` hold different numbers of elements.
        """
        if pred.numel() != target.numel():
            raise ValueError(
                f"pred has {pred.numel()} elements but target has {target.numel()}; "
                "pass one prediction per target"
            )
        # Float32 arithmetic even under bf16/fp16 autocast: the hinge differences between
        # close magnitudes are smaller than bf16 resolution.
        pred = pred.reshape(-1).float()
        target = target.reshape(-1).to(device=pred.device, dtype=torch.float32)
        if self.pairing == "global" and _world_size() > 1:
            return self._global(pred, target)
        mse = _mse(pred, target)
        if self.pairing == "halves":
            rank = _halves_rank(pred, target, self.margin)
        else:  # "all", and "global" on a single process
            rank = _all_pairs_rank(pred, target, self.margin)
        total = mse + self.rank_weight * rank
        return LossOutput(total=total, value=total.detach(), mse=mse.detach(), rank=rank.detach())

    def _global(self, pred: Tensor, target: Tensor) -> LossOutput:
        """Pairs across all processes; ``total`` scaled for DDP gradient averaging.

        Every process computes the loss of the whole concatenated batch of ``N`` samples,
        with gradient only through its own ``B_w`` predictions (the gathered ones are
        constants). The full gradient is the *sum* over processes of these partial
        gradients, but DDP *averages* gradients over the ``W`` processes. So:

        - the rank term enters ``total`` multiplied by ``W``: the average of ``W`` partial
          gradients of ``W * rank`` is the sum of the partials, the full gradient;
        - the MSE term enters as the local mean times ``W * B_w / N``: averaged over
          processes this is ``sum_w (B_w / N) * grad(local mean) = grad(global mean)``,
          exact also for unequal shard sizes.

        The logged ``value``, ``mse`` and ``rank`` are those of the concatenated batch,
        identical on every process and equal to ``all`` on that batch.
        """
        world = _world_size()
        me = dist.get_rank()
        all_pred, all_target, sizes = _gather_batches(pred, target)
        total_n = sum(sizes)
        start = sum(sizes[:me])
        # Splice the local predictions (with grad) into the gathered constants.
        full_pred = torch.cat([all_pred[:start], pred, all_pred[start + pred.numel() :]])
        rank = _all_pairs_rank(full_pred, all_target, self.margin)
        local_mse = _mse(pred, target)
        mse_weight = world * pred.numel() / total_n if total_n else 0.0
        total = mse_weight * local_mse + self.rank_weight * world * rank
        global_mse = _mse(all_pred, all_target).detach()
        rank = rank.detach()
        value = global_mse + self.rank_weight * rank
        return LossOutput(total=total, value=value, mse=global_mse, rank=rank)


def build_loss(cfg: LossConfig) -> JointLoss:
    """The joint loss described by the ``loss`` section of the config.

    Raises:
        ConfigError: Negative margin or weight, or an unknown pairing.
    """
    return JointLoss(margin=cfg.margin, rank_weight=cfg.rank_weight, pairing=cfg.pairing)


# --------------------------------------------------------------------------- helpers


def _mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error; 0 (still in the graph) for an empty batch instead of NaN."""
    if pred.numel() == 0:
        return pred.sum() * 0.0
    return F.mse_loss(pred, target)


def _halves_rank(pred: Tensor, target: Tensor, margin: float) -> Tensor:
    """The paper's pairing: i with i + B//2, ties as +1."""
    half = pred.numel() // 2
    if half == 0:
        return pred.sum() * 0.0
    first, second = pred[:half], pred[half : 2 * half]
    sign = torch.where(target[:half] >= target[half : 2 * half], 1.0, -1.0).to(pred)
    return F.margin_ranking_loss(first, second, sign, margin=margin)


def _all_pairs_rank(pred: Tensor, target: Tensor, margin: float) -> Tensor:
    """Mean hinge over every i < j pair with different targets; 0 when there is none."""
    n = pred.numel()
    diff_pred = pred[:, None] - pred[None, :]
    sign = torch.sign(target[:, None] - target[None, :])
    upper = torch.ones(n, n, dtype=torch.bool, device=pred.device).triu(diagonal=1)
    valid = upper & (sign != 0)
    hinge = torch.where(valid, F.relu(margin - sign * diff_pred), 0.0)
    # Masked sums instead of boolean indexing: no host sync on the GPU, and with no valid
    # pair the result is 0 / 1 = 0 while the graph stays connected for backward() and DDP.
    return hinge.sum() / valid.sum().clamp(min=1)


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def _gather_batches(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, list[int]]:
    """All-gather predictions (detached) and targets of possibly unequal sizes.

    ``all_gather`` needs equal shapes, so the sizes go first and every shard is padded to
    the largest one, then trimmed.

    Returns:
        Concatenated predictions, concatenated targets (rank order), and the shard sizes.
    """
    world = _world_size()
    size = torch.tensor([pred.numel()], dtype=torch.long, device=pred.device)
    sizes_t = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes_t, size)
    sizes = [int(s.item()) for s in sizes_t]
    longest = max(sizes)
    both = torch.zeros(2, longest, dtype=torch.float32, device=pred.device)
    both[0, : pred.numel()] = pred.detach()
    both[1, : pred.numel()] = target
    gathered = [torch.empty_like(both) for _ in range(world)]
    dist.all_gather(gathered, both)
    all_pred = torch.cat([g[0, :n] for g, n in zip(gathered, sizes, strict=True)])
    all_target = torch.cat([g[1, :n] for g, n in zip(gathered, sizes, strict=True)])
    return all_pred, all_target, sizes
