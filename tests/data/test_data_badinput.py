"""Bad data input: one clear line naming the file and group, exit code 2 from the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from quakeray.data.inspect import inspect_file
from quakeray.data.quakeset import QuakeSetDataset
from quakeray.data.transforms import BatchTransform, compute_stats
from quakeray.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    return dst


def _first_patch(f: h5py.File) -> h5py.Group:
    key = sorted(f.keys())[0]
    return f[key][sorted(n for n in f[key] if n.startswith("patch_"))[0]]


def _missing(tiny: Path, tmp: Path) -> Path:
    return tmp / "nope.h5"


def _directory(tiny: Path, tmp: Path) -> Path:
    (tmp / "adir.h5").mkdir()
    return tmp / "adir.h5"


def _not_hdf5(tiny: Path, tmp: Path) -> Path:
    path = tmp / "text.h5"
    path.write_text("event,magnitude\n1,5.0\n")
    return path


def _truncated(tiny: Path, tmp: Path) -> Path:
    path = _copy(tiny, tmp / "cut.h5")
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    return path


def _edit(change: Callable[[h5py.File], None]) -> Callable[[Path, Path], Path]:
    def make(tiny: Path, tmp: Path) -> Path:
        path = _copy(tiny, tmp / "edited.h5")
        with h5py.File(path, "a") as f:
            change(f)
        return path

    return make


def _no_split(f: h5py.File) -> None:
    del f[sorted(f.keys())[1]].attrs["split"]


def _unknown_split(f: h5py.File) -> None:
    f[sorted(f.keys())[1]].attrs["split"] = "training"


def _rank(f: h5py.File) -> None:
    patch = _first_patch(f)
    del patch["post"]
    patch.create_dataset("post", data=np.zeros((32, 32), np.float32))


def _channels(f: h5py.File) -> None:
    patch = _first_patch(f)
    del patch["pre"]
    patch.create_dataset("pre", data=np.zeros((32, 32, 3), np.float32))


CASES = {
    "missing": (_missing, "no such file"),
    "unreadable": (_directory, "is a directory"),
    "not_hdf5": (_not_hdf5, "not an HDF5 file"),
    "truncated": (_truncated, "truncated"),
    "no_split": (_edit(_no_split), "has no 'split' attribute"),
    "unknown_split": (_edit(_unknown_split), "unknown split 'training'"),
    "wrong_rank": (_edit(_rank), "rank 2"),
    "not_2_channels": (_edit(_channels), "3 channels"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_file_direct_and_cli(case: str, tiny_h5: Path, tmp_path: Path) -> None:
    make, fragment = CASES[case]
    path = make(tiny_h5, tmp_path)
    for call in (lambda: inspect_file(path), lambda: QuakeSetDataset(path, "train")):
        with pytest.raises(DataError, match=fragment) as info:
            call()
        message = str(info.value)
        assert str(path) in message and "\n" not in message
        if case in ("no_split", "unknown_split", "wrong_rank", "not_2_channels"):
            assert "group /" in message or "/patch_" in message  # names the group
    proc = subprocess.run(
        [sys.executable, "-m", "quakeray", "data", "inspect", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and lines[0].startswith("quakeray: error:")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_permission_denied(tiny_h5: Path, tmp_path: Path) -> None:
    path = _copy(tiny_h5, tmp_path / "locked.h5")
    path.chmod(0)
    with pytest.raises(DataError, match="permission denied"):
        inspect_file(path)


def test_unknown_split_argument(tiny_h5: Path) -> None:
    with pytest.raises(DataError, match=r"unknown split 'validation'.*train, val, test"):
        QuakeSetDataset(tiny_h5, "validation")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="layout"):
        QuakeSetDataset(tiny_h5, layout="hwc")  # type: ignore[arg-type]


def test_stats_cli_errors_and_success(tiny_h5: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\0" * 100)
    run = [sys.executable, "-m", "quakeray", "data", "stats"]
    proc = subprocess.run([*run, str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "not an HDF5" in proc.stderr
    out = tmp_path / "s.json"
    proc = subprocess.run(
        [*run, str(tiny_h5), "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "mean [" in proc.stdout
    # An output that cannot be written: one line, exit code 2, and nothing clobbered.
    proc = subprocess.run(
        [*run, str(tiny_h5), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("quakeray: error: cannot write statistics to") and "--out" in last
    assert tmp_path.is_dir() and not list(tmp_path.glob(".*.tmp-*"))


def test_all_nan_patches_counted_and_filled(tiny_h5: Path, tmp_path: Path) -> None:
    path = _copy(tiny_h5, tmp_path / "nan.h5")
    with h5py.File(path, "a") as f:
        patch = _first_patch(f)
        already = all(np.isnan(patch[name][()]).all() for name in patch)
        for name in patch:
            patch[name][...] = np.nan
        where = patch.name
    base = inspect_file(tiny_h5)
    report = inspect_file(path)
    assert report.all_nan_patches == base.all_nan_patches + (0 if already else 1)
    assert where in report.all_nan_examples  # the first patch in file order is listed
    stats = compute_stats(path, progress=False)
    assert all(np.isfinite(stats.mean)) and all(np.isfinite(stats.std))
    key = where.split("/")[1]
    split = {"train": "train", "validation": "val", "test": "test"}[
        h5py.File(path)[key].attrs["split"]
    ]
    ds = QuakeSetDataset(path, split)  # type: ignore[arg-type]
    i = next(i for i in range(len(ds)) if f"/{ds.event_ids[i]}/{ds.patches[i]}" == where)
    raw = ds[i]["image"]
    assert torch.isnan(raw).all()
    out = BatchTransform(mean=stats.mean, std=stats.std, flips=True)(raw[None])
    assert torch.isfinite(out).all()


def _train_patches(f: h5py.File) -> list[h5py.Group]:
    events = [f[k] for k in sorted(f.keys()) if f[k].attrs.get("split") == "train"]
    return [e[n] for e in events for n in sorted(e) if n.startswith("patch_")]


def test_poisoned_pixels_are_counted_and_treated_as_gaps(tiny_h5: Path, tmp_path: Path) -> None:
    # The same pixels made +inf / -inf / negative in one file and NaN in another: inspect
    # counts them, and statistics and the transform see the two files identically.
    poisoned, gaps = _copy(tiny_h5, tmp_path / "poison.h5"), _copy(tiny_h5, tmp_path / "nan.h5")
    for path, values in ((poisoned, (np.inf, -np.inf, -3.0)), (gaps, (np.nan,) * 3)):
        with h5py.File(path, "a") as f:
            first, second = _train_patches(f)[:2]
            first["post"][...] = values[0]  # a whole array at +inf, as in the report
            pre = second["pre"][()]
            flat = pre.reshape(-1)  # a view: four pixel values of each kind
            flat[:4], flat[4:8] = values[1], values[2]
            second["pre"][...] = pre
    report = inspect_file(poisoned)
    with h5py.File(poisoned) as f:
        post_pixels = _train_patches(f)[0]["post"].size
    assert (report.infinite_pixels, report.negative_pixels) == (post_pixels + 4, 4)
    assert len(report.invalid_examples) == 2 and "invalid pixels" in report.format()
    assert inspect_file(tiny_h5).infinite_pixels == 0  # clean data says nothing
    assert "invalid pixels" not in inspect_file(tiny_h5).format()

    clean_stats = compute_stats(gaps, progress=False)
    stats = compute_stats(poisoned, progress=False)
    assert stats.mean == clean_stats.mean and stats.std == clean_stats.std
    ds, ds_gaps = QuakeSetDataset(poisoned, "train"), QuakeSetDataset(gaps, "train")
    batch = torch.stack([ds[i]["image"] for i in range(4)])
    assert not torch.isfinite(batch).all() and (batch < 0).any()
    reference = torch.stack([ds_gaps[i]["image"] for i in range(4)])
    transform = BatchTransform(mean=stats.mean, std=stats.std).eval()
    out = transform(batch)
    assert torch.isfinite(out).all()
    assert torch.equal(out, transform(reference))
    assert torch.isinf(batch).any()  # the input is left as it was
