"""GeoTIFF scenes from a QuakeSet-format file: a real-looking input for ``quakeray predict``.

:func:`write_scene` lays the patches of one event side by side, row by row in the order
the dataset reads them, into a ``pre.tif`` and a ``post.tif`` (two float32 bands ``VV`` and
``VH``, linear backscatter, NaN as nodata) on a real projected grid (UTM zone 33N, 10 m
pixels: Sentinel-1 GRD's spacing). ``scene.json`` names the patch under each tile window
and the centre in lon/lat. A model trained on the file then predicts for each tile what
``quakeray evaluate`` predicts for that patch: the round trip the predict tests check.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from quakeray.data.layout import open_h5, read_layout
from quakeray.errors import DataError

__all__ = ["PIXEL_M", "SCENE_CRS", "ScenePatch", "SceneWritten", "write_scene"]

SCENE_CRS = "EPSG:32633"  # WGS 84 / UTM zone 33N
PIXEL_M = 10.0  # Sentinel-1 GRD (IW, high resolution) pixel spacing
ORIGIN = (500_000.0, 4_650_000.0)  # upper-left corner, easting/northing: central Italy
_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}


@dataclass
class ScenePatch:
    """Where one patch lies in the scene."""

    event_id: str
    patch: str
    magnitude: float
    row_off: int
    col_off: int
    size: int


@dataclass
class SceneWritten:
    """The files of a written scene and what is in them."""

    pre: Path
    post: Path
    event_id: str  # the event, or "all" for every event of the split
    magnitude: float  # the event's; NaN for "all"
    split: str
    centre: tuple[float, float]  # lon, lat
    patches: list[ScenePatch]

    def format(self) -> str:
        """What was written, and the command to run next."""
        lon, lat = self.centre
        what = f"every event of the {self.split} split"
        if self.event_id != "all":
            what = f"event {self.event_id} (M{self.magnitude:.1f}, {self.split} split)"
        return (
            f"wrote {self.pre} and {self.post}: {what}, {len(self.patches)} patches, "
            f"centre {lon:.5f},{lat:.5f}\n"
            f"next: quakeray predict --model MODEL --pre {self.pre} --post {self.post} "
            f"--epicentre {lon:.5f},{lat:.5f}"
        )


def write_scene(
    h5_path: Path, out_dir: Path, *, event: str | None = None, split: str = "test"
) -> SceneWritten:
    """Write ``pre.tif``, ``post.tif`` and ``scene.json`` for one event of ``h5_path``.

    Args:
        h5_path: A QuakeSet-format file.
        out_dir: Folder for the three files (created).
        event: Event id; default the first event of ``split``; ``"all"`` lays out every
            event of ``split`` in one scene (a test card for a model, not a real scene).
        split: ``train``, ``val`` or ``test``, where the default event is taken from.

    Raises:
        DataError: Unknown event or split.
    """
    if split not in _SPLIT_NAMES:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(_SPLIT_NAMES)}")
    with open_h5(h5_path) as f:
        events = read_layout(f, h5_path)
        in_split = [e for e in events if e.split == _SPLIT_NAMES[split]]
        chosen = in_split if event == "all" else [e for e in events if e.event_id == event]
        chosen = chosen if event else in_split[:1]
        if not chosen:
            what = f"event {event!r}" if event and event != "all" else f"event in the {split} split"
            raise DataError(f"{h5_path} has no {what}; see 'quakeray data inspect {h5_path}'")
        cells = [(e, p) for e in chosen for p in e.patches]
        size = cells[0][1].shape[0]
        cols = math.ceil(math.sqrt(len(cells)))
        rows = math.ceil(len(cells) / cols)
        images = {
            d: np.full((2, rows * size, cols * size), np.nan, np.float32) for d in ("pre", "post")
        }
        placed = []
        for i, (info, patch) in enumerate(cells):
            r, c = divmod(i, cols)
            for date, image in images.items():
                data = f[f"/{info.event_id}/{patch.name}/{date}"][()]
                block = image[:, r * size : (r + 1) * size, c * size : (c + 1) * size]
                block[...] = data.transpose(2, 0, 1)
            placed.append(
                ScenePatch(info.event_id, patch.name, info.magnitude, r * size, c * size, size)
            )
    one = len(chosen) == 1
    written = SceneWritten(
        out_dir / "pre.tif",
        out_dir / "post.tif",
        chosen[0].event_id if one else "all",
        chosen[0].magnitude if one else math.nan,
        split,
        (0.0, 0.0),
        placed,
    )
    written.centre = _write_geotiffs(images, written)
    record = asdict(written) | {"pre": str(written.pre), "post": str(written.post)}
    (out_dir / "scene.json").write_text(json.dumps(record | {"source": str(h5_path)}, indent=2))
    return written


def _write_geotiffs(images: dict[str, np.ndarray], written: SceneWritten) -> tuple[float, float]:
    """Both dates as two-band GeoTIFFs; returns the scene's centre in lon/lat."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.warp import transform

    written.pre.parent.mkdir(parents=True, exist_ok=True)
    grid = from_origin(*ORIGIN, PIXEL_M, PIXEL_M)
    for date, image in images.items():
        height, width = image.shape[1:]
        profile = {
            "driver": "GTiff",
            "width": width,
            "height": height,
            "count": 2,
            "dtype": "float32",
            "crs": SCENE_CRS,
            "transform": grid,
            "nodata": float("nan"),
        }
        if min(height, width) >= 256:  # tiled, as large scenes are delivered
            profile |= {"tiled": True, "blockxsize": 256, "blockysize": 256}
        with rasterio.open(getattr(written, date), "w", **profile) as dst:
            dst.write(image)
            dst.descriptions = ("VV", "VH")
    cx, cy = grid @ (images["pre"].shape[2] / 2, images["pre"].shape[1] / 2)
    lons, lats = transform(SCENE_CRS, "EPSG:4326", [cx], [cy])
    return float(lons[0]), float(lats[0])
