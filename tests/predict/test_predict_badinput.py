"""Every bad input of ``quakeray predict``: one line, exit code 2, nothing half written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from quakeray.cli import main
from quakeray.data.scenes import SceneWritten
from quakeray.train import TrainSummary
from tests.predict.conftest import read_tif, write_tif


@pytest.fixture()
def run(trained: TrainSummary, tmp_path: Path, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """``quakeray predict --model <checkpoint> ARGS --out OUT``: (exit code, stderr)."""
    out = tmp_path / "out"

    def call(*args: str, model: str | None = None) -> tuple[int, str]:
        code = main(
            [
                "predict", "--model", model or str(trained.best_checkpoint),
                "--tracking-uri", trained.tracking_uri, "--out", str(out), *args,
            ]
        )  # fmt: skip
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("quakeray: error:")]
        return code, lines[0] if lines else err

    yield call
    # Nothing half written: no output folder, no temporary folder beside it.
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def scene_args(scene: SceneWritten, pre: Path | None = None, post: Path | None = None) -> list[str]:
    return ["--pre", str(pre or scene.pre), "--post", str(post or scene.post)]


def test_missing_file(run, test_scene: SceneWritten, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, err = run(*scene_args(test_scene, post=tmp_path / "nope.tif"))
    assert code == 2 and "nope.tif not found" in err


def test_unreadable_file(run, test_scene: SceneWritten, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "broken.tif"
    bad.write_text("not a raster")
    code, err = run(*scene_args(test_scene, pre=bad))
    assert code == 2 and "broken.tif cannot be read as a raster" in err


def test_one_band(run, test_scene: SceneWritten, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data, transform, _ = read_tif(test_scene.pre)
    one = write_tif(tmp_path / "one.tif", data[:1], transform=transform, descriptions=("VV",))
    code, err = run(*scene_args(test_scene, pre=one))
    assert code == 2 and "has 1 band" in err and "--pre twice" in err


def test_bands_in_unknown_order(run, test_scene: SceneWritten, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data, transform, _ = read_tif(test_scene.post)
    anon = write_tif(tmp_path / "anon.tif", data, transform=transform, descriptions=None)
    code, err = run(*scene_args(test_scene, post=anon))
    assert code == 2 and "cannot tell which band is VV" in err and "--band-order" in err


def test_band_order_resolves_unknown_order(
    trained: TrainSummary, test_scene: SceneWritten, tmp_path: Path
) -> None:
    data, transform, _ = read_tif(test_scene.post)
    swapped = write_tif(tmp_path / "vhvv.tif", data[::-1], transform=transform, descriptions=None)
    code = main(
        [
            "predict", "--model", str(trained.best_checkpoint), "--out", str(tmp_path / "o"),
            "--pre", str(test_scene.pre), "--post", str(swapped), "--band-order", "VH,VV",
            "--units", "linear",
        ]
    )  # fmt: skip
    # --band-order names the order of the *post* file's bands here; the pre's descriptions win.
    assert code == 0


def test_images_that_do_not_overlap(run, test_scene: SceneWritten, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data, transform, _ = read_tif(test_scene.post)
    far = write_tif(tmp_path / "far.tif", data, transform=transform @ Affine.translation(5000, 0))
    code, err = run(*scene_args(test_scene, post=far))
    assert code == 2 and "do not overlap" in err


def test_all_nodata(run, test_scene: SceneWritten, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data, transform, _ = read_tif(test_scene.post)
    empty = write_tif(tmp_path / "empty.tif", np.full_like(data, np.nan), transform=transform)
    code, err = run(*scene_args(test_scene, post=empty))
    assert code == 2 and "nodata" in err


def test_epicentre_elsewhere(run, test_scene: SceneWritten) -> None:  # type: ignore[no-untyped-def]
    code, err = run(*scene_args(test_scene), "--epicentre", "100,10")
    assert code == 2 and "no predicted tile lies within 20 km" in err
    code, err = run(*scene_args(test_scene), "--epicentre", "42")
    assert code == 2 and "is not LON,LAT" in err


def test_model_reference_that_does_not_resolve(
    run, test_scene: SceneWritten, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    code, err = run(*scene_args(test_scene), model="models:/no-such-model@champion")
    assert code == 2 and "models:/no-such-model@champion does not resolve" in err
    code, err = run(*scene_args(test_scene), model=str(tmp_path / "no-checkpoint"))
    assert code == 2 and "checkpoint not found" in err


def test_manifest_with_missing_columns(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    manifest = tmp_path / "events.csv"
    manifest.write_text("before,after\na.tif,b.tif\n")
    code, err = run("--manifest", str(manifest))
    assert code == 2 and "lacks column(s) pre, post" in err


def test_existing_output_is_kept(
    trained: TrainSummary,
    test_scene: SceneWritten,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A non-empty --out is refused (not replaced); a failing run leaves it untouched."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = [
        "predict",
        "--model",
        str(trained.best_checkpoint),
        "--out",
        str(out),
        *scene_args(test_scene),
    ]
    assert main(args) == 2
    assert "is not empty" in capsys.readouterr().err
    # With --overwrite but a broken input: the old folder stays as it was.
    assert main([*args[:-2], "--post", str(tmp_path / "missing.tif"), "--overwrite"]) == 2
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["event.json", "magnitude.tif", "tiles.geojson"]


def test_cli_exit_code_and_one_line(
    trained: TrainSummary, test_scene: SceneWritten, tmp_path: Path
) -> None:
    """Through the installed command: exit 2, one line on stderr, no traceback."""
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable, "-m", "quakeray", "predict", "--model", str(trained.best_checkpoint),
            "--pre", str(test_scene.pre), "--post", str(tmp_path / "x.tif"),
        ],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"quakeray: error: image {tmp_path / 'x.tif'} not found; check the path"
    ]
    assert not (tmp_path / "predictions").exists()
