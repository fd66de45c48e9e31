"""Self-describing training checkpoints: one folder, plain tensors and types only.

A checkpoint folder holds

- ``checkpoint.pt``: model, optimiser, scheduler and grad-scaler state, the epoch, the
  resolved config (plain dict), the normalisation statistics, the best metric so far and
  the epoch's metrics. Everything is a tensor, number, string, list or dict, so it loads
  with ``torch.load(weights_only=True)`` (no pickled code runs on load);
- ``metrics.json``: the epoch's metrics, readable without torch (used to pick the best);
- ``history.json``: the metrics of every epoch up to this one, so a search driver that
  never received some reports (it was interrupted after Train checkpointed them) can
  still log those epochs into the trial's MLflow run when the trial resumes;
- ``predictions_val.csv``: the validation predictions of that epoch.

Ray Train copies the folder to ``<storage_path>/<run name>/checkpoint_epoch_NNNN``; in
local mode (``scaling.num_workers=0``) the loop writes it there itself.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from quakeray import storage
from quakeray.config import ExperimentConfig, from_dict, to_dict
from quakeray.errors import CheckpointError, ConfigError
from quakeray.metrics import SCORE_METRIC, ConstantBaseline

if TYPE_CHECKING:
    import torch

    from quakeray.data.transforms import ChannelStats

__all__ = [
    "HISTORY_FILE",
    "METRICS_FILE",
    "PREDICTIONS_FILE",
    "PREDICTION_COLUMNS",
    "STATE_FILE",
    "Predictions",
    "best_checkpoint",
    "best_checkpoint_at",
    "build_state",
    "check_compatible",
    "checkpoint_baseline",
    "checkpoint_config",
    "checkpoint_dir_name",
    "checkpoint_stats",
    "find_checkpoints",
    "latest_checkpoint_at",
    "load_checkpoint",
    "parse_history",
    "prune_checkpoints",
    "rank_key",
    "ranking_metric",
    "read_history",
    "read_metrics",
    "read_predictions",
    "resolve_state_file",
    "save_checkpoint",
    "write_predictions",
]

_Folder = TypeVar("_Folder", Path, str)  # a local checkpoint folder, or its URI

STATE_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
PREDICTIONS_FILE = "predictions_val.csv"
PREDICTION_COLUMNS = ("index", "event_id", "patch", "label", "magnitude", "prediction")


def checkpoint_dir_name(epoch: int) -> str:
    """Folder name of the checkpoint of ``epoch`` (0-based), sortable by epoch."""
    return f"checkpoint_epoch_{epoch:04d}"


@dataclass(frozen=True)
class Predictions:
    """Per-sample predictions of one split, in dataset order."""

    index: Sequence[int]
    event_id: Sequence[str]
    patch: Sequence[str]
    label: Sequence[int]
    magnitude: Sequence[float]
    prediction: Sequence[float]

    def rows(self) -> list[tuple[Any, ...]]:
        """One tuple per sample, in :data:`PREDICTION_COLUMNS` order."""
        return list(
            zip(
                self.index,
                self.event_id,
                self.patch,
                self.label,
                self.magnitude,
                self.prediction,
                strict=True,
            )
        )


def build_state(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    epoch: int,
    best_metric: float,
    best_epoch: int,
    history: Sequence[Mapping[str, float]],
    config: ExperimentConfig,
    stats: ChannelStats | None,
    img_size: int,
    native_size: int,
    data_path: str,
    mlflow_run_id: str,
    tracking_uri: str,
    world_size: int,
    baseline: ConstantBaseline,
) -> dict[str, Any]:
    """The contents of ``checkpoint.pt``: everything a resume, an evaluation or a model needs.

    Args:
        model: The unwrapped model (not its DDP wrapper).
        optimizer: Its optimiser.
        scheduler: Its learning-rate schedule.
        scaler: The fp16 grad scaler (its state is kept only when enabled).
        epoch: The epoch just finished (0-based).
        best_metric: The best :data:`~quakeray.metrics.SCORE_METRIC` so far.
        best_epoch: The epoch that reached it (-1 before any).
        history: The metrics of every epoch so far; the last one is this epoch's.
        config: The resolved config of the run.
        stats: The normalisation statistics the transform used (None: none).
        img_size: The model's input side.
        native_size: The data's patch side.
        data_path: The data file trained on.
        mlflow_run_id: The run the training belongs to ("" for none).
        tracking_uri: The store of that run.
        world_size: Data-parallel workers that trained it.
        baseline: The train split's constant predictors (evaluation scores them too).
    """
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "epoch": epoch,
        "best_metric": best_metric,
        "best_epoch": best_epoch,
        "metrics": dict(history[-1]),
        "history": [dict(m) for m in history],
        "config": to_dict(config),
        "stats": stats.to_dict() if stats is not None else None,
        "img_size": img_size,
        "native_size": native_size,
        "resize_to": img_size if img_size != native_size else 0,
        "data_path": data_path,
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": tracking_uri,
        "world_size": world_size,
        "baseline": {"median": baseline.median, "mean": baseline.mean},
    }


def checkpoint_baseline(state: Mapping[str, Any]) -> ConstantBaseline | None:
    """The train split's constant predictors saved in a checkpoint (None in older ones)."""
    saved = state.get("baseline")
    return ConstantBaseline(float(saved["median"]), float(saved["mean"])) if saved else None


def checkpoint_stats(state: Mapping[str, Any]) -> ChannelStats | None:
    """The normalisation statistics saved in a checkpoint (None when not normalising)."""
    from quakeray.data.transforms import ChannelStats

    saved = state.get("stats")
    return ChannelStats(**saved) if saved else None


def save_checkpoint(
    directory: str | Path,
    state: Mapping[str, Any],
    *,
    metrics: Mapping[str, float],
    predictions: Predictions | None = None,
    history: Sequence[Mapping[str, float]] = (),
) -> Path:
    """Write a checkpoint folder (state, metrics JSON, predictions CSV, history JSON).

    The state file is written to a temporary name and renamed, so a reader never sees a
    half-written checkpoint.

    Args:
        directory: Target folder (created).
        state: Plain types and tensors only (see module docstring).
        metrics: The epoch's metrics.
        predictions: The epoch's validation predictions.
        history: The metrics of every epoch so far, this one included.

    Returns:
        The folder.
    """
    import torch

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (STATE_FILE + ".tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, out / STATE_FILE)
    (out / METRICS_FILE).write_text(json.dumps(_json_safe(metrics), indent=1, sort_keys=True))
    if predictions is not None:
        write_predictions(out / PREDICTIONS_FILE, predictions)
    if history:
        (out / HISTORY_FILE).write_text(json.dumps([_json_safe(m) for m in history]))
    return out


def load_checkpoint(path: str | Path, *, map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint (folder or its ``checkpoint.pt``) with ``weights_only=True``.

    Raises:
        CheckpointError: Missing, unreadable, or not a quakeray checkpoint.
    """
    import torch

    if storage.is_remote(str(path)):
        return _load_remote(str(path), map_location=map_location)
    file = resolve_state_file(path)
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {file} cannot be read ({type(exc).__name__}); "
            "pass a checkpoint folder written by quakeray train"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(
            f"{file} is not a quakeray checkpoint (no model/config); "
            "pass a checkpoint folder written by quakeray train"
        )
    return state


def _load_remote(uri: str, *, map_location: str) -> dict[str, Any]:
    """:func:`load_checkpoint` of a checkpoint in a bucket (or any URI): one download."""
    import tempfile

    if storage.on_local_disk(uri):
        return load_checkpoint(storage.local_path(uri), map_location=map_location)
    file = uri if storage.name(uri) == STATE_FILE else storage.join(uri, STATE_FILE)
    if not storage.is_file(file):
        raise CheckpointError(
            f"checkpoint not found: {file}; pass a checkpoint folder (…/checkpoint_epoch_NNNN) "
            "that holds a checkpoint.pt"
        )
    with tempfile.TemporaryDirectory(prefix="quakeray-ckpt-") as tmp:
        return load_checkpoint(
            storage.download_file(file, Path(tmp) / STATE_FILE), map_location=map_location
        )


def resolve_state_file(path: str | Path) -> Path:
    """The ``checkpoint.pt`` of a checkpoint folder (or the file itself).

    Raises:
        CheckpointError: Nothing there.
    """
    p = Path(path).expanduser()
    file = p / STATE_FILE if p.is_dir() else p
    if not file.is_file():
        hint = f"{p} has no {STATE_FILE}" if p.is_dir() else f"checkpoint not found: {p}"
        raise CheckpointError(
            f"{hint}; pass a checkpoint folder (…/checkpoint_epoch_NNNN) "
            "printed at the end of quakeray train"
        )
    return file


def checkpoint_config(state: Mapping[str, Any], *, source: str = "checkpoint") -> ExperimentConfig:
    """The experiment config stored in a checkpoint.

    Raises:
        CheckpointError: The stored config does not load (written by another version).
    """
    try:
        return from_dict(state["config"], source=source)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: stored config is not valid here: {exc}") from None


def check_compatible(
    state: Mapping[str, Any],
    cfg: ExperimentConfig,
    *,
    source: str,
    instead: str = "start without --resume",
) -> None:
    """Refuse to resume a checkpoint into a different model or schedule.

    Args:
        state: The loaded checkpoint.
        cfg: The config that would resume it.
        source: Where the checkpoint came from (named in the error).
        instead: The other way out, named in the error.

    Raises:
        CheckpointError: The backbone, or the epochs / batch size the one-cycle schedule
            was built for, differ, naming both.
    """
    saved = checkpoint_config(state, source=source)
    if saved.model.backbone != cfg.model.backbone:
        raise CheckpointError(
            f"{source} holds a {saved.model.backbone!r} model but the config asks for "
            f"{cfg.model.backbone!r}; set model.backbone={saved.model.backbone} or {instead}"
        )
    if saved.optim.epochs != cfg.optim.epochs or saved.optim.batch_size != cfg.optim.batch_size:
        raise CheckpointError(
            f"{source} was trained with optim.epochs={saved.optim.epochs}, "
            f"optim.batch_size={saved.optim.batch_size}; resume needs the same schedule "
            f"(got {cfg.optim.epochs}, {cfg.optim.batch_size}) or {instead}"
        )


def read_metrics(directory: str | Path) -> dict[str, float | None]:
    """The ``metrics.json`` of a checkpoint folder ({} if absent; NaN stored as None)."""
    text = _read_optional(directory, METRICS_FILE)
    loaded: dict[str, float | None] = json.loads(text) if text is not None else {}
    return loaded


def read_history(directory: str | Path) -> list[dict[str, float | None]]:
    """The ``history.json`` of a checkpoint folder, oldest epoch first ([] if absent)."""
    text = _read_optional(directory, HISTORY_FILE)
    return parse_history(text) if text is not None else []


def _read_optional(directory: str | Path, name: str) -> str | None:
    """A small file of a checkpoint folder, local or in a bucket; None when absent."""
    if storage.is_remote(str(directory)):
        file = storage.join(str(directory), name)
        return storage.read_text(file) if storage.is_file(file) else None
    local = Path(directory) / name
    return local.read_text() if local.is_file() else None


def parse_history(text: str) -> list[dict[str, float | None]]:
    """A ``history.json`` text: one metrics dict per epoch (NaN stored as None)."""
    loaded: list[dict[str, float | None]] = json.loads(text)
    return loaded


def find_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders directly under a run folder, oldest epoch first."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    # Hidden folders are uploads in progress (storage.upload_dir stages them so).
    return sorted(p.parent for p in root.glob(f"*/{STATE_FILE}") if p.parent.name[0] != ".")


def rank_key(value: float | None, epoch: int) -> tuple[float, int]:
    """How every part of quakeray ranks a run's epochs: the lower key is the better epoch.

    The lowest value of the run's ``run.checkpoint_metric`` wins (every metric a run can
    rank by is an error or a loss); on a tie, the earlier epoch; a missing or non-finite
    value never wins. The loop's best so far, the checkpoints kept, the checkpoint a
    search finalises, tests and registers, and the one ``quakeray evaluate`` picks in a
    run folder all come from this key.
    """
    if value is None or not math.isfinite(value):
        return (math.inf, int(epoch))
    return (float(value), int(epoch))


def best_checkpoint(run_dir: str | Path, metric: str | None) -> Path | None:
    """The best checkpoint folder under ``run_dir`` (:func:`rank_key`), or None.

    ``metric`` is the run's ``run.checkpoint_metric``; None reads it from the run's
    newest checkpoint (a folder whose config the caller does not have).
    """
    return _best_of(find_checkpoints(run_dir), metric)


def _best_of(folders: Sequence[_Folder], metric: str | None) -> _Folder | None:
    """The folder (a Path, or a URI string) of the best epoch (:func:`rank_key`)."""
    if not folders:
        return None
    ranked_by = metric or ranking_metric(folders[-1])
    scored = []
    for folder in folders:
        metrics = read_metrics(folder)
        key = rank_key(metrics.get(ranked_by), int(metrics.get("epoch") or 0))
        if math.isfinite(key[0]):
            scored.append((key, folder))
    return min(scored, key=lambda kf: kf[0])[1] if scored else None


def best_checkpoint_at(location: str, metric: str | None) -> str | None:
    """:func:`best_checkpoint` of a run folder that may be a URI (``s3://...``); as a string."""
    found = _best_of(_folders_at(location), metric)
    return None if found is None else str(found)


def latest_checkpoint_at(location: str) -> str | None:
    """The newest checkpoint folder (by epoch) of a run folder that may be a URI; None if none."""
    folders = _folders_at(location)
    return str(folders[-1]) if folders else None


def _folders_at(location: str | Path) -> list[str]:
    """:func:`find_checkpoints` of a run folder that may be a URI (paths, or URIs in a bucket)."""
    if not storage.is_remote(str(location)) or storage.on_local_disk(str(location)):
        return [str(f) for f in find_checkpoints(storage.local_path(str(location)))]
    # In a bucket a folder is whole once its metrics.json is there: the loop uploads it last.
    return [
        storage.join(str(location), n)
        for n in storage.list_dir(str(location))
        if storage.is_file(storage.join(str(location), n, STATE_FILE))
        and storage.is_file(storage.join(str(location), n, METRICS_FILE))
    ]


def ranking_metric(folder: str | Path) -> str:
    """The ``run.checkpoint_metric`` a checkpoint's run ranked by (memory-mapped read).

    A checkpoint in a bucket is downloaded whole (:func:`load_checkpoint`).
    """
    import torch

    if storage.is_remote(str(folder)) and not storage.on_local_disk(str(folder)):
        state = load_checkpoint(folder)
    else:
        file = resolve_state_file(storage.local_path(str(folder)))
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    run = (state.get("config") or {}).get("run") or {}
    return str(run.get("checkpoint_metric", SCORE_METRIC))


def prune_checkpoints(run_dir: str | Path, keep: int, metric: str) -> None:
    """Delete all but the ``keep`` best checkpoints (:func:`rank_key`) and the latest.

    ``run_dir`` may be a URI (``s3://...``): what Ray Train's ``num_to_keep`` does for the
    checkpoints it persists, for those a loop persists itself. ``metric`` is the run's
    ``run.checkpoint_metric``.
    """
    folders = _folders_at(run_dir)
    if len(folders) <= keep:
        return
    latest = folders[-1]

    def score(folder: str) -> tuple[float, int]:
        metrics = read_metrics(folder)
        return rank_key(metrics.get(metric), int(metrics.get("epoch") or 0))

    ranked = sorted(folders, key=score)
    kept = set(ranked[:keep]) | {latest}
    for folder in folders:
        if folder not in kept:
            storage.remove_dir(folder)


def write_predictions(path: str | Path, predictions: Predictions) -> Path:
    """Write predictions as CSV with :data:`PREDICTION_COLUMNS`."""
    out = Path(path)
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(PREDICTION_COLUMNS)
        for index, event_id, patch, label, magnitude, prediction in predictions.rows():
            writer.writerow(
                [int(index), event_id, patch, int(label), f"{magnitude:.6g}", f"{prediction:.6g}"]
            )
    return out


def read_predictions(path: str | Path) -> Predictions:
    """Read a predictions CSV written by :func:`write_predictions`.

    Raises:
        CheckpointError: The file is missing.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"predictions file not found: {file}")
    with file.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return Predictions(
        index=[int(r["index"]) for r in rows],
        event_id=[r["event_id"] for r in rows],
        patch=[r["patch"] for r in rows],
        label=[int(r["label"]) for r in rows],
        magnitude=[float(r["magnitude"]) for r in rows],
        prediction=[float(r["prediction"]) for r in rows],
    )


def _json_safe(metrics: Mapping[str, float]) -> dict[str, float | None]:
    return {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
