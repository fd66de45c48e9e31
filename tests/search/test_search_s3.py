"""Storage in a bucket: a search, its evaluation, ``evaluate`` and ``train --resume`` on s3://.

A real S3 API (``moto_server``) on 127.0.0.1; quakeray and Ray reach it through pyarrow,
as they reach AWS, GCS or MinIO on a cluster.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from quakeray import storage
from quakeray.config import load_config
from quakeray.evaluate import evaluate_target
from quakeray.search import TRAIN_SUBDIR, run_search
from quakeray.search.runs import child_runs
from quakeray.train import run_training
from tests.conftest import S3Server

pytestmark = pytest.mark.slow


def test_search_on_s3_killed_then_resumed_by_uri(s3_server: S3Server, tmp_path: Path) -> None:
    """``quakeray tune`` SIGKILLed after its first epoch; ``--resume s3://...`` finishes it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "--smoke-test",
        "optim.epochs=1",
        "search.num_samples=3",
        "search.asha=false",
        "search.evaluate_best=true",
        f"run.storage_path={s3_server.uri('killed')}",
        f"tracking.uri={uri}",
    ]

    def tune(*extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "quakeray", "tune", *extra, *args],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    proc = tune()
    assert proc.stdout is not None
    for line in proc.stdout:
        if re.search(r"epoch 1/1:", line):
            time.sleep(1.0)
            os.kill(proc.pid, signal.SIGKILL)
            break
    assert proc.wait(timeout=600) == -signal.SIGKILL
    time.sleep(5)  # the killed driver's own Ray processes go with it
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("search")
    assert experiment is not None
    (parent,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`quakeray.role` = 'search'"
    )
    folder = parent.data.tags["quakeray.search_dir"]
    assert folder.startswith(s3_server.uri("killed/search-"))
    resumed = tune("--resume", folder)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert "test_MAE" in parent.data.metrics  # the best checkpoint, evaluated from the bucket
    trials = child_runs(uri, experiment.experiment_id, parent.info.run_id)
    assert len(trials) == 3 and {t.info.status for t in trials} == {"FINISHED"}
    # Trials the killed driver ran before Tune saved them were continued, not repeated.
    assert len(storage.list_dir(storage.join(folder, "train"))) == 3


@pytest.fixture(scope="module")
def bucket_ray(s3_server: S3Server, ray_local: None) -> S3Server:
    """The S3 server first, then Ray: Ray's workers inherit the endpoint."""
    return s3_server


def test_search_on_s3_with_defaults_evaluates_registers_and_resumes(
    bucket_ray: S3Server, tiny_h5: Path, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = bucket_ray.uri("runs")
    cfg = load_config(
        None,
        [
            f"data.path={tiny_h5}",
            f"run.storage_path={runs}",
            f"tracking.uri={uri}",
            "model.backbone=test_resnet",
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=0.5",
            "optim.batch_size=8",
            "optim.epochs=1",
            "tracking.log_model=false",
            "search.name=s3-test",
            "search.num_samples=2",
            "search.asha=false",
            "search.test_trials=true",
        ],
    )
    summary = run_search(cfg)  # evaluate_best on, as by default
    assert summary.search_dir.startswith(f"{runs}/s3-test-")
    assert summary.best_checkpoint and summary.best_checkpoint.startswith(
        f"{summary.search_dir}/{TRAIN_SUBDIR}/"
    )
    assert storage.is_file(f"{summary.best_checkpoint}/checkpoint.pt")
    assert "test_MAE" in summary.test_metrics  # the best checkpoint, read from the bucket
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert "test_MAE" in parent.data.metrics
    trials = child_runs(uri, summary.experiment_id, summary.parent_run_id)
    assert len(trials) == 2
    assert all("test_MAE" in t.data.metrics for t in trials)  # search.test_trials
    assert summary.registered_model == "models:/s3-test@champion"

    # quakeray evaluate RUN_ID: the trial's checkpoint is in the bucket.
    best_run = summary.best.run_id  # type: ignore[union-attr]
    result = evaluate_target(best_run, split="val", tracking_uri=uri, log=False)
    assert result.checkpoint == summary.best_checkpoint
    assert result.metrics["val_MAE"] == pytest.approx(summary.best.value, abs=1e-6)  # type: ignore[union-attr]

    # --resume by the URI: the same search, nothing run again.
    resumed = run_search(cfg, resume=summary.search_dir)
    assert resumed.parent_run_id == summary.parent_run_id
    assert [r.trial_id for r in resumed.rows] == [r.trial_id for r in summary.rows]
    assert len(child_runs(uri, summary.experiment_id, summary.parent_run_id)) == 2


@pytest.mark.parametrize("workers", [1, 0], ids=["worker-group", "in-process"])
def test_train_resume_from_a_checkpoint_in_the_bucket(
    bucket_ray: S3Server, tiny_h5: Path, tmp_path: Path, workers: int
) -> None:
    # In process (num_workers=0) nothing persists checkpoints for the loop: it uploads
    # them to the bucket itself, where Ray Train's worker group would have put them.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prefix = bucket_ray.uri(f"train-{workers}")
    base = [
        f"data.path={tiny_h5}",
        f"run.storage_path={prefix}",
        f"tracking.uri={uri}",
        "model.backbone=test_resnet",
        f"scaling.num_workers={workers}",
        "scaling.cpus_per_worker=0.5",
        "optim.batch_size=8",
        "optim.epochs=2",
        "tracking.log_model=false",
    ]
    first = run_training(load_config(None, [*base, "run.name=first"]))
    assert first.best_checkpoint and first.best_checkpoint.startswith("s3://")
    epoch0 = f"{prefix}/first/checkpoint_epoch_0000"
    assert storage.is_file(f"{epoch0}/checkpoint.pt")
    second = run_training(load_config(None, [*base, "run.name=second"]), resume=epoch0)
    history = MlflowClient(tracking_uri=uri).get_metric_history(second.mlflow_run_id, "val_MAE")
    assert [m.step for m in history] == [1]  # epoch 0 came from the bucket
