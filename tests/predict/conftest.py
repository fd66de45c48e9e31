"""A trained checkpoint (with its logged model) and GeoTIFF scenes cut from its data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quakeray.config import load_config
from quakeray.data.scenes import SceneWritten, write_scene
from quakeray.train import TrainSummary, run_training


@pytest.fixture(scope="package")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_h5: Path) -> TrainSummary:
    """Two local-mode epochs of test_resnet on the 32 px file; the model is logged."""
    root = tmp_path_factory.mktemp("predict")
    cfg = load_config(
        None,
        [
            f"data.path={tiny_h5}",
            f"run.storage_path={root / 'ray_results'}",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            "scaling.num_workers=0",
            "optim.epochs=2",
            "optim.batch_size=8",
            "tracking.log_model=true",
            "run.name=predict",
        ],
    )
    return run_training(cfg)


@pytest.fixture(scope="package")
def test_scene(tmp_path_factory: pytest.TempPathFactory, tiny_h5: Path) -> SceneWritten:
    """Every test-split patch of the file laid out in one pre/post GeoTIFF pair."""
    return write_scene(tiny_h5, tmp_path_factory.mktemp("scene"), event="all", split="test")


def write_tif(
    path: Path,
    data: np.ndarray,
    *,
    transform: object,
    crs: str = "EPSG:32633",
    descriptions: tuple[str | None, ...] | None = ("VV", "VH"),
    nodata: float | None = float("nan"),
) -> Path:
    """A float32 GeoTIFF of ``data`` (bands, rows, cols)."""
    import rasterio

    profile = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": "float32",
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data.astype(np.float32))
        if descriptions:
            dst.descriptions = descriptions
    return path


def read_tif(path: Path) -> tuple[np.ndarray, object, object]:
    """Bands, transform and CRS of a GeoTIFF."""
    import rasterio

    with rasterio.open(path) as src:
        return src.read(), src.transform, src.crs
