"""A search whose ``run.storage_path`` is a URI: folder, state, checkpoints and ``--resume``.

``file:///...`` goes through ``pyarrow.fs.FileSystem.from_uri`` in quakeray and in Ray
Tune/Train exactly as ``s3://`` or ``gs://`` does, so this is the cluster's code path
(a shared bucket for checkpoints and Tune state) on one machine, without a bucket.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from quakeray.config import load_config
from quakeray.errors import SearchError
from quakeray.search import STATE_FILE, TRAIN_SUBDIR, load_search_state, run_search
from quakeray.search.runs import child_runs

pytestmark = pytest.mark.slow


def test_search_in_a_storage_uri_runs_and_resumes_by_uri(
    ray_local: None, tiny_h5: Path, tmp_path: Path
) -> None:
    root = tmp_path / "bucket"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        None,
        [
            f"data.path={tiny_h5}",
            f"run.storage_path=file://{root}/runs",
            f"tracking.uri={uri}",
            "model.backbone=test_resnet",
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=0.5",
            "optim.batch_size=8",
            "optim.epochs=1",
            "tracking.log_model=false",
            "search.name=uri-test",
            "search.num_samples=1",
            "search.asha=false",
            "search.evaluate_best=false",
        ],
    )
    summary = run_search(cfg)

    # The folder is named by its URI everywhere a user sees it, and lives where it says.
    assert summary.search_dir.startswith(f"file://{root}/runs/uri-test-")
    on_disk = Path(summary.search_dir.removeprefix("file://"))
    state = json.loads((on_disk / STATE_FILE).read_text())
    assert state["parent_run_id"] == summary.parent_run_id
    assert any(on_disk.glob("experiment_state-*.json"))  # Tune's own state, for restore
    assert any((on_disk / TRAIN_SUBDIR).glob("train-*/checkpoint_*"))  # checkpoints too
    assert summary.best is not None and summary.best_checkpoint
    assert summary.best_checkpoint.startswith(f"file://{on_disk}/{TRAIN_SUBDIR}/")
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.tags["quakeray.search_dir"] == summary.search_dir
    (trial,) = child_runs(uri, summary.experiment_id, summary.parent_run_id)
    assert trial.info.status == "FINISHED"

    # --resume by the URI: same search, same parent run, the finished trial not run again.
    resumed = run_search(cfg, resume=summary.search_dir)
    assert resumed.search_dir == summary.search_dir
    assert resumed.parent_run_id == summary.parent_run_id
    assert [r.trial_id for r in resumed.rows] == [r.trial_id for r in summary.rows]
    (again,) = child_runs(uri, summary.experiment_id, summary.parent_run_id)
    assert again.info.run_id == trial.info.run_id
    assert again.info.end_time == trial.info.end_time
    assert client.get_run(summary.parent_run_id).info.status == "FINISHED"

    with pytest.raises(SearchError, match="no such folder"):
        load_search_state(f"file://{root}/runs/uri-test-missing")
