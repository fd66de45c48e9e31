"""The QuakeSet dataset: samples in torchgeo's order, read lazily from one HDF5 handle.

Samples per split, exactly as ``torchgeo.datasets.QuakeSet`` builds them: for each event of
the split (sorted keys), for each patch (sorted names):

- a positive ``(pre, post)`` with ``label = 1`` and the event's magnitude;
- a hard negative ``(before, pre)`` with ``label = 0`` and ``magnitude = 0`` when ``before``
  exists (dropped with ``positives_only=True``).

Images are returned raw (linear backscatter, NaN kept): NaN filling, dB and normalisation
run batched in :class:`quakeray.data.transforms.BatchTransform`, on the GPU when there is
one. Reading is built for throughput: one lazily opened handle per process (re-opened after
a fork, so DataLoader and Ray workers are safe), cached dataset objects, ``read_direct``
into a preallocated per-process buffer, and a batched ``__getitems__`` that fills one batch
tensor which :func:`collate` hands on without another copy. The ``raw`` layout goes one
step further: each array is read with ``read_direct`` straight into its place in the batch,
in the file's ``(H, W, 2)`` order, and the transposition is left to the transform's first
pass (``transform(image, layout="raw")``), which touches every value anyway.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from quakeray.data.layout import image_size, open_h5, read_layout
from quakeray.errors import DataError

__all__ = ["SPLITS", "BufferPool", "Layout", "QuakeSetDataset", "SampleList", "Split", "collate"]

SPLITS: dict[str, str] = {"train": "train", "val": "validation", "test": "test"}
"""Our split names -> the names stored in the file's ``split`` attributes."""

Split = Literal["train", "val", "test"]
Layout = Literal["stacked", "temporal", "raw"]


class SampleList(list[dict[str, Any]]):
    """The samples of one ``__getitems__`` call, with the batch already assembled.

    It is a plain list of sample dicts (``default_collate`` works on it and copies); its
    :attr:`batch` is the same data collated, which :func:`collate` returns without a copy.
    """

    batch: dict[str, Any]


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader ``collate_fn``: zero-copy for :class:`QuakeSetDataset` batches.

    Returns the batch :meth:`QuakeSetDataset.__getitems__` already built (image
    ``(B, 4, H, W)`` or ``(B, 2, 2, H, W)``, ``label`` int64 ``(B,)``, ``magnitude`` float32
    ``(B,)``, ``event_id`` and ``patch`` lists of str; image ``(B, 2, H, W, 2)`` in the
    ``raw`` layout); anything else goes to
    ``default_collate``, which gives the same structure.
    """
    if isinstance(samples, SampleList):
        return samples.batch
    return dict(default_collate(list(samples)))  # type: ignore[no-untyped-call]


class QuakeSetDataset(Dataset[dict[str, Any]]):
    """One split of a QuakeSet-format HDF5 file.

    Args:
        path: The HDF5 file.
        split: ``train``, ``val`` or ``test`` (file names ``train``/``validation``/``test``).
        positives_only: Drop the ``(before, pre)`` negatives.
        layout: ``stacked`` gives images ``(4, H, W)`` = [t0 VV, t0 VH, t1 VV, t1 VH];
            ``temporal`` gives ``(2, 2, H, W)`` = time x polarisation; ``raw`` gives
            ``(2, H, W, 2)`` = time x H x W x polarisation, as stored, read without a
            transposition (the fastest; pass ``layout="raw"`` to
            :class:`~quakeray.data.transforms.BatchTransform`, which returns ``(B, 4, H, W)``).
        events: Keep only these event ids of the split (a subsample, see
            :mod:`quakeray.data.subsample`); None keeps every event.

    Attributes:
        magnitudes: float32 magnitude per sample (0 for negatives), known without reading pixels.
        labels: int64 label per sample (1 positive, 0 negative).
        event_ids: Event id per sample.
        patches: Patch name per sample.
        image_size: ``(H, W)`` of every patch.

    Raises:
        DataError: Unknown split, or a file that is missing, unreadable or malformed.
    """

    def __init__(
        self,
        path: str | Path,
        split: Split = "train",
        *,
        positives_only: bool = False,
        layout: Layout = "stacked",
        events: Collection[str] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r} for {path}; use one of {', '.join(SPLITS)}")
        if layout not in ("stacked", "temporal", "raw"):
            raise DataError(f"unknown image layout {layout!r}; use 'stacked', 'temporal' or 'raw'")
        self.path = Path(path).resolve()
        self.split: Split = split
        self.positives_only = positives_only
        self.layout: Layout = layout
        with open_h5(self.path) as f:
            file_events = read_layout(f, self.path)
        self.image_size: tuple[int, int] = image_size(file_events)

        # The index, built once: two dataset paths per sample, and the metadata as arrays.
        sources: list[tuple[str, str]] = []
        magnitudes: list[float] = []
        labels: list[int] = []
        self.event_ids: list[str] = []
        self.patches: list[str] = []
        keep = None if events is None else set(events)
        for event in file_events:
            if event.split != SPLITS[split] or (keep is not None and event.event_id not in keep):
                continue
            for patch in event.patches:
                base = f"/{event.event_id}/{patch.name}/"
                pairs = [(("pre", "post"), 1, event.magnitude)]
                if patch.has_before and not positives_only:
                    pairs.append((("before", "pre"), 0, 0.0))
                for (first, second), label, magnitude in pairs:
                    sources.append((base + first, base + second))
                    labels.append(label)
                    magnitudes.append(magnitude)
                    self.event_ids.append(event.event_id)
                    self.patches.append(patch.name)
        self._sources = sources
        self.magnitudes: np.ndarray = np.asarray(magnitudes, dtype=np.float32)
        self.labels: np.ndarray = np.asarray(labels, dtype=np.int64)
        self._reset_handle()

    # ------------------------------------------------------------------ process-local state

    def _reset_handle(self) -> None:
        self._h5: h5py.File | None = None
        self._pid: int = -1
        self._datasets: dict[str, h5py.Dataset] = {}
        self._buffer: np.ndarray | None = None
        self._pool = BufferPool()

    @property
    def is_open(self) -> bool:
        """Whether this process holds an open handle (one inherited through fork() is not)."""
        return self._h5 is not None and self._pid == os.getpid()

    def _dataset(self, name: str) -> h5py.Dataset:
        """The h5py dataset ``name``, through this process's own lazily opened handle."""
        handle = self._h5 if self.is_open else None
        if handle is None:
            # A handle inherited through fork() is not safe to use: open our own. The
            # inherited object is dropped, not closed, so the parent's handle is untouched.
            self._datasets = {}
            self._buffer = None
            handle = self._h5 = open_h5(self.path)
            self._pid = os.getpid()
        ds = self._datasets.get(name)
        if ds is None:
            ds = handle[name]
            self._datasets[name] = ds
        return ds

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_h5", "_datasets", "_buffer", "_pool"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_handle()

    def close(self) -> None:
        """Close this process's handle (it re-opens on the next read)."""
        if self._h5 is not None and self.is_open:
            self._h5.close()
        self._reset_handle()

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self._sources)

    def _image_shape(self) -> tuple[int, ...]:
        h, w = self.image_size
        shapes = {"stacked": (4, h, w), "temporal": (2, 2, h, w), "raw": (2, h, w, 2)}
        return shapes[self.layout]

    def _read_shape(self) -> tuple[int, ...]:
        """One sample as :meth:`_read_into` takes it: ``(2, H, W, 2)`` raw, else ``(4, H, W)``."""
        h, w = self.image_size
        return (2, h, w, 2) if self.layout == "raw" else (4, h, w)

    def _read_into(self, i: int, out: np.ndarray) -> None:
        """Read sample ``i``'s two acquisitions into ``out``.

        ``out`` is ``(2, H, W, 2)`` (the raw layout: each array lands in place, as stored)
        or ``(4, H, W)`` (each array goes through a cache-hot buffer, then HWC -> CHW).
        """
        h, w = self.image_size
        raw = out.ndim == 4
        if self._buffer is None or self._buffer.shape != (h, w, 2):
            self._buffer = np.empty((h, w, 2), dtype=np.float32)
        buf = self._buffer  # (opening the handle below resets the attribute, not this array)
        for t, name in enumerate(self._sources[i]):
            dest = out[t] if raw else buf
            try:
                self._dataset(name).read_direct(dest)
            except (OSError, KeyError, RuntimeError) as exc:
                raise DataError(
                    f"{self.path}: cannot read {name} ({exc}); the file may be damaged, "
                    "check it with 'quakeray data inspect'"
                ) from None
            if not raw:
                # HWC -> CHW from a cache-hot buffer: much cheaper than strided HDF5 selections.
                np.copyto(out[2 * t : 2 * t + 2], dest.transpose(2, 0, 1))

    def _check_index(self, i: int) -> int:
        n = len(self._sources)
        j = int(i)
        if j < 0:
            j += n
        if not 0 <= j < n:
            raise IndexError(f"index {i} out of range for {n} samples ({self.split} split)")
        return j

    def _sample(self, j: int, image: torch.Tensor) -> dict[str, Any]:
        return {
            "image": image,
            "label": torch.tensor(self.labels[j]),
            "magnitude": torch.tensor(self.magnitudes[j]),
            "event_id": self.event_ids[j],
            "patch": self.patches[j],
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        """One sample: raw image, label, magnitude, event id and patch name."""
        j = self._check_index(i)
        image = torch.empty(self._image_shape(), dtype=torch.float32)
        self._read_into(j, image.numpy().reshape(self._read_shape()))
        return self._sample(j, image)

    def __getitems__(self, indices: Sequence[int]) -> SampleList:
        """A batch of samples read into one tensor (the DataLoader's batched fetch).

        The images of the returned samples are views of one ``(B, ...)`` tensor; in a
        DataLoader worker it lives in shared memory, so it reaches the main process
        without a copy, as ``default_collate`` would arrange; in the main process its memory
        is recycled from earlier batches nobody refers to any more (:class:`BufferPool`).
        """
        js = [self._check_index(i) for i in indices]
        shape = (len(js), *self._image_shape())
        if torch.utils.data.get_worker_info() is not None:
            batch = _shared_batch(shape)
        else:
            batch = torch.from_numpy(self._pool.get(shape))
        flat = batch.numpy().reshape(len(js), *self._read_shape())
        for b, j in enumerate(js):
            self._read_into(j, flat[b])
        samples = SampleList(self._sample(j, batch[b]) for b, j in enumerate(js))
        samples.batch = {
            "image": batch,
            "label": torch.from_numpy(self.labels[js]),
            "magnitude": torch.from_numpy(self.magnitudes[js]),
            "event_id": [self.event_ids[j] for j in js],
            "patch": [self.patches[j] for j in js],
        }
        return samples

    def __repr__(self) -> str:
        h, w = self.image_size
        return (
            f"QuakeSetDataset({str(self.path)!r}, split={self.split!r}, samples={len(self)}, "
            f"positives={int(self.labels.sum())}, size={h}x{w}, layout={self.layout!r})"
        )


def _shared_batch(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor in shared memory (inside DataLoader workers)."""
    numel = int(np.prod(shape))
    # The same private-but-stable path default_collate uses to avoid a copy on send.
    storage = torch.empty(0)._typed_storage()._new_shared(numel, device="cpu")  # type: ignore[no-untyped-call]
    return torch.empty(0).new(storage).resize_(*shape)


class BufferPool:
    """Recycles big CPU buffers once nothing refers to them any more.

    A fresh 64 MB batch costs thousands of page faults (the allocator maps big blocks
    anew every time), which on a small VM took longer than reading the data. A tensor made
    with ``torch.from_numpy`` holds a reference to its array until the last tensor sharing
    that memory (views included) is freed, so an array whose only reference is this pool
    is provably unused and can be refilled.
    """

    def __init__(self, keep: int = 3) -> None:
        self._keep = keep
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 array of ``shape`` that no tensor uses."""
        with self._lock:  # two threads must never be handed the same free array
            for arr in self._arrays:
                # References: the list, ``arr`` and getrefcount's argument. More = in use.
                # (No enumerate() here: it would hold one more reference to ``arr``.)
                if arr.shape == shape and sys.getrefcount(arr) <= 3:
                    return arr
            fresh = np.empty(shape, dtype=np.float32)
            keep = self._arrays[-(self._keep - 1) :] if self._keep > 1 else []
            self._arrays = [*keep, fresh]
            return fresh

    def __getstate__(self) -> dict[str, Any]:
        return {"_keep": self._keep}  # a copy starts empty: buffers are process-local

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_keep"])  # type: ignore[misc]
