"""Tiles of a scene pair: where they are, what the model says, and the event's estimate.

Tiles have the model's training input size and sit on a regular lattice over the area
both dates cover, ``stride = tile - overlap`` apart; the pixels beyond the last whole tile
(fewer than ``stride``) are left out rather than padded, so every tile is real data, as in
training. A tile is predicted when at least ``min_valid`` of its pixels have data in all
four bands; the others are reported without a magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from quakeray.errors import DataError
from quakeray.metrics import AFFECTED_THRESHOLD
from quakeray.predict.rasters import Grid, ScenePair

__all__ = [
    "EARTH_RADIUS_KM",
    "EventEstimate",
    "Tile",
    "TileLattice",
    "estimate_event",
    "predict_tiles",
    "within",
]

EARTH_RADIUS_KM = 6371.0088  # mean radius (IUGG): haversine distances to the epicentre


@dataclass
class Tile:
    """One window of the scene and its prediction."""

    row: int  # lattice row and column
    col: int
    row_off: int  # pixel offsets of the window on the grid
    col_off: int
    size: int
    valid_fraction: float = 0.0
    magnitude: float | None = None  # None: too little data to predict
    lon: float = math.nan  # centre, EPSG:4326
    lat: float = math.nan
    corners: list[tuple[float, float]] = field(default_factory=list)  # lon/lat ring, closed

    @property
    def affected(self) -> bool | None:
        """The paper's detection rule: a predicted magnitude of at least 1 means affected."""
        return None if self.magnitude is None else self.magnitude >= AFFECTED_THRESHOLD


@dataclass(frozen=True)
class TileLattice:
    """Regular tiles of ``size`` px, ``stride`` apart, over a pixel box of the grid."""

    row0: int
    col0: int
    rows: int
    cols: int
    size: int
    stride: int

    @classmethod
    def over(cls, box: tuple[int, int, int, int], *, size: int, overlap: int) -> TileLattice:
        """The lattice over ``box`` = ``(row0, col0, row1, col1)``.

        Raises:
            DataError: A bad overlap, or an area smaller than one tile.
        """
        if not 0 <= overlap < size:
            raise DataError(f"--overlap must be between 0 and {size - 1} px (the tile is {size})")
        row0, col0, row1, col1 = box
        height, width = row1 - row0, col1 - col0
        if height < size or width < size:
            raise DataError(
                f"the area both images cover is {width} x {height} px, smaller than one "
                f"{size} x {size} tile (the model's input); pass larger images"
            )
        stride = size - overlap
        rows = (height - size) // stride + 1
        cols = (width - size) // stride + 1
        return cls(row0, col0, rows, cols, size, stride)

    def __len__(self) -> int:
        return self.rows * self.cols

    def tiles(self) -> list[Tile]:
        """Every tile, row by row."""
        return [
            Tile(r, c, self.row0 + r * self.stride, self.col0 + c * self.stride, self.size)
            for r in range(self.rows)
            for c in range(self.cols)
        ]

    def cell_transform(self, grid: Grid) -> Any:
        """The affine of a raster with one cell per tile: each tile's central stride block."""
        from affine import Affine

        margin = (self.size - self.stride) / 2
        return (
            grid.transform
            @ Affine.translation(self.col0 + margin, self.row0 + margin)
            @ Affine.scale(self.stride)
        )


def predict_tiles(
    scene: ScenePair,
    tiles: list[Tile],
    model: torch.nn.Module,
    *,
    batch_size: int = 16,
    min_valid: float = 0.5,
    device: str = "cpu",
    progress: Any = None,
) -> None:
    """Fill in each tile's valid fraction and magnitude, ``batch_size`` tiles at a time.

    Memory is one batch of tiles, whatever the scene's size. ``progress`` (a tqdm bar or
    None) is advanced per tile.
    """
    for batch in _batches(scene, tiles, batch_size):
        images, owners = [], []
        for tile, image in batch:
            valid = np.isfinite(image).all(axis=0)
            tile.valid_fraction = float(valid.mean())
            if tile.valid_fraction >= min_valid:  # 0 predicts every tile, as evaluate does
                images.append(image)
                owners.append(tile)
        if images:
            with torch.no_grad():
                x = torch.from_numpy(np.stack(images)).to(device)
                out = model(x).float().reshape(-1).cpu().numpy()
            for tile, value in zip(owners, out, strict=True):
                tile.magnitude = float(value)
        if progress is not None:
            progress.update(len(batch))


def _batches(
    scene: ScenePair, tiles: list[Tile], batch_size: int
) -> Iterator[list[tuple[Tile, np.ndarray]]]:
    from rasterio.windows import Window

    for start in range(0, len(tiles), batch_size):
        part = tiles[start : start + batch_size]
        yield [(t, scene.read(Window(t.col_off, t.row_off, t.size, t.size))) for t in part]


def locate(tiles: list[Tile], grid: Grid) -> None:
    """Each tile's centre and corner ring in EPSG:4326, all tiles in one transform call."""
    from rasterio.warp import transform

    xs: list[float] = []
    ys: list[float] = []
    for t in tiles:
        half = t.size / 2
        for dc, dr in ((half, half), (0, 0), (t.size, 0), (t.size, t.size), (0, t.size)):
            x, y = grid.transform @ (t.col_off + dc, t.row_off + dr)
            xs.append(x)
            ys.append(y)
    lons, lats = transform(grid.crs, "EPSG:4326", xs, ys)
    for i, t in enumerate(tiles):
        points = list(zip(lons[5 * i : 5 * i + 5], lats[5 * i : 5 * i + 5], strict=True))
        t.lon, t.lat = points[0]
        t.corners = [*points[1:], points[1]]


def haversine_km(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    """Great-circle distance in km."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(a))


def within(
    tiles: list[Tile], epicentre: tuple[float, float] | None, radius_km: float
) -> set[int] | None:
    """Indices of the tiles whose centre is within ``radius_km`` of ``epicentre`` (lon, lat).

    None when there is no epicentre: the whole overlap counts.
    """
    if epicentre is None:
        return None
    lon, lat = epicentre
    return {i for i, t in enumerate(tiles) if haversine_km(lon, lat, t.lon, t.lat) <= radius_km}


@dataclass
class EventEstimate:
    """The event-level magnitude and how it was reached."""

    magnitude: float
    detected: bool  # at least one tile in the area is affected
    tiles: int  # predicted tiles in the area
    affected_tiles: int
    p25: float  # spread of the tiles the estimate is the median of
    p75: float
    max: float
    area: str  # "within 20 km of (lon, lat)" or "the whole overlap"
    rule: str

    def format(self) -> str:
        """One line a person reads."""
        verdict = "affected" if self.detected else "no tile affected"
        return (
            f"event magnitude {self.magnitude:.2f} (IQR {self.p25:.2f}-{self.p75:.2f}, "
            f"{verdict}: {self.affected_tiles} of {self.tiles} tiles {self.area})"
        )


AGGREGATION_RULE = (
    "median of the magnitudes of the affected tiles (predicted >= 1.0, the paper's "
    "detection rule) in the area; when no tile there is affected, the median of all its "
    "predicted tiles, and the event is reported as not detected"
)


def estimate_event(
    tiles: list[Tile], *, epicentre: tuple[float, float] | None, radius_km: float
) -> EventEstimate:
    """The event's magnitude from its tiles (rule: :data:`AGGREGATION_RULE`).

    Raises:
        DataError: No predicted tile in the area (all nodata, or the epicentre is elsewhere).
    """
    if not any(t.valid_fraction > 0 for t in tiles):
        raise DataError(
            f"all {len(tiles)} tiles are nodata in at least one band; check that the images "
            "hold data over the same area (and their nodata value)"
        )
    area_tiles = within(tiles, epicentre, radius_km)
    predicted = [
        t
        for i, t in enumerate(tiles)
        if t.magnitude is not None and (area_tiles is None or i in area_tiles)
    ]
    if epicentre is None and not predicted:
        raise DataError(
            f"none of the {len(tiles)} tiles has data in at least --min-valid of its pixels; "
            "lower --min-valid or check the images' nodata and footprint"
        )
    area = "in the whole overlap"
    if epicentre is not None:
        area = f"within {radius_km:g} km of ({epicentre[0]:g}, {epicentre[1]:g})"
        if not predicted:
            raise DataError(
                f"no predicted tile lies {area}; check --epicentre (LON,LAT order) "
                "or widen --radius-km"
            )
    affected = [t for t in predicted if t.affected]
    chosen = affected or predicted
    values = np.array([t.magnitude for t in chosen], dtype=np.float64)
    return EventEstimate(
        magnitude=float(np.median(values)),
        detected=bool(affected),
        tiles=len(predicted),
        affected_tiles=len(affected),
        p25=float(np.percentile(values, 25)),
        p75=float(np.percentile(values, 75)),
        max=float(values.max()),
        area=area,
        rule=AGGREGATION_RULE,
    )
