"""One epoch of a worker: train on its shard, then validate on the whole split, gathered.

Pure helpers of the worker loop (nanoGPT's ``estimate_loss`` shape): :func:`train_epoch`
steps the model over this rank's shard and sums the loss parts on the device (one host
sync per epoch, not per step); :func:`gather_predictions` predicts this rank's
validation shard and all-gathers the shards, so every rank holds the exact predictions of
the whole split; :func:`epoch_metrics` turns both into the epoch's
:data:`~quakeray.metrics.EPOCH_METRICS`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from quakeray.checkpoint import Predictions
from quakeray.inference import PREDICTION_FIELDS, predict_batches
from quakeray.metrics import split_metrics
from quakeray.train.parts import BATCH_LAYOUT, LoopData, ModelParts

__all__ = [
    "EpochTotals",
    "epoch_line",
    "epoch_metrics",
    "gather_predictions",
    "progress_bar",
    "train_epoch",
]


@dataclass(frozen=True)
class EpochTotals:
    """Training loss parts summed over the samples of every rank, and the epoch's time."""

    loss: float
    mse: float
    rank: float
    seen: int
    seconds: float  # the slowest rank's


def train_epoch(
    parts: ModelParts, data: LoopData, epoch: int, *, distributed: bool, bar: Any
) -> EpochTotals:
    """One pass over this rank's shard: forward, joint loss, backward, clip, step."""
    device = parts.device
    data.train_sampler.set_epoch(epoch)
    parts.model.train()
    data.transform.train()
    # loss, mse, rank, samples: summed on the device, read once at the end of the epoch.
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    world = dist.get_world_size() if distributed else 1
    t_start = time.perf_counter()
    for batch in data.train_loader:
        x = data.transform(batch["image"].to(device, non_blocking=True), layout=BATCH_LAYOUT)
        y = batch["magnitude"].to(device, non_blocking=True).float()
        with torch.autocast(
            device.type, dtype=parts.amp_dtype or torch.float32, enabled=parts.amp_dtype is not None
        ):
            pred = parts.model(x)
        out = parts.loss_fn(pred.float(), y)
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.scale(out.total).backward()
        if parts.grad_clip > 0:
            parts.scaler.unscale_(parts.optimizer)
            torch.nn.utils.clip_grad_norm_(parts.raw_model.parameters(), parts.grad_clip)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        parts.scheduler.step()
        n = y.shape[0]
        sums += torch.stack([out.value, out.mse, out.rank, torch.ones_like(out.value)]).double() * n
        bar.update(n * world)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t_start
    if distributed:
        dist.all_reduce(sums)
        elapsed = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        seconds = float(elapsed.item())
    loss, mse, rank, seen = sums.tolist()
    return EpochTotals(loss, mse, rank, int(seen), seconds)


def gather_predictions(parts: ModelParts, data: LoopData, *, distributed: bool) -> Predictions:
    """Predictions for the whole validation split, identical on every rank.

    Each rank predicts its ``DistributedSampler`` shard; the shards are all-gathered
    with their sample indices and put back in dataset order. The sampler pads the last
    shard with repeats of early samples: writing by index keeps each sample once.
    """
    if distributed:
        # DDP syncs buffers (BatchNorm statistics) at the *start* of a forward, so after
        # the last step each rank holds its own: evaluate rank 0's, the model the
        # checkpoint stores, everywhere.
        for buffer in parts.raw_model.buffers():
            dist.broadcast(buffer, src=0)
    local = predict_batches(
        parts.raw_model,
        data.transform,
        data.val_loader,
        parts.device,
        autocast_dtype=parts.amp_dtype,
        layout=BATCH_LAYOUT,
    )
    indices = list(iter(data.val_sampler))
    shards: list[Any] = [(indices, local)]
    if distributed:
        shards = [None] * dist.get_world_size()
        dist.all_gather_object(shards, (indices, local))
    columns: dict[str, list[Any]] = {k: [None] * data.val_size for k in PREDICTION_FIELDS}
    for shard_indices, shard in shards:
        for key, values in shard.items():
            column = columns[key]
            for i, value in zip(shard_indices, values, strict=True):
                column[i] = value
    missing = sum(v is None for v in columns["prediction"])
    if missing:
        raise RuntimeError(f"{missing} validation samples were not predicted by any rank")
    return Predictions(index=list(range(data.val_size)), **columns)


def epoch_metrics(
    epoch: int, totals: EpochTotals, predictions: Predictions, parts: ModelParts, data: LoopData
) -> dict[str, float]:
    """The epoch's :data:`~quakeray.metrics.EPOCH_METRICS`, in that order."""
    pred = np.asarray(predictions.prediction, dtype=np.float64)
    target = np.asarray(predictions.magnitude, dtype=np.float64)
    val_loss = parts.val_loss_fn(torch.from_numpy(pred).float(), torch.from_numpy(target).float())
    return {
        "epoch": float(epoch),
        "train_loss": totals.loss / totals.seen,
        "train_mse": totals.mse / totals.seen,
        "train_rank": totals.rank / totals.seen,
        "val_loss": float(val_loss.value),
        **split_metrics(
            pred, target, np.asarray(predictions.label), prefix="val_", baseline=data.baseline
        ),
        "lr": float(parts.scheduler.get_last_lr()[0]),
        "samples_per_s": totals.seen / max(totals.seconds, 1e-9),
    }


def epoch_line(metrics: Mapping[str, float], epochs: int) -> str:
    """The one line a person reads per epoch."""
    return (
        f"epoch {int(metrics['epoch']) + 1}/{epochs}: train_loss {metrics['train_loss']:.4f} "
        f"val_loss {metrics['val_loss']:.4f} val_MAE {metrics['val_MAE']:.4f} "
        f"val_spearman {metrics['val_spearman']:.3f} lr {metrics['lr']:.2e} "
        f"({metrics['samples_per_s']:.1f} samples/s)"
    )


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, *, enabled: bool, in_process: bool) -> Any:
    """Rank 0's progress bar: Ray's tqdm in workers (it renders on the driver), else tqdm."""
    if not enabled:
        return _NoBar()
    if in_process:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, leave=False)
    from ray.experimental.tqdm_ray import tqdm as tqdm_ray

    return tqdm_ray(total=total, desc=desc, unit="sample")
