"""One event: a pre and a post image in, tiles, a magnitude raster and an estimate out."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quakeray.predict.model import Predictor
from quakeray.predict.outputs import (
    EVENT_FILE,
    RASTER_FILE,
    TILES_FILE,
    folder_written_whole,
    write_event,
    write_raster,
    write_tiles,
)
from quakeray.predict.rasters import ScenePair, Units, band_sources
from quakeray.predict.tiles import (
    EventEstimate,
    TileLattice,
    estimate_event,
    locate,
    predict_tiles,
    within,
)

__all__ = ["PairResult", "PredictOptions", "predict_pair"]


@dataclass
class PredictOptions:
    """How a scene pair is cut, read and summarised (the ``quakeray predict`` options)."""

    overlap: int = 0  # px shared by neighbouring tiles
    units: Units = "auto"  # linear | db | auto (dB when most sampled pixels are negative)
    band_order: tuple[str, ...] | None = None  # polarisations when the files do not say
    resampling: str = "bilinear"  # for a post image brought onto the pre image's grid
    batch_size: int = 16  # tiles per forward pass
    min_valid: float = 0.5  # share of pixels with data a tile needs to be predicted
    epicentre: tuple[float, float] | None = None  # (lon, lat): estimate from tiles near it
    radius_km: float = 20.0
    device: str = "cpu"
    progress: bool = True  # a progress bar over the tiles


@dataclass
class PairResult:
    """What one event's prediction produced."""

    out: Path
    estimate: EventEstimate
    tiles: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        """Lines a person reads: notes, the estimate, where the files are."""
        lines = [f"note: {n}" for n in self.notes]
        lines.append(self.estimate.format())
        lines.append(
            f"{self.tiles} tiles in {self.seconds:.1f} s; wrote {self.out}/"
            f"{{{TILES_FILE},{RASTER_FILE},{EVENT_FILE}}}"
        )
        return "\n".join(lines)


def predict_pair(
    predictor: Predictor,
    pre: Sequence[str],
    post: Sequence[str],
    out: Path,
    options: PredictOptions | None = None,
    *,
    overwrite: bool = False,
) -> PairResult:
    """Predict every tile of a scene pair and write the outputs to ``out`` (whole or not at all).

    Args:
        predictor: The model (see :func:`~quakeray.predict.model.load_predictor`).
        pre: The pre-event image: one VV+VH file, or a VV and a VH file.
        post: The post-event image, likewise; brought onto the pre image's grid if needed.
        out: Output folder.
        options: Tiling, units and estimate settings.
        overwrite: Replace a non-empty ``out``.

    Raises:
        DataError: Unreadable or unusable images, no overlap, nothing but nodata.
    """
    from tqdm.auto import tqdm

    opts = options or PredictOptions()
    start = time.perf_counter()
    pre_bands = band_sources(pre, date="pre", band_order=opts.band_order)
    post_bands = band_sources(post, date="post", band_order=opts.band_order)
    with (
        ScenePair(pre_bands, post_bands, units=opts.units, resampling=opts.resampling) as scene,
        folder_written_whole(out, overwrite=overwrite) as tmp,
    ):
        lattice = TileLattice.over(scene.overlap(), size=predictor.tile_size, overlap=opts.overlap)
        tiles = lattice.tiles()
        module = predictor.module.to(opts.device).eval()
        with tqdm(
            total=len(tiles),
            desc="tiles",
            unit="tile",
            disable=None if opts.progress else True,  # None: only on a terminal
            leave=False,
        ) as bar:
            predict_tiles(
                scene,
                tiles,
                module,
                batch_size=opts.batch_size,
                min_valid=opts.min_valid,
                device=opts.device,
                progress=bar,
            )
        locate(tiles, scene.grid)
        estimate = estimate_event(tiles, epicentre=opts.epicentre, radius_km=opts.radius_km)
        in_area = within(tiles, opts.epicentre, opts.radius_km)
        write_tiles(tmp / TILES_FILE, tiles, in_area=in_area)
        write_raster(tmp / RASTER_FILE, tiles, lattice, scene.grid)
        record = _record(predictor, pre, post, scene, lattice, estimate, opts)
        write_event(tmp / EVENT_FILE, record)
    return PairResult(out, estimate, len(tiles), time.perf_counter() - start, list(scene.notes))


def _record(
    predictor: Predictor,
    pre: Sequence[str],
    post: Sequence[str],
    scene: ScenePair,
    lattice: TileLattice,
    estimate: EventEstimate,
    opts: PredictOptions,
) -> dict[str, Any]:
    return {
        "magnitude": estimate.magnitude,
        "detected": estimate.detected,
        "estimate": asdict(estimate),
        "model": {"source": predictor.source, "backbone": predictor.backbone},
        "inputs": {
            "pre": list(pre),
            "post": list(post),
            "crs": str(scene.grid.crs),
            "post_warped_to_pre_grid": any(scene.warped[2:]),
            "db_converted": {"pre": scene.db[0], "post": scene.db[2]},
            "notes": scene.notes,
        },
        "tiling": {
            "tile_size": lattice.size,
            "overlap": opts.overlap,
            "rows": lattice.rows,
            "cols": lattice.cols,
            "min_valid": opts.min_valid,
        },
        "epicentre": list(opts.epicentre) if opts.epicentre else None,
        "radius_km": opts.radius_km if opts.epicentre else None,
    }
