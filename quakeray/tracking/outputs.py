"""What a finished run gets in MLflow: its best checkpoint's predictions, figures, metrics, model.

:func:`finalize_run` is called by a driver once training ended (``quakeray train``, or the
search for each trial); :func:`log_prediction_outputs` is the one path that logs a split's
predictions with their figures, for training's best epoch and for ``quakeray evaluate``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from quakeray import storage
from quakeray.checkpoint import (
    PREDICTIONS_FILE,
    Predictions,
    checkpoint_config,
    load_checkpoint,
    read_metrics,
    read_predictions,
    write_predictions,
)
from quakeray.config import ExperimentConfig
from quakeray.metrics import SCORE_METRIC
from quakeray.tracking import tags
from quakeray.tracking.store import RunLogger

__all__ = [
    "CHAMPION",
    "FIGURES_DIR",
    "finalize_run",
    "log_model",
    "log_prediction_outputs",
    "register_model",
    "write_prediction_figures",
]

CHAMPION = "champion"
"""The alias a search gives its best model: ``models:/<search name>@champion``."""


FIGURES_DIR = "plots"
"""A checkpoint's own figures of its validation predictions, when its trial drew them."""

_FIGURE_FILES = ("scatter.png", "per_bin.png", "per_bin.txt")


def finalize_run(
    uri: str, run_id: str, cfg: ExperimentConfig, checkpoint_path: str, *, figures: bool = True
) -> None:
    """Log the best checkpoint's outputs into the MLflow run (on a driver, after fit).

    Logs the validation predictions CSV, the scatter and per-bin figures (those the
    checkpoint holds, drawn by its trial; else drawn here), the best epoch's
    ``best_val_MAE`` (and ``best_<run.checkpoint_metric>``), the
    ``quakeray.best_checkpoint`` tag (used by ``quakeray evaluate RUN_ID``), and the model
    with a signature (when ``tracking.log_model``). Does not change the run's status.

    Args:
        uri: Tracking URI.
        run_id: The run.
        cfg: The run's config.
        checkpoint_path: Its best checkpoint (a path or a URI).
        figures: Log the figures (``search.trial_figures`` turns them off for a
            search's trials).
    """
    logger = RunLogger(uri, run_id)
    with storage.local_copy(checkpoint_path) as folder:
        metrics = {k: v for k, v in read_metrics(folder).items() if v is not None}
        epoch = int(metrics.get("epoch", 0))
        # The scores a runs table sorts on, not every validation metric again: each
        # would be one more one-point chart (the best epoch's others are in the history).
        summary = {SCORE_METRIC, f"{SCORE_METRIC}_const_median", cfg.run.checkpoint_metric}
        logger.log_metrics(
            {f"best_{k}": v for k, v in metrics.items() if k in summary},
            step=epoch,
            tags={tags.BEST_CHECKPOINT: checkpoint_path, tags.BEST_EPOCH: epoch},
        )
        if (folder / PREDICTIONS_FILE).is_file():
            with tempfile.TemporaryDirectory() as tmp:
                outputs = Path(tmp)
                (outputs / "predictions").mkdir()
                shutil.copy2(folder / PREDICTIONS_FILE, outputs / "predictions")
                if figures:
                    _figures(folder, outputs / FIGURES_DIR, epoch)
                logger.log_artifacts(outputs)  # one call: the run's artifact root once
        if cfg.tracking.log_model:
            log_model(uri, run_id, load_checkpoint(folder))


def _figures(checkpoint: Path, out: Path, epoch: int) -> None:
    """The checkpoint's own figures when its trial drew them, else drawn here, into ``out``."""
    drawn = checkpoint / FIGURES_DIR
    if all((drawn / f"val_{name}").is_file() for name in _FIGURE_FILES):
        shutil.copytree(drawn, out)
        return
    write_prediction_figures(
        out,
        read_predictions(checkpoint / PREDICTIONS_FILE),
        prefix="val_",
        title=f"validation, epoch {epoch}",  # 0-based, as the epoch metric
    )


def write_prediction_figures(
    folder: Path, predictions: Predictions, *, prefix: str, title: str
) -> Path:
    """Draw a split's scatter and per-bin figures and the per-bin table into ``folder``.

    Returns:
        The folder, holding ``<prefix>scatter.png``, ``<prefix>per_bin.png`` and
        ``<prefix>per_bin.txt``.
    """
    from quakeray.metrics import per_bin_errors
    from quakeray.plots import format_bin_table, per_bin_figure, scatter_figure

    folder.mkdir(parents=True, exist_ok=True)
    target = np.asarray(predictions.magnitude, dtype=float)
    pred = np.asarray(predictions.prediction, dtype=float)
    bins = per_bin_errors(pred, target)
    for name, figure in (
        ("scatter.png", scatter_figure(target, pred, np.asarray(predictions.label), title=title)),
        ("per_bin.png", per_bin_figure(bins, title=title)),
    ):
        figure.savefig(folder / f"{prefix}{name}")  # as MLflow's log_figure saves it
    (folder / f"{prefix}per_bin.txt").write_text(format_bin_table(bins))
    return folder


def log_prediction_outputs(
    logger: RunLogger,
    predictions: Predictions,
    *,
    csv_artifact: str,
    figure_prefix: str,
    title: str,
) -> None:
    """Log a split's predictions: the CSV, the scatter and per-bin figures, the per-bin table.

    Args:
        logger: The run to log into.
        predictions: Per-sample predictions of the split.
        csv_artifact: Artifact path of the CSV (``evaluation/test/predictions.csv``).
        figure_prefix: Start of the figures' artifact paths: ``evaluation/test/`` gives
            ``evaluation/test/scatter.png``, ``.../per_bin.png`` and ``.../per_bin.txt``.
        title: The figures' title.
    """
    folder, _, name = csv_artifact.rpartition("/")
    figures_dir, _, prefix = figure_prefix.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        logger.log_artifact(write_predictions(Path(tmp) / name, predictions), folder or None)
        drawn = write_prediction_figures(
            Path(tmp) / "figures", predictions, prefix=prefix, title=title
        )
        logger.log_artifacts(drawn, figures_dir or None)


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
    from quakeray.inference import InferenceModel, build_inference_parts

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
    with _quiet_mlflow(), mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
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


def register_model(uri: str, run_id: str, checkpoint_path: str, name: str) -> str:
    """Register the run's model as a new version of ``name``, aliased :data:`CHAMPION`.

    The run's logged model is used when it has one; else it is logged first, from
    ``checkpoint_path`` (a search's trials do not each log a model).

    Returns:
        The URI that loads it: ``models:/<name>@champion``.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_run(run_id).info.experiment_id
    logged = client.search_logged_models(
        experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}'"
    )
    if not logged:
        with storage.local_copy(checkpoint_path) as folder:
            log_model(uri, run_id, load_checkpoint(folder))
        logged = client.search_logged_models(
            experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}'"
        )
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model_id = logged[0].model_id
    with _quiet_mlflow():
        version = client.create_model_version(
            name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id
        )
    client.set_registered_model_alias(name, CHAMPION, version.version)
    return f"models:/{name}@{CHAMPION}"


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow's INFO and WARNING lines off the console while a model is logged or registered.

    "Saving pytorch model by Pickle ..." warns of the format this module chose on purpose
    (see :func:`log_model`); "Created version 1 ..." is said by the search's summary.
    """
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
