"""``quakeray evaluate``: a checkpoint, a run folder or an MLflow run id, on a split."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from quakeray.checkpoint import read_metrics, read_predictions
from quakeray.config import load_config
from quakeray.data.quakeset import QuakeSetDataset
from quakeray.errors import CheckpointError, DataError
from quakeray.evaluate import evaluate_checkpoint, evaluate_target
from quakeray.train import TrainSummary, run_training


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_h5: Path) -> tuple[TrainSummary, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    data = root / "q.h5"
    data.write_bytes(tiny_h5.read_bytes())
    cfg = load_config(
        None,
        [
            f"data.path={data}",
            f"run.storage_path={root / 'ray_results'}",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            "scaling.num_workers=0",
            "optim.epochs=2",
            "optim.batch_size=8",
            "tracking.log_model=false",
            "run.name=eval",
        ],
    )
    return run_training(cfg), data


def test_val_split_reproduces_the_training_metrics(trained: tuple[TrainSummary, Path]) -> None:
    summary, data = trained
    assert summary.best_checkpoint is not None
    result = evaluate_checkpoint(summary.best_checkpoint, split="val")
    stored = read_metrics(summary.best_checkpoint)
    assert result.metrics["val_MAE"] == pytest.approx(stored["val_MAE"], abs=1e-6)
    assert result.metrics["val_spearman"] == pytest.approx(stored["val_spearman"], abs=1e-6)
    csv = read_predictions(Path(summary.best_checkpoint) / "predictions_val.csv")
    np.testing.assert_allclose(result.predictions.prediction, csv.prediction, rtol=1e-5)
    assert result.data_path == str(data.resolve())


def test_test_split_by_run_id_is_logged(
    trained: tuple[TrainSummary, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    summary, data = trained
    result = evaluate_target(summary.mlflow_run_id, split="test", tracking_uri=summary.tracking_uri)
    test = QuakeSetDataset(data, "test")
    assert len(result.predictions.prediction) == len(test)
    assert set(result.metrics) == {
        "test_MAE", "test_RMSE", "test_spearman", "test_kendall", "test_rank_acc",
        "test_detection_acc", "test_MAE_pos",
        # beside the model, the constant train-median (and mean) predictor on test
        "test_MAE_const_median", "test_MAE_const_mean", "test_skill",
    }  # fmt: skip
    constant = np.mean(
        np.abs(
            np.asarray(result.predictions.magnitude)
            - np.median(QuakeSetDataset(data, "train").magnitudes)
        )
    )
    assert result.metrics["test_MAE_const_median"] == pytest.approx(constant, rel=1e-6)
    assert sum(int(b["count"]) for b in result.bins) == len(test)
    out = capsys.readouterr().out
    assert "test_MAE" in out and "count" in out  # metrics and the per-bin table
    assert result.logged
    client = MlflowClient(summary.tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.data.metrics["test_MAE"] == pytest.approx(result.metrics["test_MAE"])
    files = {a.path for a in client.list_artifacts(summary.mlflow_run_id, "evaluation/test")}
    assert {
        "evaluation/test/predictions.csv",
        "evaluation/test/scatter.png",
        "evaluation/test/per_bin.png",
    } <= files
    assert run.info.status == "FINISHED"  # logging an evaluation does not reopen the run


def test_run_folder_resolves_to_best_checkpoint(trained: tuple[TrainSummary, Path]) -> None:
    summary, _ = trained
    result = evaluate_target(summary.run_dir, split="val", log=False)
    assert result.checkpoint == summary.best_checkpoint
    assert not result.logged


def test_bad_targets(trained: tuple[TrainSummary, Path], tmp_path: Path) -> None:
    summary, _ = trained
    with pytest.raises(CheckpointError, match="not found"):
        evaluate_checkpoint(str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="neither a checkpoint folder nor an MLflow run"):
        evaluate_target("0123456789abcdef", tracking_uri=summary.tracking_uri)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        evaluate_target(str(tmp_path))
    assert summary.best_checkpoint is not None
    with pytest.raises(DataError, match="not found"):
        evaluate_checkpoint(summary.best_checkpoint, data_path=str(tmp_path / "none.h5"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        evaluate_checkpoint(str(tmp_path / "junk"))


def test_a_run_id_without_a_store_creates_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from quakeray.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["evaluate", "0123456789abcdef"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quakeray: error: no MLflow store at sqlite:///"), err
    assert len(err.splitlines()) == 1, err
    assert "'0123456789abcdef' is neither a checkpoint folder" in err
    assert list(tmp_path.iterdir()) == []  # reading created no store


def test_cli_evaluate(trained: tuple[TrainSummary, Path], tmp_path: Path) -> None:
    summary, _ = trained
    assert summary.best_checkpoint is not None
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "quakeray",
            "evaluate",
            summary.best_checkpoint,
            "--split",
            "val",
            "--no-log",
        ],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "val_MAE" in proc.stdout and "bias" in proc.stdout
