"""Sentinel-1 GeoTIFFs in, ``(4, h, w)`` linear backscatter windows out, on one grid.

A date is given as one file with a VV and a VH band, or as two one-band files (one per
polarisation). Which band is which comes from the band descriptions (``VV``,
``Sigma0_VH``...), else from a ``vv``/``vh`` token in a one-band file's name (as in
Sentinel-1 SAFE products), else from ``--band-order``; anything else is refused rather
than guessed. The pre image's first band defines the grid; every other band that is on a
different CRS, transform or shape is read through a :class:`rasterio.vrt.WarpedVRT` onto
it, so windows stay windows and no scene is ever read whole. Nodata becomes NaN, exactly
as the gaps in the training data.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from quakeray import storage
from quakeray.errors import DataError

__all__ = [
    "GDAL_CACHE_MB",
    "POLARISATIONS",
    "BandSource",
    "Grid",
    "ScenePair",
    "Units",
    "band_sources",
]

POLARISATIONS = ("VV", "VH")
"""Band order of one date in the model's input: [VV, VH] pre, then [VV, VH] post."""

Units = Literal["auto", "linear", "db"]

_TOKEN = {pol: re.compile(rf"(^|[^a-z0-9]){pol.lower()}([^a-z0-9]|$)") for pol in POLARISATIONS}
_SAMPLE_WINDOWS = 3  # per side: units are guessed from 3 x 3 small windows spread over a band
_SAMPLE_SIDE = 128
GDAL_CACHE_MB = 128
"""GDAL's block cache while a scene is open. Its default, 5% of the machine's memory, filled
with blocks of a large scene made a process's peak memory grow with the scene (1.1 GB at
2,500 px, 2.5 GB at 10,000 px); a tile is read once, so a small cache costs nothing."""


@dataclass(frozen=True)
class BandSource:
    """One polarisation of one date: a band of a file."""

    path: str
    band: int  # 1-based, as rasterio counts


@dataclass(frozen=True)
class Grid:
    """The pixel grid every band is read on: the pre image's."""

    crs: Any  # rasterio.crs.CRS
    transform: Any  # affine.Affine
    width: int
    height: int


def _open(path: str) -> Any:
    import rasterio
    from rasterio.errors import RasterioIOError

    if not storage.is_remote(path) and not storage.local_path(path).is_file():
        raise DataError(f"image {path} not found; check the path")
    try:
        return rasterio.open(path)
    except RasterioIOError as exc:
        reason = str(exc).splitlines()[0]
        raise DataError(
            f"image {path} cannot be read as a raster ({reason}); pass a GeoTIFF"
        ) from None


def _polarisation(text: str | None) -> str | None:
    """VV or VH when ``text`` names exactly one of them (``Sigma0_VV``, ``s1a-iw-grd-vh-...``)."""
    if not text:
        return None
    low = text.lower()
    found = [pol for pol, token in _TOKEN.items() if token.search(low)]
    return found[0] if len(found) == 1 else None


def band_sources(
    paths: Sequence[str], *, date: str, band_order: Sequence[str] | None = None
) -> tuple[BandSource, BandSource]:
    """The VV and VH bands of one date, from one two-band file or two one-band files.

    Args:
        paths: One file with both polarisations, or two one-band files.
        date: ``pre`` or ``post``, for messages.
        band_order: The polarisations of the bands (one file) or of the files (two files),
            in order, when the files do not say: e.g. ``("VV", "VH")``.

    Raises:
        DataError: Missing or unreadable files, one band only, or bands whose polarisation
            cannot be told.
    """
    order = [p.upper() for p in band_order] if band_order else None
    if order is not None and sorted(order) != sorted(POLARISATIONS):
        raise DataError(f"--band-order must name VV and VH once each, got {','.join(order)}")
    if len(paths) == 1:
        return _bands_of_one_file(paths[0], date=date, order=order)
    if len(paths) == 2:
        return _bands_of_two_files(paths, date=date, order=order)
    raise DataError(
        f"--{date} takes one file with VV and VH bands, or two one-band files; got {len(paths)}"
    )


def _bands_of_one_file(
    path: str, *, date: str, order: list[str] | None
) -> tuple[BandSource, BandSource]:
    with _open(path) as src:
        count, descriptions = src.count, src.descriptions
    if count < 2:
        raise DataError(
            f"{date} image {path} has {count} band; pass a file with VV and VH bands, "
            f"or --{date} twice (a VV file and a VH file)"
        )
    named = {_polarisation(d): i + 1 for i, d in enumerate(descriptions)}
    if all(pol in named for pol in POLARISATIONS):
        return BandSource(path, named["VV"]), BandSource(path, named["VH"])
    if order is not None and count == 2:
        return BandSource(path, order.index("VV") + 1), BandSource(path, order.index("VH") + 1)
    shown = ", ".join(d or "-" for d in descriptions)
    raise DataError(
        f"{date} image {path}: cannot tell which band is VV and which VH (band descriptions: "
        f"{shown}); name the bands VV and VH, or pass --band-order VV,VH"
    )


def _bands_of_two_files(
    paths: Sequence[str], *, date: str, order: list[str] | None
) -> tuple[BandSource, BandSource]:
    found: dict[str, str] = {}
    for i, path in enumerate(paths):
        with _open(path) as src:
            count, description = src.count, src.descriptions[0]
        if count != 1:
            raise DataError(
                f"{date} image {path} has {count} bands; with two --{date} files each must "
                "hold one polarisation"
            )
        pol = _polarisation(description) or _polarisation(storage.name(path))
        if pol is None and order is not None:
            pol = order[i]
        if pol is None or pol in found:
            raise DataError(
                f"{date} images {', '.join(paths)}: cannot tell which is VV and which VH; "
                "put vv/vh in the file names or band descriptions, or pass --band-order VV,VH"
            )
        found[pol] = path
    return BandSource(found["VV"], 1), BandSource(found["VH"], 1)


class ScenePair:
    """Both dates' VV and VH bands, read window by window on the pre image's grid.

    Use as a context manager; :meth:`read` returns ``(4, h, w)`` float32 linear
    backscatter [pre VV, pre VH, post VV, post VH] with NaN where there is no data.

    Args:
        pre: VV and VH sources of the pre-event date.
        post: VV and VH sources of the post-event date.
        units: ``linear``, ``db`` (converted to linear here, as the model expects linear
            input) or ``auto`` (dB when most sampled pixels are negative).
        resampling: rasterio resampling name for bands brought onto the grid.
    """

    def __init__(
        self,
        pre: tuple[BandSource, BandSource],
        post: tuple[BandSource, BandSource],
        *,
        units: Units = "auto",
        resampling: str = "bilinear",
    ) -> None:
        self.sources = (*pre, *post)
        self.units = units
        self.resampling = resampling
        self._stack = contextlib.ExitStack()
        self._readers: list[Any] = []
        self.warped: list[bool] = []
        self.db: list[bool] = []
        self.notes: list[str] = []
        self.grid: Grid

    def __enter__(self) -> ScenePair:
        import rasterio

        try:
            self._stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB))
            self._open_all()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _open_all(self) -> None:
        datasets: dict[str, Any] = {}
        for source in self.sources:
            if source.path not in datasets:
                datasets[source.path] = self._stack.enter_context(_open(source.path))
        first = datasets[self.sources[0].path]
        if first.crs is None or first.transform.is_identity:
            raise DataError(
                f"pre image {self.sources[0].path} has no georeferencing (CRS and transform); "
                "pass a terrain-corrected, georeferenced GeoTIFF"
            )
        self.grid = Grid(first.crs, first.transform, first.width, first.height)
        for source in self.sources:
            self._readers.append(self._on_grid(datasets[source.path], source.path))
        for i in (0, 2):  # one decision per date: both polarisations share their units
            db = self._is_db(i)
            self.db += [db, db]

    def _on_grid(self, dataset: Any, path: str) -> Any:
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT

        g = self.grid
        same = (
            dataset.crs == g.crs
            and dataset.transform.almost_equals(g.transform)
            and (dataset.width, dataset.height) == (g.width, g.height)
        )
        self.warped.append(not same)
        if same:
            return dataset
        if dataset.crs is None:
            raise DataError(
                f"image {path} has no CRS, so it cannot be brought onto the pre image's grid; "
                "pass a georeferenced GeoTIFF"
            )
        return self._stack.enter_context(
            WarpedVRT(
                dataset,
                crs=g.crs,
                transform=g.transform,
                width=g.width,
                height=g.height,
                resampling=Resampling[self.resampling],
                nodata=math.nan,
                dtype="float32",
            )
        )

    def _is_db(self, index: int) -> bool:
        """Whether the date of band ``index`` is in dB: declared, or read from its values."""
        if self.units != "auto":
            return self.units == "db"
        sample = self._sample(index)
        if sample.size == 0:
            return False
        negative = float(np.mean(sample < 0))
        if negative > 0.5:
            date = "pre" if index < 2 else "post"
            self.notes.append(
                f"{date} image {self.sources[index].path} looks like dB ({negative:.0%} of "
                f"sampled pixels negative, median {np.median(sample):.1f}); converted to "
                "linear (pass --units linear to override)"
            )
            return True
        return False

    def _sample(self, index: int) -> np.ndarray:
        from rasterio.windows import Window

        g = self.grid
        side = min(_SAMPLE_SIDE, g.width, g.height)
        values = []
        for r in np.linspace(0, g.height - side, _SAMPLE_WINDOWS).astype(int):
            for c in np.linspace(0, g.width - side, _SAMPLE_WINDOWS).astype(int):
                x = self._read_band(index, Window(int(c), int(r), side, side))
                values.append(x[np.isfinite(x)])
        return np.concatenate(values)

    def _read_band(self, index: int, window: Any) -> np.ndarray:
        reader = self._readers[index]  # a warped reader keeps its source's bands
        data = reader.read(
            self.sources[index].band, window=window, masked=True, out_dtype="float32"
        )
        return np.ma.filled(data.astype(np.float32), np.nan)

    def read(self, window: Any) -> np.ndarray:
        """``(4, h, w)`` float32 linear backscatter of ``window`` (a rasterio Window)."""
        out = np.empty((4, int(window.height), int(window.width)), dtype=np.float32)
        for i in range(4):
            x = self._read_band(i, window)
            if self.db[i]:
                np.power(10.0, x / 10.0, out=x)
            out[i] = x
        return out

    def overlap(self) -> tuple[int, int, int, int]:
        """The pixel box ``(row0, col0, row1, col1)`` of the grid that both dates cover.

        Raises:
            DataError: The dates do not overlap.
        """
        from rasterio.warp import transform_bounds

        g = self.grid
        left, top = g.transform @ (0, 0)
        right, bottom = g.transform @ (g.width, g.height)
        box = [min(left, right), min(top, bottom), max(left, right), max(top, bottom)]
        for reader, warped, source in zip(self._readers, self.warped, self.sources, strict=True):
            if not warped:
                continue
            b = transform_bounds(reader.src_dataset.crs, g.crs, *reader.src_dataset.bounds)
            box = [max(box[0], b[0]), max(box[1], b[1]), min(box[2], b[2]), min(box[3], b[3])]
            if box[0] >= box[2] or box[1] >= box[3]:
                raise DataError(
                    f"images {self.sources[0].path} and {source.path} do not overlap; "
                    "pass a pre and a post image of the same area"
                )
        inverse = ~g.transform
        cols, rows = zip(*(inverse @ (x, y) for x in box[0::2] for y in box[1::2]), strict=True)
        # Whole pixels inside the shared area only (a hair of tolerance for float bounds).
        col0, row0 = (max(0, math.ceil(min(v) - 1e-6)) for v in (cols, rows))
        col1 = min(g.width, math.floor(max(cols) + 1e-6))
        row1 = min(g.height, math.floor(max(rows) + 1e-6))
        if col0 >= col1 or row0 >= row1:
            raise DataError(
                f"the pre and post images ({self.sources[0].path}, {self.sources[2].path}) "
                "do not overlap; pass a pre and a post image of the same area"
            )
        return row0, col0, row1, col1
