"""The QuakeSet HDF5 layout: open a file safely and read its event/patch structure.

One place validates the layout, so the dataset, ``inspect`` and ``stats`` agree on what a
well-formed file is and fail with the same one-line :class:`~quakeray.errors.DataError`
naming the file and the group. Only metadata is read here (attributes, shapes, dtypes),
never pixels, so validating the 9.67 GB published file takes well under a second.

The layout (the README's "Data" section)::

    /<event_id>            attrs: magnitude (float), split ("train" | "validation" | "test")
        /patch_<i>         pre, post, [before]: (H, W, 2) float arrays, VV and VH
        x, y               non-patch entries beside the patches: skipped
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from quakeray.errors import DataError

__all__ = [
    "ACQUISITIONS",
    "FILE_SPLITS",
    "NON_PATCH_NAMES",
    "EventInfo",
    "PatchInfo",
    "image_size",
    "open_h5",
    "read_layout",
]

FILE_SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""Split names as stored in the file's ``split`` attributes."""

NON_PATCH_NAMES = frozenset({"x", "y"})
"""Entries beside the patches that torchgeo skips by name (we also skip any non-group)."""

ACQUISITIONS: tuple[str, ...] = ("pre", "post", "before")
"""Image datasets a patch group may hold; ``pre`` and ``post`` are required."""


@dataclass(frozen=True)
class PatchInfo:
    """One patch group of an event.

    Attributes:
        name: Patch group name, e.g. ``patch_0``.
        has_before: Whether the quiet ``before`` acquisition exists (a hard negative).
        shape: Array shape ``(H, W, 2)``.
        dtypes: Dtype name per acquisition present, e.g. ``{"pre": "float32", ...}``.
    """

    name: str
    has_before: bool
    shape: tuple[int, int, int]
    dtypes: dict[str, str]


@dataclass(frozen=True)
class EventInfo:
    """One event group: an earthquake with its split, magnitude and patches (sorted)."""

    event_id: str
    split: str
    magnitude: float
    patches: tuple[PatchInfo, ...]


def open_h5(path: str | Path) -> h5py.File:
    """Open a QuakeSet file read-only, turning every OS/HDF5 failure into a DataError.

    Args:
        path: HDF5 file.

    Returns:
        The open file.

    Raises:
        DataError: Missing, a directory, unreadable, not HDF5, or truncated.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"{p}: no such file; generate one with 'quakeray data synth {p}' "
            "or fetch the real one with 'quakeray data download'"
        )
    if p.is_dir():
        raise DataError(f"{p}: is a directory, not an HDF5 file; pass the .h5 file itself")
    if not os.access(p, os.R_OK):
        raise DataError(f"{p}: permission denied; make the file readable (chmod +r)")
    try:
        with p.open("rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise DataError(f"{p}: cannot be read ({exc.strerror or exc}); check the file") from None
    try:
        return h5py.File(p, "r")
    except OSError as exc:
        text = str(exc)
        if "truncated" in text:
            what = "is truncated (an incomplete copy or download)"
        elif "signature" in text or head != b"\x89HDF\r\n\x1a\n":
            what = "is not an HDF5 file"
        else:
            what = f"cannot be opened as HDF5 ({text.splitlines()[0] if text else exc!r})"
        raise DataError(f"{p}: {what}; re-create or re-download it") from None


def _text(value: Any) -> str:
    """Attribute value as text (h5py returns str, bytes or 0-d arrays depending on the writer)."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _check_array(path: Path, where: str, obj: Any) -> tuple[tuple[int, int, int], str]:
    if not isinstance(obj, h5py.Dataset):
        raise DataError(f"{path}: {where} is a {type(obj).__name__}, expected an (H, W, 2) array")
    shape = tuple(int(s) for s in obj.shape)
    if len(shape) != 3:
        raise DataError(
            f"{path}: {where} has rank {len(shape)} (shape {shape}), expected rank 3 (H, W, 2); "
            "the file does not follow the QuakeSet layout"
        )
    if shape[2] != 2:
        raise DataError(
            f"{path}: {where} has {shape[2]} channels (shape {shape}), expected 2 (VV, VH) "
            "in the last axis"
        )
    if obj.dtype.kind not in "fiu":
        raise DataError(f"{path}: {where} has dtype {obj.dtype}, expected a numeric (float) array")
    return (shape[0], shape[1], shape[2]), obj.dtype.name


def _read_patch(path: Path, event: str, name: str, group: h5py.Group) -> PatchInfo:
    where = f"group /{event}/{name}"
    shapes: dict[str, tuple[int, int, int]] = {}
    dtypes: dict[str, str] = {}
    for acq in ACQUISITIONS:
        if acq not in group:
            if acq == "before":
                continue
            raise DataError(
                f"{path}: {where} has no '{acq}' array (found {sorted(group.keys())}); "
                "every patch needs 'pre' and 'post'"
            )
        shapes[acq], dtypes[acq] = _check_array(path, f"/{event}/{name}/{acq}", group[acq])
    if len(set(shapes.values())) != 1:
        raise DataError(f"{path}: {where} mixes array shapes {shapes}; all must be equal")
    return PatchInfo(name=name, has_before="before" in shapes, shape=shapes["pre"], dtypes=dtypes)


def read_layout(f: h5py.File, path: str | Path) -> list[EventInfo]:
    """Validate the layout and list the events in torchgeo's order.

    Events come in sorted key order and patches in ``sorted()`` order of their names, as
    ``torchgeo.datasets.QuakeSet`` builds them (lexicographic: ``patch_10`` before
    ``patch_2``). Entries named ``x``/``y`` and any other non-group entry inside an event
    are skipped; top-level non-group entries are skipped too.

    Args:
        f: Open file.
        path: The file's path, for messages.

    Returns:
        Every event of every split, validated.

    Raises:
        DataError: The first layout violation, naming the group and what is wrong.
    """
    p = Path(path)
    events: list[EventInfo] = []
    size: tuple[int, int] | None = None
    first: str = ""
    for key in sorted(f.keys()):
        if f.get(key, getclass=True) is not h5py.Group:
            continue
        group = f[key]
        where = f"group /{key}"
        if "split" not in group.attrs:
            raise DataError(
                f"{p}: {where} has no 'split' attribute; each event group needs "
                f"split = one of {', '.join(FILE_SPLITS)}"
            )
        split = _text(group.attrs["split"])
        if split not in FILE_SPLITS:
            raise DataError(
                f"{p}: {where} has unknown split {split!r}; "
                f"expected one of {', '.join(FILE_SPLITS)}"
            )
        if "magnitude" not in group.attrs:
            raise DataError(f"{p}: {where} has no 'magnitude' attribute; add the event magnitude")
        try:
            magnitude = float(np.asarray(group.attrs["magnitude"]).reshape(-1)[0])
        except (TypeError, ValueError, IndexError):
            magnitude = math.nan
        if not math.isfinite(magnitude):
            raise DataError(
                f"{p}: {where} has magnitude {group.attrs['magnitude']!r}; expected a finite number"
            )
        patches: list[PatchInfo] = []
        for name in sorted(group.keys()):
            if name in NON_PATCH_NAMES or group.get(name, getclass=True) is not h5py.Group:
                continue
            info = _read_patch(p, key, name, group[name])
            hw = (info.shape[0], info.shape[1])
            if size is None:
                size, first = hw, f"/{key}/{name}"
            elif hw != size:
                raise DataError(
                    f"{p}: group /{key}/{name} has {hw[0]}x{hw[1]} px patches but {first} has "
                    f"{size[0]}x{size[1]}; every patch in a file must have the same size"
                )
            patches.append(info)
        events.append(EventInfo(key, split, magnitude, tuple(patches)))
    if not events:
        raise DataError(
            f"{p}: no event groups found; this is not a QuakeSet-format file "
            "(expected /<event_id>/patch_<i>/{pre,post})"
        )
    return events


def image_size(events: list[EventInfo]) -> tuple[int, int]:
    """``(H, W)`` shared by every patch of the file, ``(0, 0)`` when it has no patches."""
    for event in events:
        for patch in event.patches:
            return patch.shape[0], patch.shape[1]
    return 0, 0
