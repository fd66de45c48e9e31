"""The synthetic generator: layout, determinism, magnitude statistics, a learnable signal."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from quakeray.data.inspect import inspect_file
from quakeray.data.quakeset import QuakeSetDataset, collate
from quakeray.data.synthetic import (
    change_gain_db,
    change_radius,
    sample_magnitudes,
    stratified_splits,
    write_synthetic,
)
from quakeray.data.transforms import BatchTransform, compute_stats
from quakeray.errors import DataError


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path) as f:
        f.visititems(
            lambda name, obj: out.update({name: obj[()]}) if isinstance(obj, h5py.Dataset) else None
        )
        for key in f:
            out[f"{key}@"] = np.array([f[key].attrs["magnitude"], hash(f[key].attrs["split"])])
    return out


def test_deterministic_by_seed(tmp_path: Path) -> None:
    a = _arrays(write_synthetic(tmp_path / "a.h5", events=8, size=16, seed=5))
    b = _arrays(write_synthetic(tmp_path / "b.h5", events=8, size=16, seed=5))
    c = _arrays(write_synthetic(tmp_path / "c.h5", events=8, size=16, seed=6))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)
    assert a.keys() != c.keys()


def test_never_clobbers_and_writes_atomically(tmp_path: Path) -> None:
    path = tmp_path / "q.h5"
    path.write_bytes(b"precious")
    with pytest.raises(DataError, match="already exists"):
        write_synthetic(path, events=4, size=16)
    assert path.read_bytes() == b"precious"
    write_synthetic(path, events=4, size=16, overwrite=True)
    assert h5py.is_hdf5(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.h5"]  # no temp file left
    with pytest.raises(DataError, match="events must be >= 3"):
        write_synthetic(tmp_path / "x.h5", events=2)
    with pytest.raises(DataError, match="size must be >= 16"):
        write_synthetic(tmp_path / "x.h5", size=8)
    with pytest.raises(DataError, match="seed must be >= 0"):
        write_synthetic(tmp_path / "x.h5", seed=-1)


def test_unwritable_output_is_a_one_line_data_error(tmp_path: Path) -> None:
    # Works as root too: the temporary file's name is taken by a directory, so HDF5 cannot
    # create it (what an unwritable directory or a full disk look like to h5py).
    out = tmp_path / "q.h5"
    (tmp_path / f".q.h5.tmp-{os.getpid()}").mkdir()
    with pytest.raises(DataError, match=r"cannot write .*q\.h5") as info:
        write_synthetic(out, events=4, size=16)
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_layout_matches_the_published_file(tiny_h5: Path) -> None:
    with h5py.File(tiny_h5) as f:
        for key in f:
            event = f[key]
            assert key.isdigit() and event.attrs["split"] in ("train", "validation", "test")
            assert 4.0 <= float(event.attrs["magnitude"]) <= 7.5
            assert isinstance(event["x"], h5py.Dataset) and isinstance(event["y"], h5py.Dataset)
            for name in (n for n in event if n.startswith("patch_")):
                for acq in event[name]:
                    ds = event[name][acq]
                    assert ds.shape == (32, 32, 2) and ds.dtype == np.float32
                    assert ds.compression is None and ds.chunks is None  # contiguous: fast reads
    report = inspect_file(tiny_h5)
    assert all(report.events[s] > 0 for s in ("train", "validation", "test"))
    assert all(report.negatives[s] > 0 for s in ("train", "validation", "test"))  # some before
    assert 0 < report.nan_fraction < 0.5  # NaN borders
    assert report.all_nan_patches >= 1  # 24 events: at least one entirely NaN patch


def test_magnitudes_skewed_and_splits_stratified() -> None:
    rng = np.random.default_rng(0)
    mags = sample_magnitudes(rng, 5000)
    assert mags.min() >= 4.0 and mags.max() <= 7.5 and mags.max() > 6.5
    counts = [np.sum((mags >= lo) & (mags < lo + 0.5)) for lo in np.arange(4.0, 7.5, 0.5)]
    assert all(a > b for a, b in itertools.pairwise(counts))  # many small, few large
    splits = np.array(stratified_splits(rng, mags))
    share = {s: np.mean(splits == s) for s in ("train", "validation", "test")}
    assert share["train"] == pytest.approx(0.6, abs=0.01)
    med = {s: np.median(mags[splits == s]) for s in share}
    assert max(med.values()) - min(med.values()) <= 0.1  # balanced by magnitude
    assert sorted(set(stratified_splits(rng, mags[:3]))) == ["test", "train", "validation"]


def test_change_grows_with_magnitude(tmp_path: Path) -> None:
    m = np.linspace(4.0, 7.5, 8)
    assert np.all(np.diff(change_radius(m, 64)) > 0) and np.all(np.diff(change_gain_db(m)) > 0)
    # And in the written data: the post/pre dB change grows with the event magnitude.
    path = write_synthetic(tmp_path / "q.h5", events=40, size=32, seed=2)
    ds = QuakeSetDataset(path, "train", positives_only=True)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    db = 10 * torch.log10(x.nan_to_num(1.0) + 1e-9)
    # VV change, smoothed against speckle, above the patch median (removes calibration gain).
    change = nn.functional.avg_pool2d((db[:, 2] - db[:, 0])[:, None], 4)[:, 0]
    change = change - change.flatten(1).median(1).values[:, None, None]
    assert _spearman(ds.magnitudes, change.clamp_min(0).mean(dim=(1, 2)).numpy()) > 0.6


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(6, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The two acquisitions and their difference: the change is what carries magnitude.
        x = torch.cat([x, x[:, 2:] - x[:, :2]], dim=1)
        f = self.features(x)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return self.head(pooled).squeeze(1)


@pytest.fixture()
def one_thread() -> Iterator[None]:
    # Tiny convolutions run fastest single-threaded, and the 2-core CI machine is shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_signal_is_learnable(tmp_path: Path, one_thread: None) -> None:
    torch.manual_seed(0)
    path = write_synthetic(tmp_path / "q.h5", events=60, size=32, seed=1)
    stats = compute_stats(path, progress=False)
    transform = BatchTransform(mean=stats.mean, std=stats.std, flips=True)
    train = QuakeSetDataset(path, "train")
    val = QuakeSetDataset(path, "val")
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True, collate_fn=collate)
    net = _TinyNet()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(20):
        transform.train()
        for batch in loader:
            loss = nn.functional.mse_loss(net(transform(batch["image"])), batch["magnitude"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    vb = collate(val.__getitems__(range(len(val))))
    with torch.no_grad():
        pred = net(transform.eval()(vb["image"]))
    mae = (pred - vb["magnitude"]).abs().mean().item()
    baseline = (float(train.magnitudes.mean()) - vb["magnitude"]).abs().mean().item()
    assert mae < 0.7 * baseline, (mae, baseline)
    # Among positives too, larger events must rank higher than smaller ones.
    pos = vb["label"] == 1
    rho = _spearman(pred[pos].numpy(), vb["magnitude"][pos].numpy())
    assert rho > 0.4, rho


def test_cli_synth_then_inspect(tmp_path: Path) -> None:
    out = tmp_path / "demo.h5"
    cmd = [sys.executable, "-m", "quakeray", "data"]
    synth = [*cmd, "synth", str(out), "--events", "9", "--size", "16", "--seed", "4"]
    proc = subprocess.run(synth, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    again = subprocess.run(synth, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    proc = subprocess.run(
        [*cmd, "inspect", str(out), "--json"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for ours, theirs in (("train", "train"), ("val", "validation"), ("test", "test")):
        ds = QuakeSetDataset(out, ours)  # type: ignore[arg-type]
        assert report["positives"][theirs] + report["negatives"][theirs] == len(ds)
        assert report["positives"][theirs] == int(ds.labels.sum())
    assert sum(b["events"] for b in report["magnitude_hist"]) == 9


def test_absurd_sizes_are_refused_before_any_allocation(tmp_path: Path) -> None:
    from quakeray.data.synthetic import MAX_EVENTS, MAX_SIZE

    with pytest.raises(DataError, match="--events must be <="):
        write_synthetic(tmp_path / "a.h5", events=MAX_EVENTS + 1)
    with pytest.raises(DataError, match="--size must be <="):
        write_synthetic(tmp_path / "b.h5", size=MAX_SIZE + 1)
    # 100,000 events of 4096 px need terabytes: refused for disk space, nothing written.
    with pytest.raises(DataError, match="GB free"):
        write_synthetic(tmp_path / "c.h5", events=MAX_EVENTS, size=MAX_SIZE)
    assert list(tmp_path.iterdir()) == []
