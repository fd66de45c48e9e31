"""A trained model ready to predict: rebuilt from its checkpoint alone, normalisation inside.

A checkpoint holds the config, the weights and the normalisation statistics, so
:func:`load_model` needs no config file. :class:`InferenceModel` (transform, then
regressor) is what MLflow stores: raw linear backscatter in, magnitudes out.
:func:`predict_batches` is the one prediction loop, shared by training's validation and
by evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quakeray.checkpoint import checkpoint_config, checkpoint_stats, load_checkpoint
from quakeray.config import ExperimentConfig, replace
from quakeray.errors import CheckpointError

__all__ = [
    "PREDICTION_FIELDS",
    "InferenceModel",
    "LoadedModel",
    "build_inference_parts",
    "load_model",
    "predict_batches",
]

PREDICTION_FIELDS = ("prediction", "magnitude", "label", "event_id", "patch")
"""The lists :func:`predict_batches` returns, one entry per sample."""


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
    data_cfg = replace(cfg.data, image_size=int(state.get("resize_to", 0)))
    transform = build_transform(data_cfg, checkpoint_stats(state))
    return model.eval(), transform.eval()


def predict_batches(
    model: torch.nn.Module,
    transform: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    device: torch.device,
    *,
    autocast_dtype: torch.dtype | None = None,
    layout: str | None = None,
) -> dict[str, list[Any]]:
    """Predictions for every batch, with the targets and sample names.

    ``layout`` is the batches' image layout (:class:`~quakeray.data.quakeset.QuakeSetDataset`'s);
    None tells ``stacked`` and ``temporal`` apart by shape.

    Returns:
        The lists of :data:`PREDICTION_FIELDS`, in batch order.
    """
    out: dict[str, list[Any]] = {k: [] for k in PREDICTION_FIELDS}
    model.eval()
    transform.eval()
    with torch.no_grad():
        for batch in batches:
            x = transform(batch["image"].to(device, non_blocking=True), layout=layout)
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
