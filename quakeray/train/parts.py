"""What a worker loop builds before its first epoch: data shards, model and optimiser, progress.

Pure set-up for :func:`quakeray.train.loop.train_loop_per_worker`, one function per part,
each usable in a test without Ray: :func:`build_data` (the DistributedSampler shards and
the batch transform), :func:`build_model_parts` (model, loss, AdamW + one-cycle, AMP),
and :func:`resume` (the state of a checkpoint loaded into them).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from quakeray.checkpoint import load_checkpoint, rank_key
from quakeray.config import ExperimentConfig, replace
from quakeray.data.prepare import PreparedData, train_subset
from quakeray.data.quakeset import Layout, QuakeSetDataset, collate
from quakeray.data.transforms import BatchTransform, ChannelStats, build_transform
from quakeray.losses import JointLoss, build_loss
from quakeray.metrics import SCORE_METRIC, ConstantBaseline
from quakeray.optim import build_optimizer
from quakeray.train.session import LoopSession

__all__ = [
    "BATCH_LAYOUT",
    "LoopData",
    "ModelParts",
    "Progress",
    "build_data",
    "build_model_parts",
    "resume",
    "seed_epoch",
]

log = logging.getLogger(__name__)

BATCH_LAYOUT: Layout = "raw"
"""The layout the loop's datasets read: each array ``read_direct`` into its place in the batch."""


@dataclass
class LoopData:
    """One rank's view of the data: its shards, their loaders and the batch transform."""

    train_loader: DataLoader[Any]
    val_loader: DataLoader[Any]
    train_sampler: DistributedSampler[Any]
    val_sampler: DistributedSampler[Any]
    val_size: int  # samples in the whole validation split
    transform: BatchTransform  # NaN fill, dB, normalisation, flips, resize; on the device
    stats: ChannelStats | None  # what the transform normalises with
    native_size: int  # the data's patch side
    img_size: int  # the model's input side
    train_targets: np.ndarray  # the train split's magnitudes (0 for negatives)
    baseline: ConstantBaseline  # the constant predictors every epoch is judged against


@dataclass
class ModelParts:
    """The model and everything that steps it."""

    model: torch.nn.Module  # DDP-wrapped when distributed: call it to train
    raw_model: torch.nn.Module  # the module itself: its state is what checkpoints hold
    loss_fn: JointLoss
    val_loss_fn: JointLoss  # the loss on the gathered split ("global" pairs = "all" there)
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.OneCycleLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None  # autocast dtype; None = fp32
    grad_clip: float  # max gradient norm; 0 = no clipping
    device: torch.device


@dataclass
class Progress:
    """Where training stands: the next epoch, the best score so far, every epoch's metrics."""

    metric: str = SCORE_METRIC  # what ranks epochs (``run.checkpoint_metric``), lower is better
    next_epoch: int = 0
    best: float = math.inf
    best_epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)

    def record(self, metrics: dict[str, float]) -> None:
        """Add an epoch's metrics; a better (finite) score becomes the best."""
        score, epoch = metrics[self.metric], int(metrics["epoch"])
        if rank_key(score, epoch) < rank_key(self.best, self.best_epoch):
            self.best, self.best_epoch = score, epoch
        self.history.append(metrics)
        self.next_epoch = int(metrics["epoch"]) + 1


def build_data(
    cfg: ExperimentConfig, data: PreparedData, *, rank: int, world: int, device: torch.device
) -> LoopData:
    """This rank's DistributedSampler shards of the train and validation splits."""
    from quakeray.models import input_size_for  # timm: imported where a model is built

    stats = ChannelStats.load(data.stats_path) if data.stats_path else None
    positives_only = cfg.data.positives_only
    # The raw layout (as stored: read straight into the batch); the transform's first pass
    # puts it in the model's channel order (epoch.py passes BATCH_LAYOUT to it).
    train_set = QuakeSetDataset(
        data.path,
        "train",
        positives_only=positives_only,
        events=train_subset(cfg, data.path),
        layout=BATCH_LAYOUT,
    )
    val_set = QuakeSetDataset(data.path, "val", positives_only=positives_only, layout=BATCH_LAYOUT)
    native = int(train_set.image_size[0])
    img_size = input_size_for(cfg.model, cfg.data.image_size or native)
    resize_to = img_size if img_size != native else 0
    transform = build_transform(replace(cfg.data, image_size=resize_to), stats).to(device)
    batch = cfg.optim.batch_size // world  # optim.batch_size is the global batch
    train_sampler: DistributedSampler[Any] = DistributedSampler(
        train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.optim.seed
    )
    val_sampler: DistributedSampler[Any] = DistributedSampler(
        val_set, num_replicas=world, rank=rank, shuffle=False
    )
    loader_kw: dict[str, Any] = {
        "num_workers": cfg.data.loader_workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": cfg.data.loader_workers > 0,
        "collate_fn": collate,  # zero-copy: the dataset's batched fetch built the batch
    }
    # A last batch of one sample breaks BatchNorm in training (ResNet at 1x1 maps, LeViT's
    # BatchNorm1d head): drop that lone sample. Shards are equal, so every rank agrees.
    lone_last = len(train_sampler) > batch and len(train_sampler) % batch == 1
    return LoopData(
        train_loader=DataLoader(
            train_set, batch_size=batch, sampler=train_sampler, drop_last=lone_last, **loader_kw
        ),
        val_loader=DataLoader(
            val_set, batch_size=cfg.optim.eval_batch_size or batch, sampler=val_sampler, **loader_kw
        ),
        train_sampler=train_sampler,
        val_sampler=val_sampler,
        val_size=len(val_set),
        transform=transform,
        stats=stats,
        native_size=native,
        img_size=img_size,
        train_targets=train_set.magnitudes,
        baseline=ConstantBaseline.of(train_set.magnitudes),
    )


def build_model_parts(cfg: ExperimentConfig, data: LoopData, session: LoopSession) -> ModelParts:
    """The model (on the device; DDP-wrapped by Ray Train), the joint loss, AdamW + one-cycle."""
    # timm (1-2 s to import) only here: a search trial's process imports this module to
    # build its trainer and never builds a model itself (unless it trains in-process).
    from quakeray.models import build_model

    opt = cfg.optim
    torch.manual_seed(opt.seed)  # same init everywhere (DDP also broadcasts rank 0's)
    regressor = build_model(cfg.model, in_chans=4, img_size=data.img_size)
    if cfg.model.standardize_target:
        targets = data.train_targets.astype(np.float64)
        regressor.set_target_scale(float(targets.mean()), float(targets.std()) or 1.0)
    model = session.prepare_model(regressor)
    raw_model: torch.nn.Module = getattr(model, "module", model)
    seed_epoch(opt.seed, session.rank, 0)  # flips and dropout differ per rank
    pairing = "all" if cfg.loss.pairing == "global" else cfg.loss.pairing
    optimizer, scheduler = build_optimizer(raw_model, opt, len(data.train_loader))
    amp_dtype = _amp_dtype(opt.precision, session.device)
    return ModelParts(
        model=model,
        raw_model=raw_model,
        loss_fn=build_loss(cfg.loss),
        val_loss_fn=JointLoss(
            margin=cfg.loss.margin, rank_weight=cfg.loss.rank_weight, pairing=pairing
        ),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(session.device.type, enabled=amp_dtype is torch.float16),
        amp_dtype=amp_dtype,
        grad_clip=opt.grad_clip,
        device=session.device,
    )


def seed_epoch(seed: int, rank: int, epoch: int) -> None:
    """Seed the random draws of one epoch on one rank: flips, dropout, the loader's shuffle.

    Seeded per epoch, not once per run, so that an epoch draws the same whether the run
    went through or was resumed just before it (the generator's state is in no
    checkpoint). Epoch 0 gets ``seed + rank``; each epoch after it its own stream.
    """
    torch.manual_seed(seed + rank + _EPOCH_STRIDE * epoch)


_EPOCH_STRIDE = 1_000_003  # a prime above any rank count: no two (rank, epoch) share a seed


def resume(
    parts: ModelParts, resume_from: str, session: LoopSession, *, metric: str = SCORE_METRIC
) -> tuple[Progress, dict[str, Any] | None, bool]:
    """Load the checkpoint to continue from into ``parts``.

    The runner's own latest checkpoint of this run comes first (Ray Train's, after a
    worker group restarted or on a rerun of the same run name), else ``resume_from``
    (``--resume``, or the trial's last checkpoint when Tune restarts a trial).
    ``metric`` ranks the epochs (``run.checkpoint_metric``).

    Returns:
        (progress, the loaded state or None, whether Ray restarted this run).
    """
    state, restarted = None, False
    with session.restored_checkpoint() as folder:
        if folder is not None:
            state, restarted = load_checkpoint(folder), True
    if state is None and resume_from:
        state = load_checkpoint(resume_from)
    if state is None:
        return Progress(metric=metric), None, False
    parts.raw_model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        parts.scaler.load_state_dict(state["scaler"])
    progress = Progress(
        metric=metric,
        next_epoch=int(state["epoch"]) + 1,
        best=float(state["best_metric"]),
        best_epoch=int(state["best_epoch"]),
        history=[dict(m) for m in state.get("history", [])],
    )
    return progress, state, restarted


def _amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if device.type != "cuda":
        log.warning("optim.precision=%s needs a GPU; training in fp32 on %s", precision, device)
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16
