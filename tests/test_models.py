"""timm backbones as magnitude regressors: presets, any timm name, input sizes, the clamp,
and pretrained weights from local caches only (never a download)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from quakeray.config import ModelConfig
from quakeray.errors import ModelError
from quakeray.models import PRESETS, MagnitudeRegressor, build_model, input_size_for

NATIVE = 32  # the smallest side every preset without a fixed size accepts


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_builds_and_predicts_in_range(preset: str) -> None:
    cfg = ModelConfig(backbone=preset)
    size = input_size_for(cfg, NATIVE)
    model = build_model(cfg, img_size=size).eval()
    assert isinstance(model, MagnitudeRegressor)
    assert model.timm_name == PRESETS[preset].timm_name
    with torch.no_grad():
        out = model(torch.randn(2, 4, size, size))
    assert out.shape == (2,)
    assert torch.isfinite(out).all()
    assert ((out >= 0) & (out <= 10)).all()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_trains_on_a_batch(preset: str) -> None:
    cfg = ModelConfig(backbone=preset)
    size = input_size_for(cfg, NATIVE)
    model = build_model(cfg, img_size=size).train()
    out = model(torch.randn(2, 4, size, size))  # a tensor, not a (head, distilled) pair
    assert out.shape == (2,)
    out.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_input_size_is_the_presets_fixed_size_else_native() -> None:
    assert input_size_for(ModelConfig(backbone="levit"), 512) == 224
    assert input_size_for(ModelConfig(backbone="vit_tiny"), 512) == 512
    assert input_size_for(ModelConfig(backbone="mobilenetv3"), 64) == 64
    assert input_size_for(ModelConfig(backbone="test_resnet"), 48) == 48


def test_vit_is_built_for_the_requested_size() -> None:
    model = build_model(ModelConfig(backbone="vit_tiny"), img_size=48)
    assert model.img_size == 48
    with pytest.raises(AssertionError):  # timm's ViT refuses other sizes: it really is tied
        model.eval()(torch.randn(1, 4, 64, 64))


def test_fixed_size_preset_refuses_another_size() -> None:
    with pytest.raises(ModelError, match="levit needs 224 px inputs, got img_size=64"):
        build_model(ModelConfig(backbone="levit"), img_size=64)


@pytest.mark.parametrize(("name", "size"), [("test_resnet", 40), ("test_vit", 48)])
def test_any_timm_name_works_and_batch_of_one_gives_shape_b(name: str, size: int) -> None:
    model = build_model(ModelConfig(backbone=name, drop_rate=0.1), in_chans=4, img_size=size)
    assert model.timm_name == name
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 4, size, size))
    assert out.shape == (1,)


def test_other_channel_counts() -> None:
    model = build_model(ModelConfig(backbone="test_resnet"), in_chans=2).eval()
    assert model(torch.randn(3, 2, 32, 32)).shape == (3,)


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("mobilenetv3_smal_100", "mobilenetv3_small_100"), ("convnextv3", "convnextv2")],
)
def test_unknown_backbone_suggests_a_name(name: str, suggestion: str) -> None:
    with pytest.raises(
        ModelError, match=f"unknown backbone '{name}' \\(did you mean '{suggestion}'"
    ):
        build_model(ModelConfig(backbone=name))
    with pytest.raises(ModelError, match="unknown backbone"):
        input_size_for(ModelConfig(backbone=name), 32)


# --------------------------------------------------------------------------- clamp


def _shifted_model(bias: float, *, clamp_in_forward: bool) -> MagnitudeRegressor:
    """test_resnet whose outputs sit far outside [0, 10] (the head's bias moved)."""
    model = build_model(ModelConfig(backbone="test_resnet", clamp_in_forward=clamp_in_forward))
    head = model.backbone.get_classifier()
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        head.bias.fill_(bias)
    return model


@pytest.mark.parametrize("bias", [-50.0, 50.0])
def test_clamp_only_at_inference_by_default(bias: float) -> None:
    model = _shifted_model(bias, clamp_in_forward=False)
    x = torch.randn(2, 4, 32, 32)
    out = model.train()(x)
    assert ((out < 0) | (out > 10)).all()  # training sees the raw value...
    out.sum().backward()
    head = model.backbone.get_classifier()
    assert head.bias.grad is not None and head.bias.grad.abs().item() > 0  # ...and its gradient
    with torch.no_grad():
        expected = torch.full((2,), 0.0 if bias < 0 else 10.0)
        torch.testing.assert_close(model.eval()(x), expected)  # inference is clamped


@pytest.mark.parametrize("bias", [-50.0, 50.0])
def test_paper_clamp_in_forward_zeroes_gradients_outside_range(bias: float) -> None:
    model = _shifted_model(bias, clamp_in_forward=True)
    out = model.train()(torch.randn(2, 4, 32, 32))
    torch.testing.assert_close(out, torch.full((2,), 0.0 if bias < 0 else 10.0))
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.abs().max().item() == 0 for g in grads)


def test_target_scale_puts_predictions_in_magnitude_units_and_travels_in_the_weights() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="test_resnet"), in_chans=4).eval()
    x = torch.randn(3, 4, 32, 32)
    with torch.no_grad():
        raw = model.backbone(x)[:, 0]
        torch.testing.assert_close(model(x), raw.clamp(0, 10))  # the paper's raw head
        model.set_target_scale(3.5, 2.0)
        torch.testing.assert_close(model(x), (3.5 + 2.0 * raw).clamp(0, 10))
    # A model rebuilt from the state dict (a checkpoint, the MLflow model) has the scale.
    again = build_model(ModelConfig(backbone="test_resnet"), in_chans=4).eval()
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    with pytest.raises(ModelError, match="std > 0"):
        model.set_target_scale(3.5, 0.0)


# --------------------------------------------------------------------------- pretrained


@pytest.fixture()
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty Hugging Face and torch hub caches for the duration of a test."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def _reference_weights() -> dict[str, torch.Tensor]:
    """A stand-in for published test_resnet weights: 3 channels, 1000 classes."""
    torch.manual_seed(7)
    model = timm.create_model("test_resnet")
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _put_in_hf_cache(hf_home: Path, hub_id: str, weights: dict[str, torch.Tensor]) -> Path:
    """Lay out a file the way huggingface_hub's cache stores a downloaded snapshot."""
    repo = hf_home / "hub" / f"models--{hub_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    path = snapshot / "model.safetensors"
    safetensors.torch.save_file(weights, str(path))
    return path


@pytest.mark.parametrize("backbone", ["mobilenetv3", "test_resnet", "vit_tiny"])
def test_pretrained_missing_from_cache_is_a_quick_clear_error(
    empty_caches: Path, backbone: str
) -> None:
    start = time.monotonic()
    with pytest.raises(ModelError, match=r"not in the local caches .*model\.weights_path") as info:
        build_model(ModelConfig(backbone=backbone, pretrained=True))
    assert time.monotonic() - start < 5  # no download attempt, no network timeout
    assert str(empty_caches / "hf" / "hub") in str(info.value)
    assert "\n" not in str(info.value)


def test_pretrained_loads_from_the_local_hf_cache_and_adapts_channels(empty_caches: Path) -> None:
    cfg = timm.models.get_pretrained_cfg("test_resnet")
    assert cfg is not None and cfg.hf_hub_id
    weights = _reference_weights()
    _put_in_hf_cache(empty_caches / "hf", cfg.hf_hub_id, weights)
    model = build_model(ModelConfig(backbone="test_resnet", pretrained=True), in_chans=4)
    state = model.backbone.state_dict()
    torch.testing.assert_close(state["layer1.0.conv1.weight"], weights["layer1.0.conv1.weight"])
    stem = state["conv1.0.weight"] if "conv1.0.weight" in state else state["conv1.weight"]
    assert stem.shape[1] == 4  # 3-channel stem adapted by timm to 4 channels
    assert model.backbone.get_classifier().out_features == 1  # fresh scalar head


def test_weights_path_loads_that_file(empty_caches: Path) -> None:
    weights = _reference_weights()
    path = empty_caches / "test_resnet.safetensors"
    safetensors.torch.save_file(weights, str(path))
    model = build_model(
        ModelConfig(backbone="test_resnet", pretrained=True, weights_path=str(path))
    )
    torch.testing.assert_close(
        model.backbone.state_dict()["layer1.0.conv1.weight"], weights["layer1.0.conv1.weight"]
    )
    missing = str(empty_caches / "no.pth")
    with pytest.raises(ModelError, match=r"model\.weights_path: no such file"):
        build_model(ModelConfig(backbone="test_resnet", pretrained=True, weights_path=missing))
    # Without pretrained the file is not needed (checkpoint loaders build the model this way).
    build_model(ModelConfig(backbone="test_resnet", pretrained=False, weights_path=missing))


def test_weights_of_another_model_are_a_model_error(empty_caches: Path) -> None:
    path = empty_caches / "vit.safetensors"
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in timm.create_model("test_vit").state_dict().items()},
        str(path),
    )
    with pytest.raises(ModelError, match=r"do not fit test_resnet: .* backbone tensors missing"):
        build_model(ModelConfig(backbone="test_resnet", pretrained=True, weights_path=str(path)))
