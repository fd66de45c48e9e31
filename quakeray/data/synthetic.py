"""Synthetic QuakeSet-format files with a learnable, magnitude-dependent change.

The file has the published layout (``/<event_id>/patch_<i>/{pre,post[,before]}``, ``x``/``y``
beside the patches, ``magnitude`` and ``split`` attributes) and a signal model simple
enough to state in a few lines:

- **Magnitudes** follow a Gutenberg-Richter law truncated to [4.0, 7.5] with b = 0.7 (each
  unit of magnitude five times rarer: many small, few large), rounded to 0.1 like catalogues.
- **Splits** are stratified by magnitude: events sorted by magnitude fall in blocks of five,
  each block split 3 train / 1 validation / 1 test at random, so every split spans the range.
- **Ground**: a smooth log-normal reflectivity texture per patch (VV around -11 dB, VH about
  7 dB lower), shared by all acquisitions of the patch.
- **Acquisitions** (``before``, ``pre``, ``post``): reflectivity x a small per-acquisition
  calibration gain x independent multiplicative speckle ~ Gamma(L=4.4, 1/L): linear
  backscatter, like GRD intensities.
- **The earthquake**: ``post`` gets a change inside a soft disc at a random centre; its
  radius (footprint) and its gain in dB (strength) are increasing functions of magnitude,
  so the magnitude is learnable from the pre/post pair. ``before``/``pre`` pairs have no
  change (the hard negatives, magnitude 0).
- **Gaps**: about a third of the patches have a NaN border (swath edge) on one side, and
  files with 16+ events have one or two entirely NaN patches.

Deterministic by seed. Arrays are stored uncompressed and contiguous, which is what makes
``read_direct`` fast.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
from scipy.ndimage import gaussian_filter

from quakeray import storage
from quakeray.errors import DataError

__all__ = [
    "GR_B",
    "LOOKS",
    "MAX_EVENTS",
    "MAX_SIZE",
    "SPLIT_BLOCK",
    "change_gain_db",
    "change_radius",
    "sample_magnitudes",
    "stratified_splits",
    "write_synthetic",
]

MAG_MIN, MAG_MAX = 4.0, 7.5
GR_B = 0.7  # Gutenberg-Richter b-value (a catalogue selected for visible damage: flatter than 1)
LOOKS = 4.4  # equivalent number of looks of the gamma speckle
SPLIT_BLOCK = ("train", "train", "train", "validation", "test")


def _growth(magnitude: float | np.ndarray) -> np.ndarray:
    """0 at M4.0 to 1 at M7.5, concave: differences among the many small events stay visible."""
    frac = (np.asarray(magnitude, dtype=np.float64) - MAG_MIN) / (MAG_MAX - MAG_MIN)
    return np.asarray(np.clip(frac, 0.0, 1.0) ** 0.7)


def change_radius(magnitude: float | np.ndarray, size: int) -> float | np.ndarray:
    """Footprint radius in pixels of the post-event change: grows with magnitude."""
    return size * (0.08 + 0.30 * _growth(magnitude))


def change_gain_db(magnitude: float | np.ndarray) -> float | np.ndarray:
    """Backscatter increase in dB at the centre of the change: grows with magnitude."""
    return 2.0 + 5.0 * _growth(magnitude)


def sample_magnitudes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Truncated Gutenberg-Richter magnitudes in [4.0, 7.5], rounded to 0.1."""
    u = rng.random(n)
    tail = 1.0 - 10.0 ** (-GR_B * (MAG_MAX - MAG_MIN))
    mags = MAG_MIN - np.log10(1.0 - u * tail) / GR_B
    return np.asarray(np.clip(np.round(mags, 1), MAG_MIN, MAG_MAX), dtype=np.float32)


def stratified_splits(rng: np.random.Generator, magnitudes: np.ndarray) -> list[str]:
    """Split per event, balanced by magnitude (3:1:1 within consecutive blocks of five)."""
    order = np.argsort(magnitudes, kind="stable")
    splits = [""] * len(magnitudes)
    for start in range(0, len(order), len(SPLIT_BLOCK)):
        block = order[start : start + len(SPLIT_BLOCK)]
        if len(block) == len(SPLIT_BLOCK):
            roles = [str(r) for r in rng.permutation(SPLIT_BLOCK)]
        else:
            # A short last block (or a tiny file) still gets every split once first.
            roles = ["train", "validation", "test", "train"][: len(block)]
        for idx, role in zip(block, roles, strict=True):
            splits[int(idx)] = role
    return splits


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth unit-variance field (the ground's reflectivity variation)."""
    field: np.ndarray = gaussian_filter(
        rng.standard_normal((size, size)), sigma=max(size / 16, 1.0)
    )
    return np.asarray((field - field.mean()) / (field.std() + 1e-12))


def _acquisition(rng: np.random.Generator, sigma0_db: np.ndarray) -> np.ndarray:
    """Linear backscatter (H, W, 2) = reflectivity x calibration gain x gamma speckle."""
    gain_db = rng.normal(0.0, 0.2)
    linear = 10.0 ** ((sigma0_db + gain_db) / 10.0)
    speckle = rng.gamma(LOOKS, 1.0 / LOOKS, size=linear.shape)
    return (linear * speckle).astype(np.float32)


def _nan_border(rng: np.random.Generator, size: int) -> np.ndarray:
    """Boolean mask of a swath-edge band on one side of the patch."""
    mask = np.zeros((size, size), dtype=bool)
    width = int(rng.integers(max(size // 16, 1), max(size // 3, 2)))
    side = int(rng.integers(4))
    if side == 0:
        mask[:width, :] = True
    elif side == 1:
        mask[-width:, :] = True
    elif side == 2:
        mask[:, :width] = True
    else:
        mask[:, -width:] = True
    return mask


MAX_EVENTS = 100_000
"""Upper bound on ``events``: beyond it the file would be far larger than the real one."""

MAX_SIZE = 4096
"""Upper bound on the patch side in pixels."""


def _check_free_space(out: Path, patches: int, size: int) -> None:
    """Refuse before writing when the file would not fit on the disk (nothing half written)."""
    # pre + post for every patch, `before` in about half of them; 2 channels of float32.
    need = int(patches * 2.5 * size * size * 2 * 4)
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise DataError(
            f"{out}: needs about {need / 1e9:.1f} GB but {out.parent} has "
            f"{free / 1e9:.1f} GB free; lower --events or --size, or write elsewhere"
        )


def write_synthetic(
    path: str | Path,
    *,
    events: int = 64,
    size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    max_patches: int = 3,
) -> Path:
    """Write a synthetic QuakeSet-format file (atomically: temp file, then rename).

    Args:
        path: Output HDF5 path.
        events: Number of earthquakes (at least 3: one per split).
        size: Patch side in pixels (at least 16).
        seed: Random seed; the same seed gives the same file content.
        overwrite: Replace an existing file.
        max_patches: Patches per event are drawn from 1..max_patches.

    Returns:
        The written path.

    Raises:
        DataError: The file exists and ``overwrite`` is false, or an argument is out of range,
            or the directory is not writable.
    """
    out = Path(path)
    if events < 3:
        raise DataError(f"--events must be >= 3 (one event per split), got {events}")
    if events > MAX_EVENTS:
        raise DataError(
            f"--events must be <= {MAX_EVENTS:,} (the real QuakeSet has about 1,000), got {events}"
        )
    if size < 16:
        raise DataError(f"--size must be >= 16 pixels, got {size}")
    if size > MAX_SIZE:
        raise DataError(f"--size must be <= {MAX_SIZE} pixels (QuakeSet uses 512), got {size}")
    if max_patches < 1:
        raise DataError(f"max_patches must be >= 1, got {max_patches}")
    if seed < 0:
        raise DataError(f"--seed must be >= 0 (numpy seeds are non-negative), got {seed}")
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass --force (overwrite=True) to replace it")
    if out.is_dir():
        raise DataError(f"{out} is a directory; pass a file path such as {out / 'quakeset.h5'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create {out.parent}: {exc.strerror or exc}") from None

    rng = np.random.default_rng(seed)
    magnitudes = sample_magnitudes(rng, events)
    splits = stratified_splits(rng, magnitudes)
    # Same draw as choice(np.arange(600M, 620M)) without materialising a 160 MB array.
    ids = 600_000_000 + rng.choice(20_000_000, size=events, replace=False)
    n_patches = rng.integers(1, max_patches + 1, size=events)
    total = int(n_patches.sum())
    _check_free_space(out, total, size)
    all_nan = set()
    if events >= 16:
        picks = rng.choice(total, size=1 if events < 64 else 2, replace=False)
        all_nan = {int(p) for p in picks}

    try:
        with (
            storage.replaced_atomically(out) as tmp,
            h5py.File(tmp, "w", libver="latest") as f,
        ):
            counter = 0
            for e in range(events):
                group = f.create_group(str(int(ids[e])))
                group.attrs["magnitude"] = np.float32(magnitudes[e])
                group.attrs["split"] = splits[e]
                lon0, lat0 = rng.uniform(-180, 170), rng.uniform(-60, 60)
                group.create_dataset("x", data=lon0 + np.arange(size) * 5e-5)
                group.create_dataset("y", data=lat0 - np.arange(size) * 5e-5)
                for p in range(int(n_patches[e])):
                    _write_patch(
                        group.create_group(f"patch_{p}"),
                        rng,
                        size,
                        float(magnitudes[e]),
                        all_nan=counter in all_nan,
                    )
                    counter += 1
    except OSError as exc:
        # h5py reports an unwritable directory or a full disk as OSError: one line, not a trace.
        raise DataError(
            f"cannot write {out}: {exc.strerror or exc}; pick a writable directory with free space"
        ) from None
    return out


def _write_patch(
    group: h5py.Group, rng: np.random.Generator, size: int, magnitude: float, *, all_nan: bool
) -> None:
    texture = _texture(rng, size)
    vv = -11.0 + 2.5 * texture
    sigma0 = np.stack([vv, vv - 7.0 + 0.5 * texture], axis=-1)

    # The earthquake: a soft disc of increased backscatter in the post acquisition.
    radius = float(change_radius(magnitude, size))
    cy, cx = rng.uniform(radius * 0.5, size - radius * 0.5, size=2)
    yy, xx = np.mgrid[0:size, 0:size]
    dist = np.hypot(yy - cy, xx - cx)
    profile = 1.0 / (1.0 + np.exp((dist - radius) / max(size / 64, 0.5)))
    change = float(change_gain_db(magnitude)) * profile
    post_sigma0 = sigma0 + np.stack([change, 0.7 * change], axis=-1)

    has_before = bool(rng.random() < 0.5)
    arrays = {"pre": _acquisition(rng, sigma0), "post": _acquisition(rng, post_sigma0)}
    if has_before:
        arrays["before"] = _acquisition(rng, sigma0)
    mask = _nan_border(rng, size) if rng.random() < 1 / 3 else None
    for name in ("before", "pre", "post"):
        if name not in arrays:
            continue
        data = arrays[name]
        if all_nan:
            data[...] = np.nan
        elif mask is not None:
            data[mask] = np.nan
        group.create_dataset(name, data=data)
