"""Data-parallel training with Ray Train (V2): the worker loop, the trainer, the command.

Three layers, each usable alone:

- :func:`train_loop_per_worker` runs on every Ray Train worker (or in-process with
  ``scaling.num_workers=0``). It reads like nanoGPT's loop: set up data, model, optimiser;
  resume if there is a checkpoint; then per epoch train, validate with exact metrics
  gathered from all ranks, checkpoint (rank 0), report, log (rank 0).
- :func:`build_trainer` wires config, data, tracking and callbacks into a ``TorchTrainer``;
  the search builds one per trial with it.
- :func:`run_training` is ``quakeray train``: checks first (tracking, resources, cluster,
  data), then one MLflow run around one ``fit``, closed FINISHED, FAILED or KILLED.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from quakeray.checkpoint import (
    PREDICTIONS_FILE,
    Predictions,
    best_checkpoint,
    check_compatible,
    checkpoint_config,
    checkpoint_dir_name,
    find_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_metrics,
    read_predictions,
    resolve_state_file,
    save_checkpoint,
)
from quakeray.config import ExperimentConfig, from_dict, replace, to_dict
from quakeray.errors import CheckpointError, DataError, QuakerayError
from quakeray.evaluate import (
    BEST_CHECKPOINT_TAG,
    InferenceModel,
    build_inference_parts,
    predict_batches,
    split_metrics,
    stats_to_state,
)

if TYPE_CHECKING:
    import ray.train.torch
    import torch

log = logging.getLogger(__name__)

SCORE_METRIC = "val_MAE"
"""Checkpoints are ranked by this metric (lower is better)."""

RUN_INFO_FILE = "quakeray_run.json"
"""Written into ``<storage>/<run name>/``: the MLflow run of that Train run, so a rerun
with the same ``run.name`` resumes into the same MLflow run."""

METRIC_NAMES = (
    "epoch",
    "train_loss",
    "train_mse",
    "train_rank",
    "val_loss",
    "val_MAE",
    "val_RMSE",
    "val_spearman",
    "val_kendall",
    "val_rank_acc",
    "val_detection_acc",
    "val_MAE_pos",
    "lr",
    "samples_per_s",
)
"""Reported to Ray (and Tune) and logged to MLflow each epoch (step = epoch)."""


# --------------------------------------------------------------------------- driver side


@dataclass(frozen=True)
class PreparedData:
    """The data file and its normalisation statistics, as absolute paths."""

    path: str
    stats_path: str | None


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
    extra: dict[str, Any] = field(default_factory=dict)

    def format(self) -> str:
        """The end-of-run summary printed to the user."""
        lines = [f"run {self.run_name} finished in {self.wall_s:.0f} s"]
        if self.best_epoch is not None:
            lines.append(f"  best epoch       {self.best_epoch + 1}")
        for key in ("val_MAE", "val_RMSE", "val_spearman", "val_rank_acc", "val_detection_acc"):
            if key in self.best_metrics:
                lines.append(f"  {key:<16} {self.best_metrics[key]:.4f}")
        lines.append(f"  best checkpoint  {self.best_checkpoint}")
        lines.append(f"  MLflow run       {self.mlflow_run_id} in {self.tracking_uri}")
        lines.append(f"  browse with      {mlflow_ui_command(self.tracking_uri)}")
        return "\n".join(lines)


def mlflow_ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def resolve_storage_path(path: str) -> str:
    """``run.storage_path`` made absolute (URIs such as s3:// are kept)."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def prepare_data(cfg: ExperimentConfig) -> PreparedData:
    """Make the data usable by every worker, once, on the driver.

    ``data.path`` "" generates a synthetic file under ``<storage>/data/`` (reused when
    present: same settings, same file). Statistics are computed and saved when
    normalising and missing. Both splits the loop needs must hold samples.

    Raises:
        DataError: Missing or malformed file, empty train/val split, statistics that do
            not match the transform settings.
    """
    from quakeray.data.quakeset import QuakeSetDataset
    from quakeray.data.synthetic import write_synthetic
    from quakeray.data.transforms import (
        ChannelStats,
        build_transform,
        compute_stats,
        default_stats_path,
    )

    d = cfg.data
    if d.path:
        path = Path(d.path).expanduser().resolve()
        if not path.is_file():
            raise DataError(
                f"data file not found: {path}; set data.path to a QuakeSet HDF5 file "
                "(quakeray data download) or data.path= for synthetic data"
            )
    else:
        storage = cfg.run.storage_path
        root = (
            Path(tempfile.gettempdir()) / "quakeray-data"
            if "://" in storage
            else Path(storage).expanduser().resolve() / "data"
        )
        path = (
            root / f"synthetic-e{d.synthetic_events}-s{d.synthetic_size}-seed{d.synthetic_seed}.h5"
        )
        if not path.is_file():
            root.mkdir(parents=True, exist_ok=True)
            write_synthetic(
                path, events=d.synthetic_events, size=d.synthetic_size, seed=d.synthetic_seed
            )
    for split in ("train", "val"):
        n = len(QuakeSetDataset(path, split, positives_only=d.positives_only))  # type: ignore[arg-type]
        if n == 0:
            raise DataError(f"{path}: the {split} split holds no samples; use a file with one")
    stats_path: Path | None = None
    if d.normalize:
        stats_path = (
            Path(d.stats_path).expanduser().resolve() if d.stats_path else default_stats_path(path)
        )
        if stats_path.is_file():
            stats = ChannelStats.load(stats_path)
        else:
            stats = compute_stats(path, to_db=d.to_db, eps=d.db_eps, nan_fill=d.nan_fill)
            stats.save(stats_path)
        build_transform(d, stats)  # DataError if the statistics are of another domain
    return PreparedData(str(path), str(stats_path) if stats_path else None)


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
) -> ray.train.torch.TorchTrainer:
    """A ``TorchTrainer`` for one training run.

    Args:
        cfg: Resolved config.
        data: From :func:`prepare_data`.
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
    """
    import ray.train
    import ray.train.torch

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    sc = cfg.scaling
    # Ray reads the controller's poll interval from the environment of the process that
    # calls fit() and passes it on to the controller.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(sc.poll_interval_s)
    storage = resolve_storage_path(storage_path)
    local_dir = ""
    if sc.num_workers == 0:
        # Local mode does not persist checkpoints: the loop writes them where Ray would.
        base = storage if "://" not in storage else tempfile.mkdtemp(prefix="quakeray-")
        local_dir = str(Path(base) / name)
        # ... and resumes from them as Ray would from its own storage (a rerun of a name).
        earlier = find_checkpoints(local_dir)
        if earlier and not resume_from:
            resume_from = str(earlier[-1])
    loop_config = {
        "config": to_dict(cfg),
        "data_path": data.path,
        "stats_path": data.stats_path,
        "tracking_uri": tracking_uri,
        "mlflow_run_id": mlflow_run_id,
        "log_metrics": log_metrics,
        "resume_from": resume_from,
        "local_checkpoint_dir": local_dir,
        # Bars only for a person at a terminal: in logs (Ray jobs, Tune trials, CI) every
        # redraw becomes a line; the per-epoch summary line carries samples/s anyway.
        "progress_bar": sys.stderr.isatty(),
    }
    resources: dict[str, float] = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=resources,
            placement_strategy=sc.placement_strategy,
        ),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.checkpoints_to_keep,
                checkpoint_score_attribute=SCORE_METRIC,
                checkpoint_score_order="min",
            ),
        ),
    )


def best_checkpoint_path(result: Any, *, run_dir: str) -> str | None:
    """The best checkpoint of a finished ``fit`` (by val_MAE), as a path or URI."""
    scored = []
    for ckpt, metrics in getattr(result, "best_checkpoints", None) or []:
        value = metrics.get(SCORE_METRIC, math.nan)
        if value is not None and math.isfinite(value):
            path = checkpoint_uri(str(ckpt.path), run_dir)
            scored.append((value, -int(metrics.get("epoch", 0)), path))
    if scored:
        return str(min(scored)[2])
    local = best_checkpoint(run_dir) if "://" not in run_dir else None
    if local is not None:
        return str(local)
    ckpt = getattr(result, "checkpoint", None)
    return checkpoint_uri(str(ckpt.path), run_dir) if ckpt is not None else None


def checkpoint_uri(path: str, storage: str) -> str:
    """A checkpoint path as Ray reports it (no scheme) in the scheme of its ``storage``."""
    if "://" in storage and "://" not in path:
        return f"{storage.split('://', 1)[0]}://{path}"
    return path


@contextmanager
def local_checkpoint(path: str) -> Iterator[Path]:
    """A local folder with the checkpoint's files (downloaded when ``path`` is a URI)."""
    if "://" not in path:
        yield Path(path)
        return
    import ray.train

    with ray.train.Checkpoint(path).as_directory() as folder:
        yield Path(folder)


def finalize_run(uri: str, run_id: str, cfg: ExperimentConfig, checkpoint_path: str) -> None:
    """Log the best checkpoint's outputs into the MLflow run (on a driver, after fit).

    Logs the validation predictions CSV, the scatter and per-bin figures, the best
    epoch's metrics as ``best_*``, the ``quakeray.best_checkpoint`` tag (used by
    ``quakeray evaluate RUN_ID``), and the model with a signature (when
    ``tracking.log_model``). Does not change the run's status.
    """
    from quakeray.metrics import per_bin_errors
    from quakeray.plots import format_bin_table, per_bin_figure, scatter_figure
    from quakeray.tracking import RunLogger

    logger = RunLogger(uri, run_id)
    with local_checkpoint(checkpoint_path) as folder:
        state = load_checkpoint(folder)
        epoch = int(state["epoch"])
        logger.set_tags({BEST_CHECKPOINT_TAG: checkpoint_path, "quakeray.best_epoch": epoch})
        metrics = {k: v for k, v in read_metrics(folder).items() if v is not None}
        logger.log_metrics(
            {f"best_{k}": v for k, v in metrics.items() if k.startswith("val_")}, step=epoch
        )
        if (folder / PREDICTIONS_FILE).is_file():
            logger.log_artifact(folder / PREDICTIONS_FILE, "predictions")
            p = read_predictions(folder / PREDICTIONS_FILE)
            target = np.asarray(p.magnitude)
            pred = np.asarray(p.prediction)
            bins = per_bin_errors(pred, target)
            title = f"validation, epoch {epoch + 1}"
            logger.log_figure(
                scatter_figure(target, pred, np.asarray(p.label), title=title),
                "plots/val_scatter.png",
            )
            logger.log_figure(per_bin_figure(bins, title=title), "plots/val_per_bin.png")
            logger.log_text(format_bin_table(bins), "plots/val_per_bin.txt")
        if cfg.tracking.log_model:
            log_model(uri, run_id, state)


def log_model(uri: str, run_id: str, state: Mapping[str, Any]) -> None:
    """Log transform + model as one MLflow PyTorch model with a signature.

    The logged module takes *raw* linear backscatter ``(B, 4, H, W)`` (NaN allowed) and
    returns magnitudes ``(B,)``: the normalisation travels with the weights. The
    quakeray package is shipped in ``code_paths`` so the model loads without it
    installed.
    """
    import mlflow
    import mlflow.pytorch
    import timm
    import torch
    from mlflow.models import infer_signature

    import quakeray

    cfg = checkpoint_config(state)
    model, transform = build_inference_parts(cfg, state)
    wrapped = InferenceModel(transform, model).eval()
    side = int(state["native_size"])
    rng = np.random.default_rng(0)
    example = rng.gamma(1.0, 0.1, size=(2, 4, side, side)).astype(np.float32)
    with torch.no_grad():
        output = wrapped(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    status = client.get_run(run_id).info.status
    # log_model files the model under the *active* run's experiment (else experiment 0,
    # where runs:/<id>/model cannot find it): make the run active for the call, then
    # give it back the status it had (leaving the context marks it FINISHED).
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        mlflow.pytorch.log_model(
            wrapped,
            name="model",
            signature=signature,
            code_paths=[str(Path(quakeray.__file__).parent)],
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"timm=={timm.__version__}",
                f"numpy=={np.__version__}",
            ],
            # pickle, not MLflow 3's default pt2 export: pt2 needs an input example (8 MB
            # of JSON at 512 px) and traces data-dependent NaN handling poorly.
            serialization_format="pickle",
        )
    client.update_run(run_id, status=status)


def run_training(cfg: ExperimentConfig, resume: str | None = None) -> TrainSummary:
    """``quakeray train``: check everything, train, track, summarise.

    Order, cheapest checks first: print the resolved config; check the tracking store;
    check ``--resume`` (and the checkpoints a rerun of ``run.name`` resumes); start or
    join Ray and check its resources; prepare data; check the model builds; cluster
    preflight; open the MLflow run and log the config; fit; log the best checkpoint's
    outputs; close the run FINISHED (FAILED on error, KILLED on Ctrl-C).

    Raises:
        QuakerayError: Any bad input, before training where it can be known then.
    """
    from quakeray.runtime import check_resources, init_ray
    from quakeray.tracking import (
        check_tracking,
        end_run,
        get_or_create_experiment,
        log_config,
        resolve_tracking_uri,
        start_run,
    )

    t0 = time.monotonic()
    print("resolved config:\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False), flush=True)
    uri = resolve_tracking_uri(cfg.tracking.uri)
    check_tracking(uri)
    resume_from = None
    if resume:
        state_file = resolve_state_file(resume)
        check_compatible(load_checkpoint(state_file), cfg, source=str(resume))
        resume_from = str(state_file.parent.resolve())
    storage = resolve_storage_path(cfg.run.storage_path)
    name = cfg.run.name or f"train-{_slug(cfg.model.backbone)}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = f"{storage.rstrip('/')}/{name}"
    earlier = find_checkpoints(run_dir) if "://" not in run_dir else []
    if earlier:
        # A rerun of a name resumes from its last checkpoint (Ray, or local mode): a
        # different backbone or schedule would fail in every worker, so refuse it here.
        check_compatible(
            load_checkpoint(earlier[-1]),
            cfg,
            source=f"run.name={name} ({earlier[-1]})",
            instead="choose another run.name",
        )
    if cfg.scaling.num_workers > 0:
        init_ray(cfg)
        check_resources(cfg)
    data = prepare_data(cfg)
    check_model(cfg, data)
    if cfg.scaling.num_workers > 0:
        _preflight(cfg, data=data, tracking_uri=uri, storage_path=storage)

    run_id = _reuse_run(uri, run_dir) if cfg.run.name else None
    new_run = run_id is None
    if run_id is None:
        experiment_id = get_or_create_experiment(uri, cfg.tracking.experiment)
        run_id = start_run(
            uri,
            experiment_id,
            run_name=cfg.tracking.run_name or name,
            tags={
                "quakeray.run_dir": run_dir,
                "quakeray.backbone": cfg.model.backbone,
                **({"quakeray.resumed_from": resume_from} if resume_from else {}),
            },
        )

    # From here on the run is RUNNING: every exit path must close it.
    try:
        if new_run:
            log_config(uri, run_id, cfg)
            _write_run_info(run_dir, uri, run_id)
        print(f"MLflow run {run_id} in {uri}; checkpoints in {run_dir}", flush=True)
        trainer = build_trainer(
            cfg,
            data=data,
            name=name,
            storage_path=storage,
            tracking_uri=uri,
            mlflow_run_id=run_id,
            resume_from=resume_from,
        )
        result = _fit(trainer)
        best = best_checkpoint_path(result, run_dir=run_dir)
        if best is None:
            raise CheckpointError(f"training wrote no checkpoint under {run_dir}")
        finalize_run(uri, run_id, cfg, best)
    except KeyboardInterrupt:
        end_run(uri, run_id, "KILLED")
        raise
    except BaseException:
        end_run(uri, run_id, "FAILED")
        raise
    end_run(uri, run_id, "FINISHED")

    with local_checkpoint(best) as folder:
        best_metrics = {k: v for k, v in read_metrics(folder).items() if v is not None}
    last = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    summary = TrainSummary(
        run_name=name,
        run_dir=run_dir,
        best_checkpoint=best,
        best_epoch=int(best_metrics["epoch"]) if "epoch" in best_metrics else None,
        best_metrics=best_metrics,
        last_metrics=last,
        mlflow_run_id=run_id,
        tracking_uri=uri,
        wall_s=time.monotonic() - t0,
    )
    print(summary.format(), flush=True)
    return summary


def check_model(cfg: ExperimentConfig, data: PreparedData) -> None:
    """Build the model once on the driver: a bad backbone fails here, not in N workers."""
    from quakeray.data.quakeset import QuakeSetDataset
    from quakeray.models import build_model, input_size_for

    native = cfg.data.image_size or QuakeSetDataset(data.path, "train").image_size[0]
    build_model(cfg.model, in_chans=4, img_size=input_size_for(cfg.model, native))


def _fit(trainer: Any) -> Any:
    """``trainer.fit()``, re-raising a worker's QuakerayError as itself (one line).

    In the main thread ``fit`` installs Ray's own SIGINT handler, which aborts the run
    and then raises ``SystemExit`` (and stays installed). A Ctrl-C must reach the caller
    as ``KeyboardInterrupt`` (the MLflow run ends KILLED, the CLI exits 130), so the
    ``SystemExit`` is translated and the previous handler put back.
    """
    import signal
    import threading

    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

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


def _find_quakeray_error(exc: BaseException | None) -> QuakerayError | None:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, QuakerayError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return None


def _preflight(
    cfg: ExperimentConfig, *, data: PreparedData, tracking_uri: str, storage_path: str
) -> None:
    try:
        from quakeray.cluster import preflight
    except ImportError as exc:  # the module ships with quakeray; only a broken install lacks it
        raise ImportError(
            f"quakeray.cluster.preflight is missing ({exc}); reinstall quakeray"
        ) from exc
    preflight(cfg, data_path=data.path, tracking_uri=tracking_uri, storage_path=storage_path)


def _reuse_run(uri: str, run_dir: str) -> str | None:
    """MLflow run of an earlier Train run with this folder (rerun with the same name)."""
    from quakeray.tracking import run_status

    if "://" in run_dir:
        return None
    info_file = Path(run_dir) / RUN_INFO_FILE
    if not info_file.is_file():
        return None
    info = json.loads(info_file.read_text())
    if info.get("tracking_uri") != uri:
        return None
    try:
        run_status(uri, info["run_id"])
    except Exception:
        return None
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).update_run(info["run_id"], status="RUNNING")
    log.info("resuming into MLflow run %s of %s", info["run_id"], run_dir)
    return str(info["run_id"])


def _write_run_info(run_dir: str, uri: str, run_id: str) -> None:
    if "://" in run_dir:
        return
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_INFO_FILE).write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


# --------------------------------------------------------------------------- worker side


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: train, validate exactly, checkpoint (rank 0), report, log.

    Args:
        config: From :func:`build_trainer`: the resolved config dict, data and stats
            paths, tracking URI and MLflow run id, ``--resume`` folder, local-mode
            checkpoint folder.
    """
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    from quakeray.data.quakeset import QuakeSetDataset, collate
    from quakeray.data.transforms import ChannelStats, build_transform
    from quakeray.losses import JointLoss, build_loss
    from quakeray.models import build_model, input_size_for
    from quakeray.optim import build_optimizer
    from quakeray.tracking import RunLogger

    cfg = from_dict(config["config"], source="train loop config")
    opt = cfg.optim
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    master = rank == 0  # only the master process logs and checkpoints
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    device = ray.train.torch.get_device()
    local_dir = config.get("local_checkpoint_dir") or ""

    # ---- data: a DistributedSampler shard per rank; the batch transform runs on the device
    stats = ChannelStats.load(config["stats_path"]) if config["stats_path"] else None
    positives_only = cfg.data.positives_only
    train_set = QuakeSetDataset(config["data_path"], "train", positives_only=positives_only)
    val_set = QuakeSetDataset(config["data_path"], "val", positives_only=positives_only)
    native = int(train_set.image_size[0])
    img_size = input_size_for(cfg.model, cfg.data.image_size or native)
    resize_to = img_size if img_size != native else 0
    transform = build_transform(replace(cfg.data, image_size=resize_to), stats).to(device)
    batch = opt.batch_size // world  # optim.batch_size is the global batch
    train_sampler: DistributedSampler[Any] = DistributedSampler(
        train_set, num_replicas=world, rank=rank, shuffle=True, seed=opt.seed
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
    train_loader = DataLoader(
        train_set, batch_size=batch, sampler=train_sampler, drop_last=lone_last, **loader_kw
    )
    val_loader = DataLoader(
        val_set, batch_size=opt.eval_batch_size or batch, sampler=val_sampler, **loader_kw
    )

    # ---- model, loss, optimiser, schedule (the paper's AdamW + per-step OneCycle)
    torch.manual_seed(opt.seed)  # same init everywhere (DDP also broadcasts rank 0's)
    model = ray.train.torch.prepare_model(build_model(cfg.model, in_chans=4, img_size=img_size))
    raw_model: torch.nn.Module = getattr(model, "module", model)
    torch.manual_seed(opt.seed + rank)  # flips and dropout differ per rank
    loss_fn = build_loss(cfg.loss)
    # Validation loss on the gathered split: "global" equals "all" on the whole set.
    pairing = "all" if cfg.loss.pairing == "global" else cfg.loss.pairing
    val_loss_fn = JointLoss(
        margin=cfg.loss.margin, rank_weight=cfg.loss.rank_weight, pairing=pairing
    )
    optimizer, scheduler = build_optimizer(raw_model, opt, len(train_loader))
    amp_dtype = _amp_dtype(opt.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)

    # ---- resume: Ray's own checkpoint after a worker failure, else --resume
    state, restarted = _resume_state(config)
    start_epoch, best, best_epoch = 0, math.inf, -1
    history: list[dict[str, float]] = []  # every epoch's metrics, kept in each checkpoint
    if state is not None:
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"]) + 1
        best, best_epoch = float(state["best_metric"]), int(state["best_epoch"])
        history = [dict(m) for m in state.get("history", [])]

    logger = (
        RunLogger(config["tracking_uri"], config["mlflow_run_id"])
        if master and config["mlflow_run_id"] and config.get("log_metrics", True)
        else None
    )
    logged = logger.logged_steps("epoch") if logger else set()
    if logger and restarted and state is not None and int(state["epoch"]) not in logged:
        # Crashed between report and log: the checkpointed epoch's point is missing.
        logger.log_metrics(state["metrics"], step=int(state["epoch"]))
        logged.add(int(state["epoch"]))

    for epoch in range(start_epoch, opt.epochs):
        # ---- train one epoch
        train_sampler.set_epoch(epoch)
        model.train()
        transform.train()
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, mse, rank, samples
        # Counts samples of all ranks (each processes as many): the rate is global samples/s.
        bar = _progress(
            len(train_sampler) * world,
            f"epoch {epoch + 1}/{opt.epochs}",
            enabled=master and bool(config.get("progress_bar")),
            local=bool(local_dir),
        )
        t_start = time.perf_counter()
        for batch_data in train_loader:
            x = transform(batch_data["image"].to(device, non_blocking=True))
            y = batch_data["magnitude"].to(device, non_blocking=True).float()
            with torch.autocast(
                device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ):
                pred = model(x)
            out = loss_fn(pred.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out.total).backward()
            if opt.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), opt.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            n = y.shape[0]
            sums += torch.tensor(
                [out.value.item() * n, out.mse.item() * n, out.rank.item() * n, n],
                dtype=torch.float64,
                device=device,
            )
            bar.update(n * world)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_s = time.perf_counter() - t_start
        if distributed:
            dist.all_reduce(sums)
            elapsed = torch.tensor([train_s], dtype=torch.float64, device=device)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            train_s = float(elapsed.item())
        bar.close()
        loss_sum, mse_sum, rank_sum, seen = sums.tolist()

        # ---- validate: every rank predicts its shard, rank order is undone by index
        if distributed:
            # DDP syncs buffers (BatchNorm statistics) at the *start* of a forward, so
            # after the last step each rank holds its own: evaluate rank 0's, the model
            # the checkpoint stores, everywhere.
            for buffer in raw_model.buffers():
                dist.broadcast(buffer, src=0)
        preds = _gather_predictions(
            raw_model,
            transform,
            val_loader,
            val_sampler,
            device,
            amp_dtype,
            distributed,
            len(val_set),
        )
        pred_arr = np.asarray(preds.prediction, dtype=np.float64)
        target_arr = np.asarray(preds.magnitude, dtype=np.float64)
        val_metrics = split_metrics(pred_arr, target_arr, np.asarray(preds.label), prefix="val_")
        val_loss = val_loss_fn(
            torch.from_numpy(pred_arr).float(), torch.from_numpy(target_arr).float()
        ).value
        metrics: dict[str, float] = {
            "epoch": float(epoch),
            "train_loss": loss_sum / seen,
            "train_mse": mse_sum / seen,
            "train_rank": rank_sum / seen,
            "val_loss": float(val_loss),
            **val_metrics,
            "lr": float(scheduler.get_last_lr()[0]),
            "samples_per_s": seen / max(train_s, 1e-9),
        }
        score = metrics[SCORE_METRIC]
        if math.isfinite(score) and score < best:
            best, best_epoch = score, epoch
        history.append(metrics)

        # ---- checkpoint (rank 0) and report (every rank, same number of times)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if master:
                folder = Path(local_dir) / checkpoint_dir_name(epoch) if local_dir else Path(tmp)
                state_out = {
                    "model": raw_model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                    "epoch": epoch,
                    "best_metric": best,
                    "best_epoch": best_epoch,
                    "metrics": metrics,
                    "history": history,
                    "config": config["config"],
                    "stats": stats_to_state(stats),
                    "img_size": img_size,
                    "native_size": native,
                    "resize_to": resize_to,
                    "data_path": config["data_path"],
                    "mlflow_run_id": config["mlflow_run_id"] or "",
                    "tracking_uri": config["tracking_uri"] or "",
                    "world_size": world,
                }
                save_checkpoint(
                    folder, state_out, metrics=metrics, predictions=preds, history=history
                )
                checkpoint = ray.train.Checkpoint.from_directory(str(folder))
            ray.train.report(
                metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(epoch)
            )
        if master:
            if local_dir:
                prune_checkpoints(local_dir, cfg.run.checkpoints_to_keep, SCORE_METRIC)
            # Logged after report: a point in MLflow means its checkpoint is persisted.
            if logger and epoch not in logged:
                logger.log_metrics(metrics, step=epoch)
                logged.add(epoch)
            # Not print(): Ray Train patches it in workers and, with stdout wrapped (as
            # MLflow does), the line reaches the driver twice.
            sys.stdout.write(_epoch_line(metrics, opt.epochs) + "\n")
            sys.stdout.flush()


def _resume_state(config: Mapping[str, Any]) -> tuple[dict[str, Any] | None, bool]:
    """(state, restarted): Ray's latest checkpoint after a failure, else ``--resume``."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            return load_checkpoint(folder), True
    if config.get("resume_from"):
        return load_checkpoint(config["resume_from"]), False
    return None, False


def _gather_predictions(
    model: torch.nn.Module,
    transform: torch.nn.Module,
    loader: Any,
    sampler: Any,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    distributed: bool,
    size: int,
) -> Predictions:
    """Predictions for the whole split, identical on every rank.

    Each rank predicts its ``DistributedSampler`` shard; the shards are all-gathered
    with their sample indices and put back in dataset order. The sampler pads the last
    shard with repeats of early samples: writing by index keeps each sample once.
    """
    import torch.distributed as dist

    local = predict_batches(model, transform, loader, device, autocast_dtype=amp_dtype)
    indices = list(iter(sampler))
    parts: list[Any] = [(indices, local)]
    if distributed:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (indices, local))
    columns: dict[str, list[Any]] = {k: [None] * size for k in local}
    for part_indices, part in parts:
        for key, values in part.items():
            column = columns[key]
            for i, value in zip(part_indices, values, strict=True):
                column[i] = value
    missing = sum(v is None for v in columns["prediction"])
    if missing:
        raise RuntimeError(f"{missing} validation samples were not predicted by any rank")
    return Predictions(index=list(range(size)), **columns)


def _amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    import torch

    if precision == "fp32":
        return None
    if device.type != "cuda":
        log.warning("optim.precision=%s needs a GPU; training in fp32 on %s", precision, device)
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, *, enabled: bool, local: bool) -> Any:
    """Rank-0 progress bar: Ray's tqdm in workers (renders on the driver), else tqdm."""
    if not enabled:
        return _NoBar()
    if local:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, leave=False)
    from ray.experimental.tqdm_ray import tqdm as tqdm_ray

    return tqdm_ray(total=total, desc=desc, unit="sample")


def _epoch_line(metrics: Mapping[str, float], epochs: int) -> str:
    return (
        f"epoch {int(metrics['epoch']) + 1}/{epochs}: train_loss {metrics['train_loss']:.4f} "
        f"val_loss {metrics['val_loss']:.4f} val_MAE {metrics['val_MAE']:.4f} "
        f"val_spearman {metrics['val_spearman']:.3f} lr {metrics['lr']:.2e} "
        f"({metrics['samples_per_s']:.1f} samples/s)"
    )
