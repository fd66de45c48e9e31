"""``quakeray train``: check everything, train one backbone with Ray Train, track it, summarise.

Cheapest checks first, then one MLflow run around one ``fit``, closed FINISHED, FAILED or
KILLED. A rerun with the same ``run.name`` continues that run's checkpoints in the same
MLflow run (its folder's ``quakeray_run.json`` names it).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from quakeray import storage
from quakeray.checkpoint import (
    STATE_FILE,
    check_compatible,
    find_checkpoints,
    load_checkpoint,
    read_metrics,
    resolve_state_file,
)
from quakeray.config import ExperimentConfig, to_dict
from quakeray.data.prepare import PreparedData, prepare_data
from quakeray.errors import CheckpointError, TrackingError
from quakeray.locks import claimed
from quakeray.tracking.store import RunStatus
from quakeray.train.trainer import best_checkpoint_path, build_trainer, fit

__all__ = ["RUN_INFO_FILE", "TrainSummary", "run_training"]

log = logging.getLogger(__name__)

RUN_INFO_FILE = "quakeray_run.json"
"""Written into ``<storage>/<run name>/``: the MLflow run of that Train run, so a rerun
with the same ``run.name`` resumes into the same MLflow run."""


@dataclass
class TrainSummary:
    """What ``quakeray train`` produced."""

    run_name: str
    run_dir: str
    best_checkpoint: str | None
    best_epoch: int | None
    best_metrics: dict[str, float]
    last_metrics: dict[str, float]
    mlflow_run_id: str
    tracking_uri: str
    wall_s: float

    def format(self) -> str:
        """The end-of-run summary printed to the user."""
        from quakeray.tracking import mlflow_ui_command

        lines = [f"run {self.run_name} finished in {self.wall_s:.0f} s"]
        if self.best_epoch is not None:
            lines.append(f"  best epoch       {self.best_epoch} (0-based: MLflow's epoch and step)")
        best = self.best_metrics
        for key in ("val_MAE", "val_RMSE", "val_spearman", "val_rank_acc", "val_detection_acc"):
            if key in best:
                lines.append(f"  {key:<16} {best[key]:.4f}")
        constant = best.get("val_MAE_const_median")
        if constant and "val_MAE" in best:
            lines.append(
                f"  constant         val_MAE {constant:.4f} predicting the train median: the "
                f"model's is {best['val_MAE'] / constant:.2f} x that"
            )
        lines.append(f"  best checkpoint  {self.best_checkpoint}")
        lines.append(f"  MLflow run       {self.mlflow_run_id} in {self.tracking_uri}")
        lines.append(f"  browse with      {mlflow_ui_command(self.tracking_uri)}")
        return "\n".join(lines)


def run_training(cfg: ExperimentConfig, resume: str | None = None) -> TrainSummary:
    """``quakeray train``: check everything, train, track, summarise.

    Order, cheapest checks first: print the resolved config; check the tracking store;
    check ``--resume``; hold the run folder (one process at a time); check the
    checkpoints a rerun of ``run.name`` resumes; prepare data; check the model builds;
    start or join Ray and check its resources; cluster preflight; open the MLflow run
    and log the config; fit; log the best checkpoint's outputs; close the run FINISHED
    (FAILED on error, KILLED on Ctrl-C).

    Raises:
        QuakerayError: Any bad input, before training where it can be known then.
        BusyError: Another process trains in the same run folder.
    """
    from quakeray import tracking

    t0 = time.monotonic()
    print("resolved config:\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False), flush=True)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_tracking(uri)
    resume_from = _check_resume(cfg, resume)
    location = storage.resolve(cfg.run.storage_path)
    name = cfg.run.name or _generated_name(cfg)
    run_dir = storage.join(location, name)
    # Two processes in one folder would prune each other's checkpoints and point its
    # quakeray_run.json at the wrong MLflow run: the second is refused in one line.
    with claimed(run_dir, what="run folder", instead="choose another run.name"):
        summary = _train(cfg, uri, resume_from, location=location, name=name, run_dir=run_dir)
    summary.wall_s = time.monotonic() - t0
    print(summary.format(), flush=True)
    return summary


def _train(
    cfg: ExperimentConfig,
    uri: str,
    resume_from: str | None,
    *,
    location: str,
    name: str,
    run_dir: str,
) -> TrainSummary:
    """Everything after the run folder is this process's: Ray, data, the MLflow run, fit."""
    from quakeray import tracking
    from quakeray.runtime import is_verbose
    from quakeray.tracking.datasets import log_dataset

    _check_rerun(cfg, run_dir, name)
    data = _prepare_cluster_and_data(cfg, uri=uri, location=location)
    run_id, new_run = _open_run(cfg, uri, run_dir, name=name, resume_from=resume_from)
    # From here on the run is RUNNING: every exit path must close it.
    try:
        if new_run:
            tracking.log_config(uri, run_id, cfg)
            log_dataset(uri, run_id, data.path, ["train", "validation"])
            _write_run_info(run_dir, uri, run_id)
        print(f"MLflow run {run_id} in {uri}; checkpoints in {run_dir}", flush=True)
        trainer = build_trainer(
            cfg,
            data=data,
            name=name,
            storage_path=location,
            tracking_uri=uri,
            mlflow_run_id=run_id,
            resume_from=resume_from,
            ray_log_level="INFO" if is_verbose() else "WARNING",
        )
        result = fit(trainer)
        best = best_checkpoint_path(result, run_dir=run_dir, metric=cfg.run.checkpoint_metric)
        if best is None:
            raise CheckpointError(f"training wrote no checkpoint under {run_dir}")
    except BaseException as exc:
        _end_if_possible(uri, run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    _close_run(uri, run_id, cfg, best, run_dir=run_dir)
    return _summary(result, best, name=name, run_dir=run_dir, run_id=run_id, uri=uri)


def _close_run(uri: str, run_id: str, cfg: ExperimentConfig, best: str, *, run_dir: str) -> None:
    """The best checkpoint's outputs logged and the run FINISHED, or how to do it later.

    Raises:
        TrackingError: Training ended well but the tracking server is away: the run's
            record is completed later from its checkpoints with ``quakeray sync``.
    """
    from quakeray import tracking
    from quakeray.tracking.outage import answers
    from quakeray.tracking.outputs import finalize_run

    try:
        if not answers(uri):  # else MLflow's client retries each call for minutes
            raise ConnectionError("no answer on /health")
        finalize_run(uri, run_id, cfg, best)
        tracking.end_run(uri, run_id, "FINISHED")
    except Exception as exc:
        if answers(uri):
            _end_if_possible(uri, run_id, "FAILED")
            raise
        raise TrackingError(
            f"training finished (best checkpoint {best}) but MLflow at {uri} does not answer "
            f"({type(exc).__name__}), so run {run_id} is incomplete there; when it is back, "
            f"run: quakeray sync {run_dir}"
        ) from None


def _end_if_possible(uri: str, run_id: str, status: RunStatus) -> None:
    """Close the run with ``status``; a tracking server that is away does not mask the cause."""
    from quakeray import tracking

    try:
        tracking.end_run(uri, run_id, status)
    except Exception:
        log.warning("could not mark MLflow run %s %s (is %s up?)", run_id, status, uri)


def _generated_name(cfg: ExperimentConfig) -> str:
    """``train-<backbone>-<time>-<4 hex>``: two runs started in the same second differ."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"train-{_slug(cfg.model.backbone)}-{stamp}-{secrets.token_hex(2)}"


def _check_resume(cfg: ExperimentConfig, resume: str | None) -> str | None:
    """The ``--resume`` checkpoint folder, once it is known to fit ``cfg``."""
    if not resume:
        return None
    if storage.is_remote(resume) and not storage.on_local_disk(resume):
        check_compatible(load_checkpoint(resume), cfg, source=resume)
        return resume.removesuffix(f"/{STATE_FILE}")  # the folder, in the bucket
    state_file = resolve_state_file(storage.local_path(resume))
    check_compatible(load_checkpoint(state_file), cfg, source=str(resume))
    return str(state_file.parent.resolve())


def _check_rerun(cfg: ExperimentConfig, run_dir: str, name: str) -> None:
    """Refuse a rerun of ``run.name`` whose checkpoints another model or schedule wrote.

    A rerun of a name resumes from its last checkpoint (Ray, or local mode): a different
    backbone or schedule would fail in every worker, so it is refused here.
    """
    earlier = [] if storage.is_remote(run_dir) else find_checkpoints(run_dir)
    if earlier:
        check_compatible(
            load_checkpoint(earlier[-1]),
            cfg,
            source=f"run.name={name} ({earlier[-1]})",
            instead="choose another run.name",
        )


def _prepare_cluster_and_data(cfg: ExperimentConfig, *, uri: str, location: str) -> PreparedData:
    """The data prepared and the model checked, then Ray started (or joined), sized, checked."""
    from quakeray.preflight import check_model, preflight
    from quakeray.runtime import check_resources, init_ray

    # Data and model first: a bad file or backbone fails in seconds, before Ray starts.
    data = prepare_data(cfg)
    check_model(cfg, data)
    if cfg.scaling.num_workers > 0:
        init_ray(cfg, worker_output=True)  # rank 0's epoch lines and progress bars
        check_resources(cfg)
        preflight(cfg, data_path=data.path, tracking_uri=uri, storage_path=location)
    return data


def _open_run(
    cfg: ExperimentConfig, uri: str, run_dir: str, *, name: str, resume_from: str | None
) -> tuple[str, bool]:
    """(run id, whether it is new): the run of an earlier Train run of this name, else a new one."""
    from quakeray import tracking
    from quakeray.tracking import tags

    run_id = _reuse_run(uri, run_dir) if cfg.run.name else None
    if run_id is not None:
        return run_id, False
    experiment_id = tracking.get_or_create_experiment(uri, cfg.tracking.experiment)
    run_id = tracking.start_run(
        uri,
        experiment_id,
        run_name=cfg.tracking.run_name or name,
        tags={
            tags.RUN_DIR: run_dir,
            tags.BACKBONE: cfg.model.backbone,
            **({tags.RESUMED_FROM: resume_from} if resume_from else {}),
        },
    )
    return run_id, True


def _summary(
    result: object, best: str, *, name: str, run_dir: str, run_id: str, uri: str
) -> TrainSummary:
    with storage.local_copy(best) as folder:
        best_metrics = {k: v for k, v in read_metrics(folder).items() if v is not None}
    reported = getattr(result, "metrics", None) or {}
    last = {k: float(v) for k, v in reported.items() if isinstance(v, (int, float))}
    return TrainSummary(
        run_name=name,
        run_dir=run_dir,
        best_checkpoint=best,
        best_epoch=int(best_metrics["epoch"]) if "epoch" in best_metrics else None,
        best_metrics=best_metrics,
        last_metrics=last,
        mlflow_run_id=run_id,
        tracking_uri=uri,
        wall_s=0.0,
    )


def _reuse_run(uri: str, run_dir: str) -> str | None:
    """MLflow run of an earlier Train run with this folder (rerun with the same name)."""
    from quakeray import tracking

    if storage.is_remote(run_dir):
        return None
    info_file = Path(run_dir) / RUN_INFO_FILE
    if not info_file.is_file():
        return None
    info = json.loads(info_file.read_text())
    if info.get("tracking_uri") != uri:
        return None
    try:
        tracking.run_status(uri, info["run_id"])
    except Exception:
        return None
    tracking.mlflow_client(uri).update_run(info["run_id"], status="RUNNING")
    log.info("resuming into MLflow run %s of %s", info["run_id"], run_dir)
    return str(info["run_id"])


def _write_run_info(run_dir: str, uri: str, run_id: str) -> None:
    if storage.is_remote(run_dir):
        return
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_INFO_FILE).write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
