"""Many events on a local Ray: the good ones predicted, the broken one reported."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from quakeray.data.scenes import write_scene
from quakeray.train import TrainSummary
from tests.conftest import S3Server

pytestmark = pytest.mark.slow


def test_manifest_on_ray(
    trained: TrainSummary, tiny_h5: Path, tmp_path: Path, s3_server: S3Server
) -> None:
    scenes = [
        write_scene(tiny_h5, tmp_path / f"ev{i}", split=s) for i, s in enumerate(["test", "val"])
    ]
    # One event in a bucket (a real S3 API on 127.0.0.1), read through the storage module.
    on_s3 = [s3_server.upload(scenes[0].pre, "ev/pre.tif")]
    on_s3.append(s3_server.upload(scenes[0].post, "ev/post.tif"))
    (tmp_path / "broken.tif").write_text("not a raster")
    rows = [
        {"event_id": "a", "pre": "ev0/pre.tif", "post": "ev0/post.tif", "lon": "", "lat": ""},
        {"event_id": "broken", "pre": "broken.tif", "post": "ev0/post.tif", "lon": "", "lat": ""},
        {
            "event_id": "b",
            "pre": str(scenes[1].pre),
            "post": str(scenes[1].post),
            "lon": f"{scenes[1].centre[0]}",
            "lat": f"{scenes[1].centre[1]}",
        },
        {"event_id": "c", "pre": on_s3[0], "post": on_s3[1], "lon": "", "lat": ""},
    ]
    manifest = tmp_path / "events.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable, "-m", "quakeray", "predict", "--model", str(trained.best_checkpoint),
            "--manifest", str(manifest), "--out", str(out), "--min-valid", "0",
        ],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]  # some events failed: 1, not 2
    assert "3 of 4 events predicted" in proc.stdout
    assert "broken: error: image" in proc.stdout and "cannot be read as a raster" in proc.stdout
    with (out / "results.csv").open() as f:
        results = {r["event_id"]: r for r in csv.DictReader(f)}
    assert [results[k]["status"] for k in ("a", "broken", "b", "c")] == ["ok", "error", "ok", "ok"]
    assert results["c"]["magnitude"] == results["a"]["magnitude"]  # same pixels, from S3
    assert "cannot be read as a raster" in results["broken"]["error"]
    for key, scene in (("a", scenes[0]), ("b", scenes[1])):
        event = json.loads((out / "events" / key / "event.json").read_text())
        assert float(results[key]["magnitude"]) == pytest.approx(event["magnitude"], abs=1e-6)
        assert event["inputs"]["pre"] == [str(scene.pre.resolve())]
    assert json.loads((out / "events" / "b" / "event.json").read_text())["epicentre"] == [
        pytest.approx(scenes[1].centre[0]),
        pytest.approx(scenes[1].centre[1]),
    ]
    assert not (out / "events" / "broken").exists()
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert [r["status"] for r in table] == ["ok", "error", "ok", "ok"]
