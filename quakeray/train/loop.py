"""The worker loop: what every Ray Train worker runs (in-process with ``num_workers=0``).

It reads like nanoGPT's loop: set up, resume, then per epoch train, validate with exact
metrics gathered from all ranks, checkpoint (rank 0) and report (every rank), log (rank
0). The parts live beside it: :mod:`.parts` (set-up), :mod:`.epoch` (one epoch). What the
driver hands the workers is one typed, frozen :class:`LoopConfig`.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from quakeray.checkpoint import (
    Predictions,
    build_state,
    checkpoint_dir_name,
    prune_checkpoints,
    save_checkpoint,
)
from quakeray.config import ExperimentConfig
from quakeray.data.prepare import PreparedData
from quakeray.train.epoch import (
    epoch_line,
    epoch_metrics,
    gather_predictions,
    progress_bar,
    train_epoch,
)
from quakeray.train.parts import (
    LoopData,
    ModelParts,
    Progress,
    build_data,
    build_model_parts,
    resume,
)

if TYPE_CHECKING:
    from quakeray.tracking.outage import EpochLog

__all__ = ["LoopConfig", "train_loop_per_worker"]


@dataclass(frozen=True)
class LoopConfig:
    """The contract between the driver and every worker of one training run."""

    config: ExperimentConfig  # the run's resolved config
    data: PreparedData  # the data file and statistics every worker opens
    tracking_uri: str  # absolute MLflow URI (recorded in checkpoints; rank 0 logs there)
    mlflow_run_id: str = ""  # the run this training belongs to; "" = none
    log_metrics: bool = True  # rank 0 logs each epoch (a search's driver logs what Tune gets)
    resume_from: str = ""  # --resume checkpoint folder, used when Ray has none of its own
    local_checkpoint_dir: str = ""  # in-process run: the loop writes checkpoints here itself
    progress_bar: bool = False  # bars for a person at a terminal; logs get one line per epoch
    ray_log_level: str = "INFO"  # the lowest level of Ray's lines on this worker's console


def train_loop_per_worker(spec: LoopConfig) -> None:
    """One Ray Train worker: train, validate exactly, checkpoint (rank 0), report, log."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg, epochs = spec.config, spec.config.optim.epochs
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    master = rank == 0  # only the master process logs and checkpoints
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    device = ray.train.torch.get_device()
    _quiet_console(spec)

    data = build_data(cfg, spec.data, rank=rank, world=world, device=device)
    parts = build_model_parts(cfg, data, rank=rank, device=device)
    progress, state, restarted = resume(parts, spec.resume_from, metric=cfg.run.checkpoint_metric)
    logger = _epoch_logger(spec) if master else None
    if logger is not None and restarted and state is not None:
        # Crashed between report and log: the checkpointed epoch's point may be missing.
        logger.log_once(state["metrics"], epoch=int(state["epoch"]))

    for epoch in range(progress.next_epoch, epochs):
        bar = progress_bar(
            len(data.train_sampler) * world,  # samples of all ranks: global samples/s
            f"epoch {epoch + 1}/{epochs}",
            enabled=master and spec.progress_bar,
            in_process=bool(spec.local_checkpoint_dir),
        )
        totals = train_epoch(parts, data, epoch, distributed=distributed, bar=bar)
        bar.close()
        predictions = gather_predictions(parts, data, distributed=distributed)
        metrics = epoch_metrics(epoch, totals, predictions, parts, data)
        progress.record(metrics)
        _checkpoint_and_report(spec, parts, data, progress, predictions, master=master)
        if master:
            # Logged after report: a point in MLflow means its checkpoint is persisted.
            if logger is not None:
                logger.log_once(metrics, epoch=epoch)
            # Not print(): Ray Train patches it in workers and, with stdout wrapped (as
            # MLflow does), the line reaches the driver twice.
            sys.stdout.write(epoch_line(metrics, epochs) + "\n")
            sys.stdout.flush()
    if logger is not None:
        logger.flush()  # a last try for epochs held back while MLflow was away


def _checkpoint_and_report(
    spec: LoopConfig,
    parts: ModelParts,
    data: LoopData,
    progress: Progress,
    predictions: Predictions,
    *,
    master: bool,
) -> None:
    """Rank 0 writes the epoch's checkpoint; every rank reports (Ray needs as many reports)."""
    import ray.train

    epoch, metrics = progress.next_epoch - 1, progress.history[-1]
    local_dir = spec.local_checkpoint_dir
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if master:
            folder = Path(local_dir) / checkpoint_dir_name(epoch) if local_dir else Path(tmp)
            state = build_state(
                model=parts.raw_model,
                optimizer=parts.optimizer,
                scheduler=parts.scheduler,
                scaler=parts.scaler,
                epoch=epoch,
                best_metric=progress.best,
                best_epoch=progress.best_epoch,
                history=progress.history,
                config=spec.config,
                stats=data.stats,
                img_size=data.img_size,
                native_size=data.native_size,
                data_path=spec.data.path,
                mlflow_run_id=spec.mlflow_run_id,
                tracking_uri=spec.tracking_uri,
                world_size=ray.train.get_context().get_world_size(),
                baseline=data.baseline,
            )
            save_checkpoint(
                folder, state, metrics=metrics, predictions=predictions, history=progress.history
            )
            checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report(
            metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(epoch)
        )
    if master and local_dir:
        run = spec.config.run
        prune_checkpoints(local_dir, run.checkpoints_to_keep, metric=run.checkpoint_metric)


def _quiet_console(spec: LoopConfig) -> None:
    """Other libraries' lines below ``spec.ray_log_level`` off a Ray worker's console.

    Ray Train's ``LoggingConfig`` covers its ``ray.train`` loggers only; a few of Ray's
    lines (the metric dict of every report) come from loggers named otherwise. Their
    records still reach Ray Train's log files, whose handlers are not filtered. Not in
    process (``num_workers=0``): the console is the driver's own.
    """
    threshold = logging.getLevelName(spec.ray_log_level.upper())
    if spec.local_checkpoint_dir or not isinstance(threshold, int) or threshold <= logging.INFO:
        return

    def shown(record: logging.LogRecord) -> bool:
        return record.levelno >= threshold or record.name.startswith("quakeray")

    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            handler.addFilter(shown)


def _epoch_logger(spec: LoopConfig) -> EpochLog | None:
    """Rank 0's MLflow log of epochs, when this run logs its own (a search's driver does not)."""
    if not (spec.mlflow_run_id and spec.log_metrics):
        return None
    from quakeray.tracking.outage import EpochLog

    return EpochLog(spec.tracking_uri, spec.mlflow_run_id)
