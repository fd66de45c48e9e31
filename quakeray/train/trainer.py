"""The Ray Train side of a training run: the ``TorchTrainer``, its ``fit``, its best checkpoint.

:func:`build_trainer` wires a config, the prepared data and tracking into a
``TorchTrainer`` running :func:`~quakeray.train.loop.train_loop_per_worker` (``quakeray
train`` builds one; a search builds one per trial). :func:`fit` runs it and turns a
worker's :class:`~quakeray.errors.QuakerayError` back into itself, and Ray's SIGINT
handling into ``KeyboardInterrupt``. :func:`best_checkpoint_path` reads the result.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from quakeray import storage
from quakeray.checkpoint import best_checkpoint_at, latest_checkpoint_at, rank_key
from quakeray.config import ExperimentConfig
from quakeray.data.prepare import PreparedData
from quakeray.errors import QuakerayError
from quakeray.train.loop import LoopConfig, train_loop_per_worker

if TYPE_CHECKING:
    import ray.train.torch

__all__ = ["best_checkpoint_path", "build_trainer", "fit", "loop_config"]


def build_trainer(
    cfg: ExperimentConfig,
    *,
    data: PreparedData,
    name: str,
    storage_path: str,
    tracking_uri: str,
    mlflow_run_id: str | None,
    log_metrics: bool = True,
    callbacks: Sequence[Any] = (),
    resume_from: str | None = None,
    ray_log_level: str = "INFO",
    figures: bool = False,
) -> ray.train.torch.TorchTrainer:
    """A ``TorchTrainer`` for one training run.

    Args:
        cfg: Resolved config.
        data: From :func:`quakeray.data.prepare.prepare_data`.
        name: Train run name; a stable name makes a restarted run resume from its last
            checkpoint in ``<storage_path>/<name>``.
        storage_path: Where checkpoints go (shared storage on multi-node clusters).
        tracking_uri: Absolute MLflow URI; rank 0 logs into ``mlflow_run_id`` there.
        mlflow_run_id: The run this training belongs to, recorded in its checkpoints
            (None: no MLflow run).
        log_metrics: Rank 0 logs each epoch into ``mlflow_run_id``. A search turns it
            off: its driver logs what Tune receives, so workers never import MLflow.
        callbacks: Ray *Train* callbacks (the search passes ``TuneReportCallback()``).
        resume_from: Checkpoint folder to continue from (``--resume``), used when Ray has
            no checkpoint of its own for this run.
        ray_log_level: The lowest level of Ray's own lines on the consoles of Train's
            processes ("WARNING" hides "Reporting training result ..." and the like);
            all of them stay in ``<session>/logs/train/ray-train-*.log``.
        figures: Rank 0 draws the validation figures of each new best epoch into its
            checkpoint (a search's trial; the driver only logs them).
    """
    import ray.train
    import ray.train.torch

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    sc = cfg.scaling
    # Ray reads the controller's poll interval from the environment of the process that
    # calls fit() and passes it on to the controller.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(sc.poll_interval_s)
    location = storage.resolve(storage_path)
    spec = loop_config(
        cfg,
        data=data,
        run_dir=storage.join(location, name),
        tracking_uri=tracking_uri,
        mlflow_run_id=mlflow_run_id,
        log_metrics=log_metrics,
        resume_from=resume_from,
        ray_log_level=ray_log_level,
        figures=figures,
    )
    resources: dict[str, float] = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    return ray.train.torch.TorchTrainer(
        # Ray passes train_loop_config to the loop as it is; its annotations say dict.
        train_loop_per_worker,  # type: ignore[arg-type]
        train_loop_config=spec,  # type: ignore[arg-type]
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=resources,
            placement_strategy=sc.placement_strategy,
        ),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=location,
            callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.checkpoints_to_keep,
                checkpoint_score_attribute=cfg.run.checkpoint_metric,
                checkpoint_score_order="min",
            ),
            # Train V2's RunConfig (RAY_TRAIN_V2_ENABLED); its stubs are V1's.
            logging_config=ray.train.LoggingConfig(log_level=ray_log_level),
        ),  # type: ignore[call-arg]
    )


def loop_config(
    cfg: ExperimentConfig,
    *,
    data: PreparedData,
    run_dir: str,
    tracking_uri: str,
    mlflow_run_id: str | None,
    log_metrics: bool = True,
    resume_from: str | None = None,
    in_trial: bool = False,
    ray_log_level: str = "INFO",
    figures: bool = False,
) -> LoopConfig:
    """The loop's contract for one run whose checkpoints go to ``run_dir``.

    Without a worker group (Train's local mode, ``num_workers=0``; a trial in its own
    process, ``in_trial``) nothing persists checkpoints for the loop: it writes them to
    ``run_dir`` itself and continues from the newest one there, as Ray Train would from
    its own storage on a rerun of the same name. Arguments as :func:`build_trainer`'s.
    """
    checkpoint_dir = ""
    if in_trial or cfg.scaling.num_workers == 0:
        checkpoint_dir = run_dir
        resume_from = resume_from or latest_checkpoint_at(run_dir)
    return LoopConfig(
        config=cfg,
        data=data,
        tracking_uri=tracking_uri,
        mlflow_run_id=mlflow_run_id or "",
        log_metrics=log_metrics,
        resume_from=resume_from or "",
        checkpoint_dir=checkpoint_dir,
        in_trial=in_trial,
        # Bars only for a person at a terminal: in logs (Ray jobs, Tune trials, CI) every
        # redraw becomes a line; the per-epoch summary line carries samples/s anyway.
        progress_bar=sys.stderr.isatty(),
        ray_log_level=ray_log_level,
        figures=figures,
    )


def fit(trainer: Any) -> Any:
    """``trainer.fit()``, re-raising a worker's QuakerayError as itself (one line).

    In the main thread ``fit`` installs Ray's own SIGINT handler, which aborts the run
    and then raises ``SystemExit`` (and stays installed). A Ctrl-C must reach the caller
    as ``KeyboardInterrupt`` (the MLflow run ends KILLED, the CLI exits 130), so the
    ``SystemExit`` is translated and the previous handler put back.
    """
    from ray.train import ControllerError, WorkerGroupError

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        return trainer.fit()
    except SystemExit:
        raise KeyboardInterrupt("training aborted by SIGINT") from None
    except WorkerGroupError as exc:
        for failure in exc.worker_failures.values():
            cause = _find_quakeray_error(failure)
            if cause is not None:
                raise cause from None
        raise
    except ControllerError as exc:
        cause = _find_quakeray_error(exc.controller_failure)
        if cause is not None:
            raise cause from None
        raise
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGINT, previous)


def best_checkpoint_path(result: Any, *, run_dir: str, metric: str) -> str | None:
    """The best checkpoint of a finished ``fit``, as a path or URI.

    Ranked by :func:`~quakeray.checkpoint.rank_key` on ``metric``, the run's
    ``run.checkpoint_metric``.
    """
    scored = [
        (rank_key(metrics.get(metric), int(metrics.get("epoch", 0))), str(ckpt.path))
        for ckpt, metrics in getattr(result, "best_checkpoints", None) or []
    ]
    scored = [(key, path) for key, path in scored if math.isfinite(key[0])]
    if scored:
        return storage.with_scheme_of(min(scored)[1], run_dir)
    found = best_checkpoint_at(run_dir, metric)
    if found is not None:
        return found
    ckpt = getattr(result, "checkpoint", None)
    return storage.with_scheme_of(str(ckpt.path), run_dir) if ckpt is not None else None


def _find_quakeray_error(exc: BaseException | None) -> QuakerayError | None:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, QuakerayError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return None
