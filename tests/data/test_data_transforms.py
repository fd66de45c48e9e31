"""Batch transforms and normalisation statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from quakeray.config import DataConfig
from quakeray.data.quakeset import QuakeSetDataset, collate
from quakeray.data.transforms import (
    BatchTransform,
    ChannelStats,
    build_transform,
    compute_stats,
    default_stats_path,
)
from quakeray.errors import DataError


def test_stats_reproducible_and_match_numpy(tiny_h5: Path, tmp_path: Path) -> None:
    a = compute_stats(tiny_h5, progress=False)
    b = compute_stats(tiny_h5, progress=False)
    pa, pb = a.save(tmp_path / "a.json"), b.save(tmp_path / "b.json")
    assert pa.read_bytes() == pb.read_bytes()  # same file -> identical JSON
    # Independent check: every train sample's two acquisitions, NaN -> 0, dB, per polarisation.
    ds = QuakeSetDataset(tiny_h5, "train")
    x = torch.stack([ds[i]["image"] for i in range(len(ds))]).double().nan_to_num(0.0)
    x = 10 * torch.log10(x + 1e-9)
    per_pol = x.reshape(len(ds), 2, 2, -1).transpose(0, 2).reshape(2, -1)
    # (ours takes the log in float32, like the transform does)
    np.testing.assert_allclose(a.mean, per_pol.mean(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(a.std, per_pol.std(1).numpy(), rtol=1e-6)
    assert a.count == per_pol.shape[1]
    loaded = ChannelStats.load(pa)
    assert loaded == a
    assert default_stats_path(tiny_h5) == tiny_h5.with_name("earthquakes.h5.stats.json")


def test_stats_linear_domain_differs(tiny_h5: Path) -> None:
    lin = compute_stats(tiny_h5, to_db=False, progress=False)
    assert 0 < lin.mean[0] < 1 and lin.to_db is False


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "not found"),
        ("{not json", "not a statistics JSON"),
        ('{"mean": [1.0]}', "'mean' and 'std'"),
        ('{"mean": [1.0], "std": [1.0]}', "2 values"),
        ('{"mean": [1.0, 2.0], "std": [1.0, 0.0]}', "std > 0"),
        ('{"mean": ["a", 2.0], "std": [1.0, 1.0]}', "malformed"),
    ],
)
def test_stats_load_errors(tmp_path: Path, content: str | None, fragment: str) -> None:
    path = tmp_path / "s.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=fragment) as info:
        ChannelStats.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_all_nan_and_negative_inputs_give_finite_output() -> None:
    x = torch.full((3, 4, 8, 8), float("nan"))
    x[1] = -1.0  # nonsense negative backscatter must not make NaN either
    x[2, :, :4] = 0.5
    t = BatchTransform(mean=[-15.0, -20.0], std=[5.0, 4.0], flips=True).train()
    original = x.clone()
    y = t(x)
    torch.testing.assert_close(x, original, equal_nan=True)  # the input batch is not modified
    assert y.shape == x.shape and torch.isfinite(y).all()
    t.eval()
    y = t(x)
    expected_fill = (10 * math.log10(1e-9) - (-15.0)) / 5.0
    assert torch.allclose(y[0, 0], torch.full((8, 8), expected_fill))


def test_pipeline_order_nan_db_normalise() -> None:
    x = torch.tensor([1.0, float("nan"), 0.01, 100.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    t = BatchTransform(nan_fill=1.0, mean=[1.0, 2.0], std=[2.0, 4.0]).eval()
    y = t(x.clone())[0, :, 0, 0]
    db = 10 * torch.log10(torch.tensor([1.0, 1.0, 0.01, 100.0]) + 1e-9)
    expected = (db - torch.tensor([1.0, 2.0, 1.0, 2.0])) / torch.tensor([2.0, 4.0, 2.0, 4.0])
    assert torch.allclose(y, expected, atol=1e-6)


def test_flips_only_in_training_and_per_sample() -> None:
    torch.manual_seed(0)
    x = torch.rand(64, 4, 5, 5) + 0.1
    t = BatchTransform(to_db=False, flips=True)
    t.eval()
    assert torch.equal(t(x), x)
    t.train()
    y = t(x)
    variants = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
    kinds = []
    for i in range(len(x)):
        match = [k for k, v in enumerate(variants) if torch.equal(y[i], v[i])]
        assert match, "each output is a flip of its own input"
        kinds.append(match[0])
    assert len(set(kinds)) == 4  # all four flip combinations occur in one batch
    no_flips = BatchTransform(to_db=False, flips=False).train()
    assert torch.equal(no_flips(x), x)


def test_temporal_layout_and_resize(tiny_h5: Path) -> None:
    ds = QuakeSetDataset(tiny_h5, "val", layout="temporal")
    batch = collate(ds.__getitems__(list(range(4))))
    assert batch["image"].shape == (4, 2, 2, 32, 32)
    t = BatchTransform(image_size=48).eval()
    y = t(batch["image"])
    assert y.shape == (4, 2, 2, 48, 48) and torch.isfinite(y).all()
    flat = BatchTransform(image_size=16).eval()(batch["image"].reshape(4, 4, 32, 32))
    assert flat.shape == (4, 4, 16, 16)
    with pytest.raises(DataError, match="expects"):
        t(torch.zeros(2, 3, 8, 8))


def test_build_transform_from_config(tiny_h5: Path) -> None:
    stats = compute_stats(tiny_h5, progress=False)
    cfg = DataConfig(flips=True, image_size=24)
    t = build_transform(cfg, stats)
    assert t.normalize and t.flips and t.image_size == 24
    assert t.mean.flatten().tolist() == pytest.approx(stats.mean * 2)
    with pytest.raises(DataError, match="quakeray data stats"):
        build_transform(cfg, None)
    with pytest.raises(DataError, match="to_db"):
        build_transform(DataConfig(to_db=False), stats)
    with pytest.raises(DataError, match="nan_fill"):
        build_transform(DataConfig(nan_fill=1.0), stats)
    plain = build_transform(DataConfig(normalize=False), None)
    assert not plain.normalize


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_transform_on_gpu() -> None:
    x = torch.rand(4, 4, 16, 16, device="cuda")
    x[0] = float("nan")
    t = BatchTransform(mean=[-10.0, -15.0], std=[3.0, 3.0], flips=True, image_size=8).cuda()
    y = t(x)
    assert y.device.type == "cuda" and torch.isfinite(y).all()
    assert torch.allclose(t.eval()(x).cpu(), t.cpu()(x.cpu()), atol=1e-5)


def test_stats_json_is_plain(tiny_h5: Path, tmp_path: Path) -> None:
    path = compute_stats(tiny_h5, progress=False).save(tmp_path / "s.json")
    raw = json.loads(path.read_text())
    assert raw["split"] == "train" and raw["to_db"] is True and len(raw["mean"]) == 2


def test_outputs_kept_by_the_caller_are_never_overwritten() -> None:
    t = BatchTransform(mean=[-15.0, -20.0], std=[5.0, 4.0]).eval()
    first = t(torch.rand(4, 4, 8, 8))
    snapshot = first.clone()
    for _ in range(5):  # more calls than the CPU buffer pool keeps
        last = t(torch.rand(4, 4, 8, 8))
    assert torch.equal(first, snapshot)
    assert not torch.equal(last, first)


def _reference(t: BatchTransform, x: torch.Tensor) -> torch.Tensor:
    """The transform as it was written before it was made fast: a pass per step."""
    temporal = x.dim() == 5
    if temporal:
        x = x.reshape(x.shape[0], 4, *x.shape[-2:])
    fill = t.nan_fill
    x = torch.nan_to_num(x.float(), nan=fill, posinf=fill, neginf=fill)
    if t.to_db:
        x.masked_fill_(x < 0, fill)
        x.clamp_(min=0.0).add_(t.eps).log10_().mul_(10.0)
    if t.normalize:
        x.sub_(t.mean).div_(t.std)
    if t.training and t.flips:
        coins = torch.rand(x.shape[0], 2, device=x.device) < 0.5
        h = coins[:, 0].nonzero().squeeze(1)
        x[h] = x[h].flip(-1)
        v = coins[:, 1].nonzero().squeeze(1)
        x[v] = x[v].flip(-2)
    return x.reshape(x.shape[0], 2, 2, *x.shape[-2:]) if temporal else x


@pytest.mark.parametrize(
    "settings",
    [
        {"mean": [-15.0, -20.0], "std": [5.0, 4.0], "flips": True},
        {"nan_fill": 1.0, "mean": [1.0, 2.0], "std": [2.0, 4.0], "flips": True},
        {"nan_fill": -3.0},
        {"to_db": False, "nan_fill": 2.0, "mean": [0.1, 0.02], "std": [0.1, 0.05]},
    ],
)
def test_fast_paths_are_bit_identical_to_the_reference(
    tiny_h5: Path, settings: dict[str, object]
) -> None:
    stacked = QuakeSetDataset(tiny_h5, "train")
    raw = QuakeSetDataset(tiny_h5, "train", layout="raw")
    temporal = QuakeSetDataset(tiny_h5, "train", layout="temporal")
    idx = list(range(len(stacked)))
    x = collate(stacked.__getitems__(idx))["image"].clone()
    xr = collate(raw.__getitems__(idx))["image"].clone()
    xt = collate(temporal.__getitems__(idx))["image"].clone()
    # Gaps of every kind, in both layouts alike: +-inf, negative and -0.0 linear values.
    for value, (b, t, y, w, c) in zip(
        (float("inf"), -float("inf"), -1.0, -0.0),
        ((0, 0, 1, 2, 0), (1, 1, 3, 4, 1), (2, 0, 5, 6, 1), (3, 1, 7, 8, 0)),
        strict=True,
    ):
        xr[b, t, y, w, c] = value
        x[b, 2 * t + c, y, w] = value
        xt[b, t, c, y, w] = value
    assert torch.isnan(x).any()
    transform = BatchTransform(**settings)  # type: ignore[arg-type]
    for mode in ("eval", "train"):
        getattr(transform, mode)()
        torch.manual_seed(7)
        expected = _reference(transform, x)
        outputs = {}
        for name, batch, layout in (
            ("stacked", x, None),
            ("raw", xr, "raw"),
            ("temporal", xt, None),
            ("stacked, named", x, "stacked"),
        ):
            torch.manual_seed(7)
            outputs[name] = transform(batch, layout=layout)
        torch.manual_seed(7)
        temporal_ref = _reference(transform, xt)
        assert torch.equal(outputs["temporal"], temporal_ref)
        assert outputs["temporal"].shape == (len(idx), 2, 2, 32, 32)
        for name in ("stacked", "raw", "stacked, named"):
            assert outputs[name].shape == expected.shape, name
            assert torch.equal(outputs[name], expected), name  # bit for bit
        assert torch.isfinite(expected).all()


def test_raw_layout_shape_is_checked() -> None:
    t = BatchTransform().eval()
    with pytest.raises(DataError, match="raw batch"):
        t(torch.zeros(2, 4, 8, 8), layout="raw")
    with pytest.raises(DataError, match="expects"):
        t(torch.zeros(2, 2, 8, 8, 2), layout="temporal")
