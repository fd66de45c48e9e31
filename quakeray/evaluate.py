"""Evaluate a checkpoint on a split, in one process, with exact metrics.

``quakeray evaluate TARGET --split test`` where TARGET is a checkpoint folder, a run's
storage folder (its best checkpoint is used) or an MLflow run id (its best checkpoint is
found through the ``quakeray.best_checkpoint`` tag that training sets). Results are
printed (metrics and a per-magnitude-bin table) and logged to the checkpoint's MLflow run:
``test_*`` metrics, the predictions CSV and the two figures.

The model and transform are rebuilt from the checkpoint alone (its config, weights and
normalisation statistics), so evaluation needs no config file. The prediction loop here
is shared with training's validation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quakeray.checkpoint import (
    Predictions,
    best_checkpoint,
    checkpoint_config,
    load_checkpoint,
    write_predictions,
)
from quakeray.config import ExperimentConfig, replace
from quakeray.errors import CheckpointError, DataError, TrackingError

log = logging.getLogger(__name__)

BEST_CHECKPOINT_TAG = "quakeray.best_checkpoint"
"""MLflow run tag holding the absolute path of the run's best checkpoint folder."""

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
    run_id: str | None = None
    logged: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

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


class InferenceModel(torch.nn.Module):
    """Batch transform (eval mode: no flips) then regressor: raw images in, magnitudes out.

    This is the module logged to MLflow, so a served model takes raw linear backscatter
    ``(B, 4, H, W)`` (NaN allowed) and the normalisation travels with the weights.
    """

    def __init__(self, transform: torch.nn.Module, model: torch.nn.Module) -> None:
        super().__init__()
        self.transform = transform
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Magnitudes ``(B,)`` for raw images ``(B, 4, H, W)``."""
        out: torch.Tensor = self.model(self.transform(x))
        return out


@dataclass
class LoadedModel:
    """A model and its input transform rebuilt from a checkpoint, in eval mode."""

    model: torch.nn.Module
    transform: torch.nn.Module
    config: ExperimentConfig
    state: dict[str, Any]


def load_model(checkpoint_path: str | Path, *, device: str = "cpu") -> LoadedModel:
    """Rebuild the model and the (eval-mode) batch transform of a checkpoint.

    Raises:
        CheckpointError: Missing or unreadable checkpoint, or weights that do not fit.
    """
    state = load_checkpoint(checkpoint_path)
    cfg = checkpoint_config(state, source=str(checkpoint_path))
    model, transform = build_inference_parts(cfg, state)
    return LoadedModel(model.to(device), transform.to(device), cfg, state)


def build_inference_parts(
    cfg: ExperimentConfig, state: Mapping[str, Any]
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Model with the checkpoint's weights and its transform, both in eval mode."""
    from quakeray.data.transforms import build_transform
    from quakeray.models import build_model

    img_size = int(state["img_size"])
    model = build_model(replace(cfg.model, pretrained=False), in_chans=4, img_size=img_size)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint weights do not fit {cfg.model.backbone!r}: "
            f"{str(exc).splitlines()[0]}; the checkpoint is damaged or from another version"
        ) from None
    stats = stats_from_state(state)
    data_cfg = replace(cfg.data, image_size=int(state.get("resize_to", 0)))
    transform = build_transform(data_cfg, stats)
    return model.eval(), transform.eval()


def stats_from_state(state: Mapping[str, Any]) -> Any:
    """The :class:`ChannelStats` saved in a checkpoint (None when not normalising)."""
    from quakeray.data.transforms import ChannelStats

    saved = state.get("stats")
    return ChannelStats(**saved) if saved else None


def stats_to_state(stats: Any) -> dict[str, Any] | None:
    """Plain-dict form of :class:`ChannelStats` for a ``weights_only`` checkpoint."""
    return dataclasses.asdict(stats) if stats is not None else None


def predict_batches(
    model: torch.nn.Module,
    transform: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    device: torch.device,
    *,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, list[Any]]:
    """Predictions for every batch, with the targets and sample names.

    Returns:
        Lists ``prediction``, ``magnitude``, ``label``, ``event_id``, ``patch`` in batch order.
    """
    out: dict[str, list[Any]] = {
        k: [] for k in ("prediction", "magnitude", "label", "event_id", "patch")
    }
    model.eval()
    transform.eval()
    with torch.no_grad():
        for batch in batches:
            x = transform(batch["image"].to(device, non_blocking=True))
            with torch.autocast(
                device.type,
                dtype=autocast_dtype or torch.float32,
                enabled=autocast_dtype is not None,
            ):
                pred = model(x)
            out["prediction"].extend(pred.float().reshape(-1).cpu().tolist())
            out["magnitude"].extend(batch["magnitude"].reshape(-1).tolist())
            out["label"].extend(batch["label"].reshape(-1).tolist())
            out["event_id"].extend(str(e) for e in batch["event_id"])
            out["patch"].extend(str(p) for p in batch["patch"])
    return out


def split_metrics(
    pred: np.ndarray, target: np.ndarray, labels: np.ndarray, *, prefix: str
) -> dict[str, float]:
    """``regression_metrics`` with a ``val_`` / ``test_`` prefix."""
    from quakeray.metrics import regression_metrics

    values = regression_metrics(pred, target, labels)
    return {f"{prefix}{k}": float(v) for k, v in values.items()}


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

    from quakeray.data.quakeset import QuakeSetDataset, collate
    from quakeray.metrics import per_bin_errors

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
    )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    out = predict_batches(loaded.model, loaded.transform, loader, torch.device("cpu"))
    pred = np.asarray(out["prediction"], dtype=np.float64)
    target = np.asarray(out["magnitude"], dtype=np.float64)
    labels = np.asarray(out["label"], dtype=np.int64)
    prefix = {"train": "train_", "val": "val_", "test": "test_"}[split]
    metrics = split_metrics(pred, target, labels, prefix=prefix)
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
        checkpoint=str(Path(checkpoint_path).resolve()),
        data_path=str(Path(path).resolve()),
        metrics=metrics,
        bins=[dict(b) for b in bins],
        predictions=predictions,
        run_id=loaded.state.get("mlflow_run_id") or None,
        extra={"tracking_uri": loaded.state.get("tracking_uri", "")},
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

    checkpoint = _resolve_target(target, tracking_uri)
    result = evaluate_checkpoint(checkpoint, split=split, data_path=data_path)
    uri = resolve_tracking_uri(tracking_uri or str(result.extra.get("tracking_uri") or ""))
    if log and result.run_id:
        result.logged = _log_result(uri, result)
    print(result.format())
    return result


def _resolve_target(target: str, tracking_uri: str | None) -> str:
    from quakeray.tracking import resolve_tracking_uri

    path = Path(target).expanduser()
    if path.is_dir() and not (path / "checkpoint.pt").is_file():
        best = best_checkpoint(path)
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
    path = run.data.tags.get(BEST_CHECKPOINT_TAG)
    if not path:
        raise CheckpointError(
            f"MLflow run {run_id} has no {BEST_CHECKPOINT_TAG} tag (unfinished run?); "
            "pass a checkpoint folder instead"
        )
    if not Path(path).exists():
        raise CheckpointError(
            f"checkpoint {path} of MLflow run {run_id} is not on this machine; "
            "copy it here and pass the folder"
        )
    return path


def _log_result(uri: str, result: EvalResult) -> bool:
    """Log metrics, predictions and figures of an evaluation into its run."""
    import tempfile

    from quakeray.plots import format_bin_table, per_bin_figure, scatter_figure
    from quakeray.tracking import RunLogger, check_tracking

    assert result.run_id is not None
    try:
        check_tracking(uri)
    except TrackingError as exc:
        log.warning("not logging the evaluation: %s", exc)
        return False
    logger = RunLogger(uri, result.run_id)
    prefix = f"evaluation/{result.split}"
    logger.log_metrics(result.metrics, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        csv = write_predictions(Path(tmp) / "predictions.csv", result.predictions)
        logger.log_artifact(csv, prefix)
    p = result.predictions
    scatter = scatter_figure(
        np.asarray(p.magnitude),
        np.asarray(p.prediction),
        np.asarray(p.label),
        title=f"{result.split} split",
    )
    logger.log_figure(scatter, f"{prefix}/scatter.png")
    logger.log_figure(
        per_bin_figure(result.bins, title=f"{result.split} split"), f"{prefix}/per_bin.png"
    )
    logger.log_text(format_bin_table(result.bins), f"{prefix}/per_bin.txt")
    return True
