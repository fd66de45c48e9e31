"""The model a prediction uses, from any reference a user has for it.

A reference is a checkpoint folder, a run's storage folder (its best checkpoint), an
MLflow run id (through the ``quakeray.best_checkpoint`` tag), or an MLflow model URI
(``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/model``). Every path ends
at the same module, :class:`~quakeray.inference.InferenceModel`: raw linear backscatter in,
magnitudes out, the training normalisation inside. So a tile predicts exactly what
``quakeray evaluate`` predicts for the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quakeray.errors import CheckpointError

__all__ = ["MLFLOW_MODEL_SCHEMES", "Predictor", "load_predictor"]

MLFLOW_MODEL_SCHEMES = ("models:/", "runs:/")


@dataclass
class Predictor:
    """A model ready for tiles: ``(B, 4, T, T)`` raw backscatter -> ``(B,)`` magnitudes."""

    module: torch.nn.Module
    tile_size: int  # the patch side the model was trained on
    source: str  # what the reference resolved to (checkpoint folder or model URI)
    backbone: str = ""


def load_predictor(reference: str, *, tracking_uri: str | None = None) -> Predictor:
    """Resolve ``reference`` and load its model on the CPU, in eval mode.

    Raises:
        CheckpointError: The reference resolves to nothing, or to an unusable model.
        TrackingError: A run id or model URI, but the MLflow store cannot be read.
    """
    if reference.startswith(MLFLOW_MODEL_SCHEMES):
        return _from_mlflow(reference, tracking_uri)
    from quakeray.evaluate import resolve_target
    from quakeray.inference import InferenceModel, load_model

    checkpoint = resolve_target(reference, tracking_uri)
    loaded = load_model(checkpoint)
    module = InferenceModel(loaded.transform, loaded.model).eval()
    return Predictor(
        module, int(loaded.state["native_size"]), checkpoint, loaded.config.model.backbone
    )


def _from_mlflow(uri: str, tracking_uri: str | None) -> Predictor:
    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    from quakeray.tracking import check_existing_store, resolve_tracking_uri

    store = resolve_tracking_uri(tracking_uri or "")
    check_existing_store(store, f"model {uri} cannot be found: pass --tracking-uri")
    mlflow.set_tracking_uri(store)
    try:
        info = mlflow.models.get_model_info(uri)
        module = mlflow.pytorch.load_model(uri, map_location="cpu")
    except (MlflowException, OSError) as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"model {uri} does not resolve in {store} ({reason}); check the name and alias "
            "in the MLflow UI (Models), or pass a checkpoint folder"
        ) from None
    shape = _input_shape(info)
    if shape is None or len(shape) != 4 or shape[1] != 4 or shape[2] != shape[3]:
        raise CheckpointError(
            f"model {uri} is not a quakeray model (input {shape}, expected (-1, 4, T, T)); "
            "pass a model that 'quakeray train' or 'quakeray tune' logged"
        )
    return Predictor(module.eval(), int(shape[2]), uri)


def _input_shape(info: object) -> tuple[int, ...] | None:
    signature = getattr(info, "signature", None)
    if signature is None or signature.inputs is None:
        return None
    specs = signature.inputs.inputs
    return tuple(specs[0].shape) if len(specs) == 1 and hasattr(specs[0], "shape") else None
