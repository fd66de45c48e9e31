"""timm backbones with a scalar magnitude head, and the paper's backbones as presets.

Any name from ``timm.list_models()`` works, with ``in_chans`` input channels (4: two
dual-polarisation acquisitions) and ``num_classes=1``. Families whose models are tied to an
input size (ViT, LeViT, ...) are built with ``img_size``. Pretrained weights are only ever
read from the local caches (Hugging Face hub cache, torch hub cache) or an explicit file:
a missing file is a :class:`~quakeray.errors.ModelError` that says how to get it, never a
download attempt that could hang on a machine without internet.

Example:
    >>> from quakeray.config import ModelConfig
    >>> model = build_model(ModelConfig(backbone="test_resnet"), img_size=32)
    >>> model.eval()(torch.zeros(2, 4, 32, 32)).shape
    torch.Size([2])
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import timm
import torch
from torch import Tensor

from quakeray.errors import ModelError

if TYPE_CHECKING:
    from quakeray.config import ModelConfig

__all__ = [
    "MAX_MAGNITUDE",
    "PRESETS",
    "MagnitudeRegressor",
    "ModelPreset",
    "build_model",
    "input_size_for",
    "resolve_backbone",
]

log = logging.getLogger(__name__)

MAX_MAGNITUDE = 10.0
"""Predictions are clamped to ``[0, MAX_MAGNITUDE]`` at inference."""


@dataclass(frozen=True)
class ModelPreset:
    """A named backbone of the paper.

    Attributes:
        timm_name: The timm model name.
        img_size: The fixed input side the model needs, or None when it takes any size
            (families that take ``img_size`` are then built at the data's native size).
    """

    timm_name: str
    img_size: int | None = None


PRESETS: dict[str, ModelPreset] = {
    "mobilenetv3": ModelPreset("mobilenetv3_small_100"),
    "convnextv2": ModelPreset("convnextv2_atto"),
    "mobilevitv2": ModelPreset("mobilevitv2_100"),
    # ViT resamples its pretrained position embedding to any img_size, so it is built at the
    # native size (the paper: 512).
    "vit_tiny": ModelPreset("vit_tiny_patch16_224"),
    # LeViT's attention biases are one parameter per position of a 14x14 grid: the pretrained
    # weights only load at 224 px, so the input is resized to 224.
    "levit": ModelPreset("levit_128s", img_size=224),
}
"""The paper's backbones by short name."""


class MagnitudeRegressor(torch.nn.Module):
    """A timm backbone whose single output is the predicted magnitude.

    The prediction is clamped to ``[0, 10]`` in eval mode (inference). In training it is
    clamped only when ``clamp_in_forward`` is set: the paper's behaviour, which zeroes the
    gradient of every prediction outside the range.

    Args:
        backbone: A timm model built with ``num_classes=1``.
        clamp_in_forward: Clamp in training mode too.
        timm_name: The timm name the backbone was built from (for logging and checkpoints).
        in_chans: Input channels the backbone takes.
        img_size: The input side the backbone is tied to, or None when it takes any size.
    """

    target_mean: Tensor  # buffers (see set_target_scale)
    target_std: Tensor

    def __init__(
        self,
        backbone: torch.nn.Module,
        *,
        clamp_in_forward: bool = False,
        timm_name: str = "",
        in_chans: int = 4,
        img_size: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.clamp_in_forward = clamp_in_forward
        self.timm_name = timm_name
        self.in_chans = in_chans
        self.img_size = img_size
        # Buffers, not attributes: they are saved with the weights, so a checkpoint and the
        # model logged to MLflow predict in magnitude units with no other file.
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))

    def set_target_scale(self, mean: float, std: float) -> None:
        """Make the head's unit output mean ``std`` magnitudes around ``mean``.

        The head then learns the standardised target ``(y - mean) / std``: at
        initialisation its output is near 0, so predictions start near the train mean
        instead of near 0, and a unit of gradient has the same size for any target range.
        """
        if not (std > 0 and math.isfinite(std) and math.isfinite(mean)):
            raise ModelError(f"target scale needs a finite mean and std > 0, got {mean}, {std}")
        with torch.no_grad():
            self.target_mean.fill_(mean)
            self.target_std.fill_(std)

    def forward(self, x: Tensor) -> Tensor:
        """Predict magnitudes.

        Args:
            x: Images, shape ``(B, in_chans, H, W)``.

        Returns:
            Magnitudes, shape ``(B,)`` (also for B = 1).
        """
        # [:, 0] rather than squeeze(): squeeze() turns a batch of one into a 0-d tensor.
        out: Tensor = self.target_mean + self.target_std * self.backbone(x)[:, 0]
        if self.clamp_in_forward or not self.training:
            out = out.clamp(0.0, MAX_MAGNITUDE)
        return out

    def extra_repr(self) -> str:
        """The build settings, shown by ``print(model)``."""
        return (
            f"timm_name={self.timm_name!r}, in_chans={self.in_chans}, img_size={self.img_size}, "
            f"clamp_in_forward={self.clamp_in_forward}"
        )


def resolve_backbone(name: str) -> tuple[str, ModelPreset | None]:
    """The timm name behind a preset or timm name, and the preset if it is one.

    Raises:
        ModelError: Neither a preset nor a timm model, with a did-you-mean.
    """
    preset = PRESETS.get(name)
    if preset is not None:
        return preset.timm_name, preset
    if timm.is_model(name):
        return name, None
    options = [*PRESETS, *timm.list_models()]
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ModelError(
        f"model.backbone: unknown backbone {name!r}{hint}; use a preset "
        f"({', '.join(PRESETS)}) or a name from timm.list_models()"
    )


def input_size_for(cfg: ModelConfig, native: int) -> int:
    """The input side the model needs: the preset's fixed size if any, else ``native``.

    Raises:
        ModelError: Unknown backbone.
    """
    _, preset = resolve_backbone(cfg.backbone)
    if preset is not None and preset.img_size is not None:
        return preset.img_size
    return native


def build_model(
    cfg: ModelConfig, *, in_chans: int = 4, img_size: int | None = None
) -> MagnitudeRegressor:
    """Build the magnitude regressor described by the ``model`` section of the config.

    Args:
        cfg: Backbone name or preset, pretrained, clamp switch, dropout.
        in_chans: Input channels (4: [t0 VV, t0 VH, t1 VV, t1 VH]).
        img_size: Input side for families tied to one (ViT, LeViT, ...); ignored by
            families that take any size. None: the preset's fixed size, else the family's
            default. Use :func:`input_size_for` to size the data to match.

    Raises:
        ModelError: Unknown backbone, a preset given an input size it cannot take,
            pretrained weights not available locally, or timm refusing the settings.
    """
    timm_name, preset = resolve_backbone(cfg.backbone)
    if preset is not None and preset.img_size is not None:
        if img_size is not None and img_size != preset.img_size:
            raise ModelError(
                f"model.backbone={cfg.backbone} needs {preset.img_size} px inputs, got "
                f"img_size={img_size}; resize the data to input_size_for(cfg, native)"
            )
        img_size = preset.img_size
    kwargs: dict[str, Any] = {"in_chans": in_chans, "num_classes": 1, "drop_rate": cfg.drop_rate}
    fixed = _has_fixed_input_size(timm_name)
    if fixed:
        img_size = img_size or _default_input_size(timm_name)
        kwargs["img_size"] = img_size
    # weights_path counts only with pretrained: a checkpoint loader builds the model with
    # pretrained=False and must not need the original weights file.
    if cfg.pretrained:
        kwargs["pretrained"] = True
        kwargs["pretrained_cfg_overlay"] = _local_weights_overlay(timm_name, cfg.weights_path)
    report = _LoadReport()
    try:
        with report.capture():
            backbone = timm.create_model(timm_name, **kwargs)
    except (RuntimeError, TypeError, ValueError, KeyError, OSError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"model.backbone={cfg.backbone}: timm could not build {timm_name} with "
            f"in_chans={in_chans}, img_size={img_size}, pretrained={cfg.pretrained}: {detail}"
        ) from exc
    if cfg.pretrained:
        _check_weights_matched(timm_name, report, kwargs["pretrained_cfg_overlay"]["file"])
    return MagnitudeRegressor(
        backbone,
        clamp_in_forward=cfg.clamp_in_forward,
        timm_name=timm_name,
        in_chans=in_chans,
        img_size=img_size if fixed else None,
    )


# --------------------------------------------------------------------------- pretrained


def _pretrained_cfg(timm_name: str) -> Any:
    return timm.models.get_pretrained_cfg(timm_name)


def _has_fixed_input_size(timm_name: str) -> bool:
    cfg = _pretrained_cfg(timm_name)
    return bool(cfg is not None and cfg.fixed_input_size)


def _default_input_size(timm_name: str) -> int:
    cfg = _pretrained_cfg(timm_name)
    size = cfg.input_size if cfg is not None else (3, 224, 224)
    return int(size[-1])


def _local_weights_overlay(timm_name: str, weights_path: str) -> dict[str, Any]:
    """A ``pretrained_cfg_overlay`` that makes timm load a local file and nothing else.

    Order: an explicit ``weights_path``; the Hugging Face hub cache (where timm >= 0.9
    downloads to); the torch hub cache (older URL-hosted weights). Handing timm the file
    keeps it from contacting the hub at all.

    Raises:
        ModelError: The explicit file is missing, the model has no published weights, or
            they are not in any local cache.
    """
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise ModelError(
                f"model.weights_path: no such file {path}; point it at a .safetensors/.pth "
                "weights file for the backbone, or clear it"
            )
        return {"file": str(path)}
    cfg = _pretrained_cfg(timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    url = getattr(cfg, "url", None) if cfg is not None else None
    if not hub_id and not url:
        raise ModelError(
            f"model.pretrained: timm publishes no pretrained weights for {timm_name}; "
            "set model.pretrained=false or model.weights_path=FILE"
        )
    if hub_id:
        cached = _hf_cached_file(hub_id, getattr(cfg, "hf_hub_filename", None))
        if cached is not None:
            # Hub files are plain state dicts even when the URL weights need a custom loader
            # (e.g. ViT's .npz), which is what timm itself assumes for hub downloads.
            return {"file": cached, "custom_load": False}
    if url:
        cached_url = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if cached_url.is_file():
            return {"file": str(cached_url)}
    fetch = f"python -c \"import timm; timm.create_model('{timm_name}', pretrained=True)\""
    raise ModelError(
        f"model.pretrained: weights for {timm_name} ({hub_id or url}) are not in the local "
        f"caches (Hugging Face: {_hf_cache_dir()}, torch hub: {torch.hub.get_dir()}); fetch "
        f"them once on a machine with internet ({fetch}), or set model.weights_path=FILE, "
        "or model.pretrained=false"
    )


class _LoadReport(logging.Handler):
    """Collects the parameter names timm reports missing when it loads pretrained weights.

    timm loads non-strictly whenever the head is replaced (always, with ``num_classes=1``),
    so weights of the wrong model would load silently as a random init. Its loader logs the
    missing keys; this handler reads that line. If a future timm words it differently the
    check finds nothing and lets the model through, as timm itself would.
    """

    _PREFIX = "Missing keys ("

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.missing: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self._PREFIX):
            end = message.find(") ", len(self._PREFIX))
            names = message[len(self._PREFIX) : end if end >= 0 else None]
            self.missing.extend(k.strip() for k in names.split(",") if k.strip())

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Attach to timm's builder logger for the duration of the block."""
        logger = logging.getLogger("timm.models._builder")
        level = logger.level
        logger.addHandler(self)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        try:
            yield
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)


def _check_weights_matched(timm_name: str, report: _LoadReport, source: str) -> None:
    """Raise if the loaded file left backbone parameters (not just the head) uninitialised.

    Raises:
        ModelError: The weights file belongs to another architecture.
    """
    cfg = _pretrained_cfg(timm_name)
    heads = getattr(cfg, "classifier", None) or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    stray = [k for k in report.missing if not any(k.startswith(f"{h}.") for h in heads)]
    if stray:
        raise ModelError(
            f"model: the weights in {source} do not fit {timm_name}: {len(stray)} backbone "
            f"tensors missing (e.g. {stray[0]}); use the weights of that architecture"
        )


def _hf_cache_dir() -> Path:
    """The hub cache directory, read from the environment now (not at import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _hf_cached_file(hub_id: str, filename: str | None) -> str | None:
    """Path of the weights of ``hub_id`` in the local hub cache, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = hub_id.partition("@")
    # timm's own preference order for hub weights: safetensors first, then pickles.
    candidates = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
    for name in candidates:
        found = try_to_load_from_cache(
            repo_id, name, cache_dir=str(_hf_cache_dir()), revision=revision or None
        )
        if isinstance(found, str) and os.path.isfile(found):
            log.debug("pretrained weights for %s from %s", hub_id, found)
            return found
    return None
