"""The worker loop: what every Ray Train worker runs, and a single-worker search trial too.

It reads like nanoGPT's loop: set up, resume, then per epoch train, validate with exact
metrics gathered from all ranks, checkpoint (rank 0) and report (every rank), log (rank
0). The parts live beside it: :mod:`.parts` (set-up), :mod:`.epoch` (one epoch), and
:mod:`.session` (what runs the loop: a Ray Train worker, Train's in-process local mode
with ``num_workers=0``, or a Tune trial's own process). What the driver hands the loop is
one typed, frozen :class:`LoopConfig`.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

from quakeray import storage
from quakeray.checkpoint import (
    METRICS_FILE,
    Predictions,
    build_state,
    checkpoint_dir_name,
    prune_checkpoints,
    save_checkpoint,
)
from quakeray.config import ExperimentConfig
from quakeray.data.prepare import PreparedData
from quakeray.tracking.outputs import FIGURES_DIR, write_prediction_figures
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
    seed_epoch,
)
from quakeray.train.session import LoopSession, session_for

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
    resume_from: str = ""  # checkpoint folder to continue from when Ray has none of its own
    # Without a worker group (Train's local mode, a trial in its own process) nothing
    # persists checkpoints for the loop: it writes them here itself (a path or a URI).
    checkpoint_dir: str = ""
    in_trial: bool = False  # the loop runs in a Tune trial's own process and reports to Tune
    progress_bar: bool = False  # bars for a person at a terminal; logs get one line per epoch
    # Rank 0 draws the validation figures of each new best epoch into its checkpoint
    # (a search's trials: the driver then only logs the files).
    figures: bool = False
    ray_log_level: str = "INFO"  # the lowest level of Ray's lines on this worker's console

    @property
    def on_driver(self) -> bool:
        """Whether the loop runs in the process a person started (Train's local mode)."""
        return bool(self.checkpoint_dir) and not self.in_trial


def train_loop_per_worker(spec: LoopConfig) -> None:
    """One worker (of Ray Train, or a trial's own process): train, validate, checkpoint, report."""
    import torch.distributed as dist

    cfg, epochs = spec.config, spec.config.optim.epochs
    session = session_for(spec.in_trial, use_gpu=cfg.scaling.use_gpu)
    rank, world = session.rank, session.world
    master = rank == 0  # only the master process logs and checkpoints
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    _quiet_console(spec)

    data = build_data(cfg, spec.data, rank=rank, world=world, device=session.device)
    parts = build_model_parts(cfg, data, session)
    metric = cfg.run.checkpoint_metric
    progress, state, restarted = resume(parts, spec.resume_from, session, metric=metric)
    logger = _epoch_logger(spec) if master else None
    if logger is not None and restarted and state is not None:
        # Crashed between report and log: the checkpointed epoch's point may be missing.
        logger.log_once(state["metrics"], epoch=int(state["epoch"]))

    for epoch in range(progress.next_epoch, epochs):
        seed_epoch(cfg.optim.seed, rank, epoch)  # a resumed epoch draws as it would have
        bar = progress_bar(
            len(data.train_sampler) * world,  # samples of all ranks: global samples/s
            f"epoch {epoch + 1}/{epochs}",
            enabled=master and spec.progress_bar,
            in_process=spec.on_driver,
        )
        totals = train_epoch(parts, data, epoch, distributed=distributed, bar=bar)
        bar.close()
        predictions = gather_predictions(parts, data, distributed=distributed)
        metrics = epoch_metrics(epoch, totals, predictions, parts, data)
        progress.record(metrics)
        _checkpoint_and_report(spec, session, parts, data, progress, predictions)
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
    session: LoopSession,
    parts: ModelParts,
    data: LoopData,
    progress: Progress,
    predictions: Predictions,
) -> None:
    """Rank 0 writes the epoch's checkpoint; every rank reports (Ray needs as many reports).

    In a worker group Ray persists the checkpoint (and keeps the best k); without one
    the loop uploads it to ``spec.checkpoint_dir`` and prunes the folder itself, before
    the report, so a reported checkpoint always exists.
    """
    epoch, metrics = progress.next_epoch - 1, progress.history[-1]
    staged, persisted = None, ""
    with tempfile.TemporaryDirectory() as tmp:
        if session.rank == 0:
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
                world_size=session.world,
                baseline=data.baseline,
            )
            staged = save_checkpoint(
                tmp, state, metrics=metrics, predictions=predictions, history=progress.history
            )
            if spec.figures and progress.best_epoch == epoch:
                write_prediction_figures(
                    staged / FIGURES_DIR,
                    predictions,
                    prefix="val_",
                    title=f"validation, epoch {epoch}",  # 0-based, as the epoch metric
                )
            if spec.checkpoint_dir:
                persisted = storage.join(spec.checkpoint_dir, checkpoint_dir_name(epoch))
                storage.upload_dir(staged, persisted, last=METRICS_FILE)
                run = spec.config.run
                prune_checkpoints(
                    spec.checkpoint_dir, run.checkpoints_to_keep, metric=run.checkpoint_metric
                )
                staged = None
        session.report(metrics, staged=staged, persisted=persisted)


def _quiet_console(spec: LoopConfig) -> None:
    """Other libraries' lines below ``spec.ray_log_level`` off a Ray worker's console.

    Ray Train's ``LoggingConfig`` covers its ``ray.train`` loggers only; a few of Ray's
    lines (the metric dict of every report) come from loggers named otherwise. Their
    records still reach Ray Train's log files, whose handlers are not filtered. Not in
    process (``num_workers=0``): the console is the driver's own.
    """
    threshold = logging.getLevelName(spec.ray_log_level.upper())
    if spec.on_driver or not isinstance(threshold, int) or threshold <= logging.INFO:
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
