"""QuakeSetDataset: torchgeo's sample order and count, layouts, lazy handles, batched reads."""

from __future__ import annotations

import multiprocessing
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from quakeray.data.quakeset import SPLITS, QuakeSetDataset, collate
from quakeray.data.synthetic import write_synthetic

FIXTURE = Path(__file__).parent / "quakeset" / "earthquakes.h5"


def _torchgeo(path: Path, split: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    from torchgeo.datasets import QuakeSet

    root = tmp_path / f"tg_{split}"
    root.mkdir(exist_ok=True)
    shutil.copy(path, root / "earthquakes.h5")
    return QuakeSet(str(root), split=split)


def _assert_same_as_torchgeo(path: Path, tmp_path: Path) -> None:
    total = 0
    for split in SPLITS:
        ours = QuakeSetDataset(path, split)  # type: ignore[arg-type]
        oracle = _torchgeo(path, split, tmp_path)
        assert len(ours) == len(oracle)
        total += len(ours)
        for i, meta in enumerate(oracle.data):
            assert ours.event_ids[i] == meta["key"]
            assert ours.patches[i] == meta["patch"]
            assert ours.labels[i] == meta["label"]
            assert ours.magnitudes[i] == np.float32(meta["magnitude"])
            mine = ours[i]
            theirs = oracle[i]
            # torchgeo fills NaN with 0 while loading; we keep NaN for the batch transform.
            assert torch.equal(torch.nan_to_num(mine["image"], nan=0.0), theirs["image"])
            assert mine["label"] == theirs["label"]
            assert mine["magnitude"] == theirs["magnitude"]
    assert total > 0


def test_committed_fixture_matches_torchgeo(tmp_path: Path) -> None:
    # 12 patches in one event (patch_10 sorts before patch_2), x/y entries, partial 'before'.
    _assert_same_as_torchgeo(FIXTURE, tmp_path)
    ds = QuakeSetDataset(FIXTURE, "train")
    assert ds.patches[:4] == ["patch_0", "patch_0", "patch_1", "patch_10"]


@pytest.mark.parametrize("seed", [0, 1])
def test_generated_files_match_torchgeo(tmp_path: Path, seed: int) -> None:
    path = write_synthetic(tmp_path / "q.h5", events=12, size=16, seed=seed, max_patches=12)
    _assert_same_as_torchgeo(path, tmp_path)


def test_without_before_and_with_extra_entries(tmp_path: Path) -> None:
    path = write_synthetic(tmp_path / "q.h5", events=6, size=16, seed=3)
    with h5py.File(path, "a") as f:
        for key in f:
            for patch in [k for k in f[key] if k.startswith("patch_")]:
                if "before" in f[key][patch]:
                    del f[key][patch]["before"]
    _assert_same_as_torchgeo(path, tmp_path)
    ds = QuakeSetDataset(path, "train")
    assert ds.labels.tolist() == [1] * len(ds)


def test_samples_positives_only_and_metadata(tiny_h5: Path) -> None:
    full = QuakeSetDataset(tiny_h5, "train")
    pos = QuakeSetDataset(tiny_h5, "train", positives_only=True)
    assert len(pos) == int(full.labels.sum()) and len(pos) < len(full)
    assert set(pos.labels.tolist()) == {1}
    # The same positives in the same order as the full split, negatives just left out.
    keep = full.labels == 1
    assert pos.event_ids == [e for e, k in zip(full.event_ids, keep, strict=True) if k]
    assert pos.patches == [n for n, k in zip(full.patches, keep, strict=True) if k]
    np.testing.assert_array_equal(pos.magnitudes, full.magnitudes[keep])
    assert np.all(pos.magnitudes >= 4.0)
    assert np.all(full.magnitudes[full.labels == 0] == 0.0)
    assert full.magnitudes.dtype == np.float32 and full.labels.dtype == np.int64
    assert full.image_size == (32, 32)
    s = full[0]
    assert s["image"].dtype == torch.float32 and s["image"].shape == (4, 32, 32)
    assert s["label"].dtype == torch.int64 and s["label"].shape == ()
    assert s["magnitude"].dtype == torch.float32 and s["magnitude"].shape == ()
    assert isinstance(s["event_id"], str) and s["patch"].startswith("patch_")
    assert full[-1]["patch"] == full.patches[-1]
    with pytest.raises(IndexError):
        full[len(full)]


def test_layouts_and_channel_order(tiny_h5: Path) -> None:
    stacked = QuakeSetDataset(tiny_h5, "val")
    temporal = QuakeSetDataset(tiny_h5, "val", layout="temporal")
    i = int(np.flatnonzero(stacked.labels == 0)[0])  # a (before, pre) negative
    a, b = stacked[i]["image"], temporal[i]["image"]
    assert b.shape == (2, 2, 32, 32)
    torch.testing.assert_close(a.reshape(2, 2, 32, 32), b, rtol=0, atol=0, equal_nan=True)
    with h5py.File(tiny_h5) as f:
        group = f[stacked.event_ids[i]][stacked.patches[i]]
        before, pre = group["before"][:], group["pre"][:]
    np.testing.assert_array_equal(a[0].numpy(), before[..., 0])  # t0 VV
    np.testing.assert_array_equal(a[1].numpy(), before[..., 1])  # t0 VH
    np.testing.assert_array_equal(a[2].numpy(), pre[..., 0])  # t1 VV
    np.testing.assert_array_equal(a[3].numpy(), pre[..., 1])  # t1 VH


def test_raw_layout_is_the_stored_order(tiny_h5: Path) -> None:
    stacked = QuakeSetDataset(tiny_h5, "train")
    raw = QuakeSetDataset(tiny_h5, "train", layout="raw")
    idx = list(range(len(raw)))
    batch = collate(raw.__getitems__(idx))["image"]
    assert batch.shape == (len(raw), 2, 32, 32, 2) and batch.is_contiguous()
    expected = collate(stacked.__getitems__(idx))["image"]
    as_stacked = batch.permute(0, 1, 4, 2, 3).reshape(expected.shape)
    assert torch.isnan(expected).any()  # the NaN gaps come through untouched
    torch.testing.assert_close(as_stacked, expected, rtol=0, atol=0, equal_nan=True)
    with h5py.File(tiny_h5) as f:
        group = f[raw.event_ids[0]][raw.patches[0]]
        np.testing.assert_array_equal(raw[0]["image"][1].numpy(), group["post"][:])
    assert "layout='raw'" in repr(raw)


def test_nan_kept_raw(tiny_h5: Path) -> None:
    ds = QuakeSetDataset(tiny_h5, "train")
    assert any(torch.isnan(ds[i]["image"]).any() for i in range(len(ds)))


def test_pickle_drops_handle_and_reopens(tiny_h5: Path) -> None:
    ds = QuakeSetDataset(tiny_h5, "test")
    first = ds[0]["image"]
    assert ds.is_open
    blob = pickle.dumps(ds)
    assert len(blob) < 100_000  # the index, never pixels or a handle
    clone = pickle.loads(blob)
    assert not clone.is_open
    assert torch.equal(clone[0]["image"].nan_to_num(), first.nan_to_num())
    clone.close()
    ds.close()


_FORKED: dict[str, QuakeSetDataset] = {}


def _read_in_child(index: int) -> tuple[bool, bool, np.ndarray]:
    """In a forked child: (open before the read, open after it, the image)."""
    ds = _FORKED["ds"]
    before = ds.is_open  # the handle it inherited belongs to the parent's pid
    image = ds[index]["image"].numpy()
    return before, ds.is_open, image


def test_handle_reopened_after_fork(tiny_h5: Path) -> None:
    ds = QuakeSetDataset(tiny_h5, "train")
    expected = ds[1]["image"].numpy()
    assert ds.is_open
    _FORKED["ds"] = ds
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            before, after, image = pool.apply(_read_in_child, (1,))
    finally:
        _FORKED.clear()
    assert not before and after  # the child opened a handle of its own
    np.testing.assert_array_equal(image, expected)
    assert ds.is_open  # parent's handle untouched, and still reads
    np.testing.assert_array_equal(ds[1]["image"].numpy(), expected)
    ds.close()


def test_getitems_batch_equals_default_collate(tiny_h5: Path) -> None:
    for layout in ("stacked", "temporal", "raw"):
        ds = QuakeSetDataset(tiny_h5, "train", layout=layout)  # type: ignore[arg-type]
        idx = [3, 0, 7, 7, len(ds) - 1]
        fast = collate(ds.__getitems__(idx))
        slow = default_collate([ds[i] for i in idx])
        assert fast.keys() == slow.keys()
        assert torch.equal(fast["image"].nan_to_num(), slow["image"].nan_to_num())
        for key in ("label", "magnitude"):
            assert torch.equal(fast[key], slow[key]) and fast[key].dtype == slow[key].dtype
        assert fast["event_id"] == slow["event_id"] and fast["patch"] == slow["patch"]
        # default_collate on our SampleList still works (plain list of samples).
        again = default_collate(ds.__getitems__(idx))
        assert torch.equal(again["image"].nan_to_num(), fast["image"].nan_to_num())


def test_dataloader_workers_see_the_same_samples(tiny_h5: Path) -> None:
    ds = QuakeSetDataset(tiny_h5, "train")
    ds[0]  # open a handle in the parent first: workers must not reuse it
    ref = [ds[i] for i in range(len(ds))]
    loader = DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate)
    got = list(loader)
    images = torch.cat([b["image"] for b in got])
    assert images.shape == (len(ds), 4, 32, 32)
    assert torch.equal(images.nan_to_num(), torch.stack([r["image"] for r in ref]).nan_to_num())
    assert [e for b in got for e in b["event_id"]] == ds.event_ids
    ds.close()


def test_batch_buffers_are_recycled_only_when_unused(tiny_h5: Path) -> None:
    ds = QuakeSetDataset(tiny_h5, "train")
    kept = collate(ds.__getitems__([0, 1, 2, 3]))
    snapshot = kept["image"].clone()
    view = collate(ds.__getitems__([4, 5, 6, 7]))["image"][1]  # only a view survives
    view_copy = view.clone()
    for _ in range(5):  # more batches than the pool keeps
        other = collate(ds.__getitems__([8, 9, 10, 11]))
    torch.testing.assert_close(kept["image"], snapshot, equal_nan=True)
    torch.testing.assert_close(view, view_copy, equal_nan=True)
    # Once nothing refers to a batch, its memory is refilled instead of a fresh allocation.
    ptr = other["image"].data_ptr()
    del other
    again = collate(ds.__getitems__([12, 13, 14, 15]))
    assert again["image"].data_ptr() == ptr
    assert torch.equal(again["image"][0].nan_to_num(), ds[12]["image"].nan_to_num())
