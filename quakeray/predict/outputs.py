"""What a prediction leaves behind, written whole or not at all.

An output folder holds

- ``tiles.geojson``: one polygon per tile in EPSG:4326 with its magnitude (null when the
  tile had too little data), whether it looks affected, its share of valid pixels and
  whether it counts towards the event estimate;
- ``magnitude.tif``: one cell per tile (its central ``stride x stride`` block) in the
  input's CRS, float32, NaN where no magnitude;
- ``event.json``: the event-level estimate, its rule, the inputs and the model.

Everything is written into a hidden folder beside the target and renamed into place at
the end: a failure leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from quakeray.errors import DataError
from quakeray.predict.rasters import Grid
from quakeray.predict.tiles import Tile, TileLattice

__all__ = [
    "EVENT_FILE",
    "RASTER_FILE",
    "TILES_FILE",
    "folder_written_whole",
    "write_event",
    "write_raster",
    "write_tiles",
]

TILES_FILE = "tiles.geojson"
RASTER_FILE = "magnitude.tif"
EVENT_FILE = "event.json"


@contextmanager
def folder_written_whole(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder to fill; it becomes ``out`` when the block ends without error.

    Raises:
        DataError: ``out`` exists and is not empty, and ``overwrite`` is off.
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} is a file; pass a folder with --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"output folder {out} is not empty; choose another --out or --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise


def write_tiles(path: Path, tiles: list[Tile], *, in_area: set[int] | None = None) -> None:
    """GeoJSON FeatureCollection of the tiles (RFC 7946: lon/lat, EPSG:4326)."""
    features = []
    for i, t in enumerate(tiles):
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in t.corners]]},
                "properties": {
                    "row": t.row,
                    "col": t.col,
                    "window": [t.col_off, t.row_off, t.size, t.size],
                    "magnitude": None if t.magnitude is None else round(t.magnitude, 6),
                    "affected": t.affected,
                    "valid_fraction": round(t.valid_fraction, 4),
                    "in_area": in_area is None or i in in_area,
                },
            }
        )
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}) + "\n")


def write_raster(path: Path, tiles: list[Tile], lattice: TileLattice, grid: Grid) -> None:
    """Tile-resolution GeoTIFF of magnitudes on the input's CRS."""
    import rasterio

    values = np.full((lattice.rows, lattice.cols), np.nan, dtype=np.float32)
    for t in tiles:
        if t.magnitude is not None:
            values[t.row, t.col] = t.magnitude
    profile = {
        "driver": "GTiff",
        "width": lattice.cols,
        "height": lattice.rows,
        "count": 1,
        "dtype": "float32",
        "crs": grid.crs,
        "transform": lattice.cell_transform(grid),
        "nodata": float("nan"),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(values, 1)
        dst.set_band_description(1, "magnitude")
        dst.update_tags(
            tile_size=lattice.size, stride=lattice.stride, units="moment magnitude (model)"
        )


def write_event(path: Path, record: Mapping[str, Any]) -> None:
    """The event's estimate and provenance as JSON."""
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
