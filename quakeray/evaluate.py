"""A checkpoint on a split: exact metrics in one process, printed and logged to its run.

``quakeray evaluate TARGET --split test`` where TARGET is a checkpoint folder, a run's
storage folder (its best checkpoint is used) or an MLflow run id (its best checkpoint is
found through the ``quakeray.best_checkpoint`` tag that training sets). Results are
printed (metrics and a per-magnitude-bin table) and logged to the checkpoint's MLflow run:
``test_*`` metrics, the predictions CSV and the two figures.

The model and transform are rebuilt from the checkpoint alone
(:func:`quakeray.inference.load_model`), so evaluation needs no config file.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quakeray import storage
from quakeray.checkpoint import (
    STATE_FILE,
    Predictions,
    best_checkpoint,
    best_checkpoint_at,
    checkpoint_baseline,
)
from quakeray.errors import CheckpointError, DataError, TrackingError
from quakeray.tracking import tags

__all__ = ["SPLIT_NAMES", "EvalResult", "evaluate_checkpoint", "evaluate_target", "resolve_target"]

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class EvalResult:
    """Metrics, per-bin errors and predictions of one checkpoint on one split."""

    split: str
    checkpoint: str
    data_path: str
    metrics: dict[str, float]  # prefixed: test_MAE, test_RMSE, ...
    bins: list[dict[str, float]]
    predictions: Predictions
    run_id: str | None = None  # the checkpoint's MLflow run
    tracking_uri: str = ""  # the store of that run
    logged: bool = False

    def format(self) -> str:
        """Human summary: metrics then the per-bin table."""
        from quakeray.plots import format_bin_table

        lines = [
            f"evaluated {self.checkpoint}",
            f"  on the {self.split} split of {self.data_path} "
            f"({len(self.predictions.prediction)} samples)",
        ]
        for key, value in self.metrics.items():
            lines.append(f"  {key:<24} {value:.4f}")
        lines.append(format_bin_table(self.bins))
        if self.run_id:
            state = "logged to" if self.logged else "not logged to"
            lines.append(f"{state} MLflow run {self.run_id}")
        return "\n".join(lines)


def evaluate_checkpoint(
    checkpoint_path: str,
    *,
    split: str = "test",
    data_path: str | None = None,
    batch_size: int = 32,
) -> EvalResult:
    """Exact metrics of a checkpoint on one split, in this process.

    Args:
        checkpoint_path: Checkpoint folder (or its ``checkpoint.pt``).
        split: ``train``, ``val`` or ``test``.
        data_path: Data file; default the one the checkpoint was trained on.
        batch_size: Inference batch size.

    Raises:
        CheckpointError: Missing/unreadable checkpoint.
        DataError: Unknown split, missing data file.
    """
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from quakeray.data.quakeset import QuakeSetDataset, collate
    from quakeray.inference import load_model, predict_batches
    from quakeray.metrics import per_bin_errors, split_metrics

    if split not in SPLIT_NAMES:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLIT_NAMES)}")
    loaded = load_model(checkpoint_path)
    path = data_path or str(loaded.state.get("data_path", ""))
    if not path or not Path(path).is_file():
        raise DataError(
            f"data file {path or '(none stored)'} of checkpoint {checkpoint_path} not found; "
            "pass it with --data FILE"
        )
    dataset = QuakeSetDataset(
        path,
        split,  # type: ignore[arg-type]  # checked against SPLIT_NAMES above
        positives_only=loaded.config.data.positives_only,
        layout="raw",  # read straight into the batch; the transform reorders it
    )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    # A bar for a person at a terminal (a search's best, quakeray evaluate); none in logs.
    batches = tqdm(
        loader, desc=f"{split} split", unit="batch", leave=False, disable=not sys.stderr.isatty()
    )
    out = predict_batches(
        loaded.model, loaded.transform, batches, torch.device("cpu"), layout="raw"
    )
    pred = np.asarray(out["prediction"], dtype=np.float64)
    target = np.asarray(out["magnitude"], dtype=np.float64)
    labels = np.asarray(out["label"], dtype=np.int64)
    prefix = {"train": "train_", "val": "val_", "test": "test_"}[split]
    baseline = checkpoint_baseline(loaded.state)
    metrics = split_metrics(pred, target, labels, prefix=prefix, baseline=baseline)
    bins = per_bin_errors(pred, target)
    predictions = Predictions(
        index=list(range(len(pred))),
        event_id=out["event_id"],
        patch=out["patch"],
        label=labels.tolist(),
        magnitude=target.tolist(),
        prediction=pred.tolist(),
    )
    return EvalResult(
        split=split,
        checkpoint=storage.resolve(str(checkpoint_path)),
        data_path=str(Path(path).resolve()),
        metrics=metrics,
        bins=[dict(b) for b in bins],
        predictions=predictions,
        run_id=loaded.state.get("mlflow_run_id") or None,
        tracking_uri=str(loaded.state.get("tracking_uri") or ""),
    )


def evaluate_target(
    target: str,
    *,
    split: str = "test",
    data_path: str | None = None,
    tracking_uri: str | None = None,
    log: bool = True,
) -> EvalResult:
    """``quakeray evaluate``: evaluate a checkpoint, run folder or MLflow run; print; log.

    Args:
        target: Checkpoint folder, a run's storage folder, or an MLflow run id.
        split: Split to evaluate.
        data_path: Data file; default the checkpoint's.
        tracking_uri: MLflow store to find the run / log into; default the checkpoint's,
            then config/env resolution.
        log: Log metrics, predictions and figures to the MLflow run.

    Raises:
        CheckpointError: No checkpoint found for ``target``.
        TrackingError: A run id was given but the store does not exist or cannot be read.
    """
    from quakeray.tracking import resolve_tracking_uri

    checkpoint = resolve_target(target, tracking_uri)
    result = evaluate_checkpoint(checkpoint, split=split, data_path=data_path)
    uri = resolve_tracking_uri(tracking_uri or result.tracking_uri)
    if log and result.run_id:
        result.logged = _log_result(uri, result)
    print(result.format())
    return result


def resolve_target(target: str, tracking_uri: str | None) -> str:
    """The checkpoint folder a checkpoint path, run folder, MLflow run id or model stands for.

    A registered model (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``) stands for the
    best checkpoint of the run that logged it.

    Raises:
        CheckpointError: Nothing found for ``target``.
        TrackingError: A run id, but the store does not exist or cannot be read.
    """
    from quakeray.tracking import resolve_tracking_uri

    if target.startswith("models:/"):
        uri = resolve_tracking_uri(tracking_uri or "")
        return _checkpoint_of_run(_run_of_model(target, uri), uri)
    if storage.is_remote(target):  # a checkpoint or run folder in a bucket (or file://)
        if storage.is_file(storage.join(target, STATE_FILE)):
            return target
        found = best_checkpoint_at(target, None)  # ranked as the run ranked them
        if found is None:
            raise CheckpointError(
                f"{target} holds no checkpoint; pass a checkpoint folder or an MLflow run id"
            )
        return found
    path = Path(target).expanduser()
    if path.is_dir() and not (path / STATE_FILE).is_file():
        best = best_checkpoint(path, None)  # ranked as the run ranked them
        if best is None:
            raise CheckpointError(
                f"{path} holds no checkpoint; pass a checkpoint folder or an MLflow run id"
            )
        return str(best)
    if path.exists():
        return str(path)
    if not target.isalnum():  # MLflow run ids are hex strings; anything else was a path
        raise CheckpointError(
            f"checkpoint not found: {target}; "
            "pass an existing checkpoint folder or an MLflow run id"
        )
    return _checkpoint_of_run(target, resolve_tracking_uri(tracking_uri or ""))


def _run_of_model(model_uri: str, uri: str) -> str:
    """The run that logged the registered model ``models:/NAME@ALIAS`` (or ``/VERSION``)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from quakeray.tracking import check_existing_store

    check_existing_store(uri, f"model {model_uri} cannot be found: pass --tracking-uri")
    ref = model_uri.removeprefix("models:/")
    name, alias = ref.split("@", 1) if "@" in ref else (ref.rsplit("/", 1)[0], "")
    client = MlflowClient(tracking_uri=uri)
    try:
        if alias:
            version = client.get_model_version_by_alias(name, alias)
        else:
            version = client.get_model_version(name, ref.rsplit("/", 1)[-1])
    except MlflowException as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"model {model_uri} does not resolve in {uri} ({reason}); check the name and alias "
            "in the MLflow UI (Models)"
        ) from None
    if not version.run_id:
        raise CheckpointError(f"model {model_uri} names no run; pass a checkpoint folder")
    return str(version.run_id)


def _checkpoint_of_run(run_id: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from quakeray.tracking import check_existing_store

    check_existing_store(
        uri,
        f"{run_id!r} is neither a checkpoint folder nor a run there: pass a checkpoint path, "
        "or a run id and --tracking-uri",
    )
    try:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException:
        raise CheckpointError(
            f"{run_id!r} is neither a checkpoint folder nor an MLflow run in {uri}; "
            "pass a checkpoint path or a run id (and --tracking-uri)"
        ) from None
    path = run.data.tags.get(tags.BEST_CHECKPOINT)
    if not path:
        raise CheckpointError(
            f"MLflow run {run_id} has no {tags.BEST_CHECKPOINT} tag (unfinished run?); "
            "pass a checkpoint folder instead"
        )
    if not storage.exists(path):
        raise CheckpointError(
            f"checkpoint {path} of MLflow run {run_id} cannot be found (deleted, or on another "
            "machine's disk); pass a checkpoint folder you can reach"
        )
    return path


def _log_result(uri: str, result: EvalResult) -> bool:
    """Log metrics, predictions and figures of an evaluation into its run."""
    from quakeray.tracking import RunLogger, check_tracking
    from quakeray.tracking.datasets import log_dataset
    from quakeray.tracking.outputs import log_prediction_outputs

    assert result.run_id is not None
    try:
        check_tracking(uri)
    except TrackingError as exc:
        log.warning("not logging the evaluation: %s", exc)
        return False
    logger = RunLogger(uri, result.run_id)
    logger.log_metrics(result.metrics, step=0)
    context = {"val": "validation"}.get(result.split, result.split)
    log_dataset(uri, result.run_id, result.data_path, [context])
    prefix = f"evaluation/{result.split}/"
    log_prediction_outputs(
        logger,
        result.predictions,
        csv_artifact=f"{prefix}predictions.csv",
        figure_prefix=prefix,
        title=f"{result.split} split",
    )
    return True
