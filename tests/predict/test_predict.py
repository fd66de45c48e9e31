"""``quakeray predict`` on one GeoTIFF pair: the same numbers as ``quakeray evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from quakeray.cli import main
from quakeray.data.scenes import SceneWritten
from quakeray.evaluate import evaluate_checkpoint
from quakeray.metrics import AFFECTED_THRESHOLD
from quakeray.predict.model import load_predictor
from quakeray.predict.pair import PredictOptions, predict_pair
from quakeray.train import TrainSummary
from tests.predict.conftest import read_tif, write_tif

EXACT = PredictOptions(min_valid=0.0, progress=False)  # every tile, as evaluate does


def evaluated(trained: TrainSummary) -> dict[tuple[str, str], float]:
    """``quakeray evaluate``'s prediction per (event, patch) of the positive test samples."""
    assert trained.best_checkpoint is not None
    result = evaluate_checkpoint(trained.best_checkpoint, split="test")
    p = result.predictions
    return {
        (e, patch): pred
        for e, patch, label, pred in zip(p.event_id, p.patch, p.label, p.prediction, strict=True)
        if label == 1
    }


def tile_magnitudes(out: Path) -> dict[tuple[int, int], float | None]:
    """(row_off, col_off) -> magnitude, from the written GeoJSON."""
    features = json.loads((out / "tiles.geojson").read_text())["features"]
    return {
        (f["properties"]["window"][1], f["properties"]["window"][0]): f["properties"]["magnitude"]
        for f in features
    }


def assert_equals_evaluate(
    out: Path, scene: SceneWritten, expected: dict[tuple[str, str], float]
) -> None:
    tiles = tile_magnitudes(out)
    assert len(scene.patches) == len(expected)
    for patch in scene.patches:
        got = tiles[(patch.row_off, patch.col_off)]
        assert got is not None
        assert got == pytest.approx(expected[(patch.event_id, patch.patch)], abs=1e-5)


def test_tiles_predict_what_evaluate_predicts(
    trained: TrainSummary, test_scene: SceneWritten, tmp_path: Path
) -> None:
    predictor = load_predictor(str(trained.best_checkpoint))
    assert predictor.tile_size == 32
    out = tmp_path / "out"
    result = predict_pair(predictor, [str(test_scene.pre)], [str(test_scene.post)], out, EXACT)
    assert_equals_evaluate(out, test_scene, evaluated(trained))
    assert sorted(p.name for p in out.iterdir()) == ["event.json", "magnitude.tif", "tiles.geojson"]
    # The raster: one cell per tile, on the input's CRS, the same values.
    raster, transform, crs = read_tif(out / "magnitude.tif")
    _, scene_transform, scene_crs = read_tif(test_scene.pre)
    assert crs == scene_crs and transform == scene_transform @ Affine.scale(32)
    tiles = tile_magnitudes(out)
    for (row, col), value in tiles.items():
        cell = raster[0, row // 32, col // 32]
        assert (np.isnan(cell) and value is None) or cell == pytest.approx(value, abs=1e-6)
    # The event estimate follows the documented rule.
    values = [v for v in tiles.values() if v is not None]
    affected = [v for v in values if v >= AFFECTED_THRESHOLD]
    assert result.estimate.magnitude == pytest.approx(float(np.median(affected or values)))
    event = json.loads((out / "event.json").read_text())
    assert event["magnitude"] == pytest.approx(result.estimate.magnitude)
    assert event["detected"] == bool(affected)
    assert event["inputs"]["post_warped_to_pre_grid"] is False


def test_geojson_is_lon_lat_and_marks_affected_tiles(
    trained: TrainSummary, test_scene: SceneWritten, tmp_path: Path
) -> None:
    predictor = load_predictor(str(trained.best_checkpoint))
    out = tmp_path / "out"
    predict_pair(predictor, [str(test_scene.pre)], [str(test_scene.post)], out, EXACT)
    collection = json.loads((out / "tiles.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    lon, lat = test_scene.centre
    for f in collection["features"]:
        ring = f["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) == 5
        # 32 px of 10 m: a few hundred metres around the scene's centre, in degrees.
        assert all(abs(x - lon) < 0.05 and abs(y - lat) < 0.05 for x, y in ring)
        props = f["properties"]
        if props["magnitude"] is not None:
            assert props["affected"] == (props["magnitude"] >= AFFECTED_THRESHOLD)


def test_warped_post_image_predicts_the_same(
    trained: TrainSummary, test_scene: SceneWritten, tmp_path: Path
) -> None:
    """A post image on a larger grid, shifted by whole pixels: brought onto the pre grid."""
    post, transform, _ = read_tif(test_scene.post)
    bigger = np.full((2, post.shape[1] + 10, post.shape[2] + 7), np.nan, np.float32)
    bigger[:, 4 : 4 + post.shape[1], 3 : 3 + post.shape[2]] = post
    shifted = write_tif(
        tmp_path / "post_shifted.tif", bigger, transform=transform @ Affine.translation(-3, -4)
    )
    out = tmp_path / "out"
    predictor = load_predictor(str(trained.best_checkpoint))
    predict_pair(predictor, [str(test_scene.pre)], [str(shifted)], out, EXACT)
    assert_equals_evaluate(out, test_scene, evaluated(trained))
    event = json.loads((out / "event.json").read_text())
    assert event["inputs"]["post_warped_to_pre_grid"] is True


def test_db_inputs_and_one_file_per_band(
    trained: TrainSummary, test_scene: SceneWritten, tmp_path: Path
) -> None:
    """dB files (recognised and said so) and separate VV/VH files give the same numbers."""
    files: dict[str, list[str]] = {}
    for date in ("pre", "post"):
        data, transform, _ = read_tif(getattr(test_scene, date))
        db = 10 * np.log10(data)
        files[date] = [
            str(
                write_tif(
                    tmp_path / f"s1_{date}_{pol}.tif",
                    db[i : i + 1],
                    transform=transform,
                    descriptions=None,
                )
            )
            for i, pol in ((1, "vh"), (0, "vv"))  # VH first: the names decide, not the order
        ]
    out = tmp_path / "out"
    predictor = load_predictor(str(trained.best_checkpoint))
    result = predict_pair(predictor, files["pre"], files["post"], out, EXACT)
    assert any("looks like dB" in n for n in result.notes)
    tiles = tile_magnitudes(out)
    expected = evaluated(trained)
    for patch in test_scene.patches:
        assert tiles[(patch.row_off, patch.col_off)] == pytest.approx(
            expected[(patch.event_id, patch.patch)], abs=1e-4
        )  # dB -> linear -> dB rounds in float32


def test_overlap_and_epicentre(
    trained: TrainSummary, test_scene: SceneWritten, tmp_path: Path
) -> None:
    predictor = load_predictor(str(trained.best_checkpoint))
    out = tmp_path / "out"
    _, _, height, width = (0, 0, *read_tif(test_scene.pre)[0].shape[1:])
    opts = PredictOptions(
        overlap=16, min_valid=0.0, progress=False, epicentre=test_scene.centre, radius_km=0.2
    )
    result = predict_pair(predictor, [str(test_scene.pre)], [str(test_scene.post)], out, opts)
    assert result.tiles == ((height - 32) // 16 + 1) * ((width - 32) // 16 + 1)
    features = json.loads((out / "tiles.geojson").read_text())["features"]
    inside = [f for f in features if f["properties"]["in_area"]]
    assert 0 < len(inside) < len(features)  # 200 m around the centre: some tiles, not all
    assert result.estimate.tiles == len(inside)
    assert "within 0.2 km" in result.estimate.area


def test_registered_model_uri_predicts_like_the_checkpoint(
    trained: TrainSummary,
    test_scene: SceneWritten,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from quakeray.tracking.outputs import register_model

    assert trained.best_checkpoint is not None
    uri = register_model(
        trained.tracking_uri, trained.mlflow_run_id, trained.best_checkpoint, "predict-test"
    )
    assert uri == "models:/predict-test@champion"
    out = tmp_path / "out"
    code = main(
        [
            "predict", "--model", uri, "--tracking-uri", trained.tracking_uri,
            "--pre", str(test_scene.pre), "--post", str(test_scene.post),
            "--out", str(out), "--min-valid", "0",
        ]
    )  # fmt: skip
    assert code == 0
    assert "event magnitude" in capsys.readouterr().out
    assert_equals_evaluate(out, test_scene, evaluated(trained))
    # By run id too (through the run's best-checkpoint tag).
    out2 = tmp_path / "out2"
    assert main(
        [
            "predict", "--model", trained.mlflow_run_id, "--tracking-uri", trained.tracking_uri,
            "--pre", str(test_scene.pre), "--post", str(test_scene.post), "--out", str(out2),
            "--min-valid", "0",
        ]
    ) == 0  # fmt: skip
    assert tile_magnitudes(out2) == tile_magnitudes(out)
    # quakeray evaluate takes the registered model too: its run's best checkpoint.
    from quakeray.evaluate import evaluate_target

    result = evaluate_target(uri, split="val", tracking_uri=trained.tracking_uri, log=False)
    assert result.checkpoint == str(trained.best_checkpoint)
