"""MLflow tracking helpers against a real sqlite store (and a closed port for HTTP)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from quakeray.config import load_config
from quakeray.errors import TrackingError
from quakeray.tracking import (
    CONFIG_ARTIFACT,
    RunLogger,
    check_tracking,
    end_run,
    get_or_create_experiment,
    log_config,
    resolve_tracking_uri,
    start_run,
)
from tests.conftest import free_port


def test_resolve_default_env_and_relative(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/x.db")
    # Relative sqlite paths are made absolute: Ray workers run in other directories.
    assert resolve_tracking_uri("") == f"sqlite:///{tmp_path / 'runs' / 'x.db'}"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("http://10.0.0.1:5000") == "http://10.0.0.1:5000"
    assert resolve_tracking_uri("file:./mlruns") == (tmp_path / "mlruns").as_uri()


def test_unreachable_server_fails_fast() -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TrackingError, match="not reachable") as info:
        check_tracking(uri)
    assert time.monotonic() - start < 10
    assert "\n" not in str(info.value) and uri in str(info.value)


def test_file_store_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(TrackingError, match="file store"):
        check_tracking((tmp_path / "mlruns").as_uri())


def test_run_lifecycle_params_metrics_artifacts(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'sub' / 'mlflow.db'}"
    check_tracking(uri)  # creates the folder and the schema
    assert (tmp_path / "sub" / "mlflow.db").is_file()
    exp = get_or_create_experiment(uri, "exp-a")
    assert get_or_create_experiment(uri, "exp-a") == exp
    client = MlflowClient(uri)
    # Artifacts live beside the database, whatever the working directory.
    assert client.get_experiment(exp).artifact_location.startswith((tmp_path / "sub").as_uri())

    parent = start_run(uri, exp, run_name="parent")
    run_id = start_run(uri, exp, run_name="child", parent_run_id=parent, tags={"k": "v"})
    cfg = load_config(None, ["loss.margin=0.05", "tracking.run_name=" + "x" * 7000])
    log_config(uri, run_id, cfg)
    log_config(uri, run_id, cfg)  # idempotent: a restarted driver may log it again

    logger = RunLogger(uri, run_id)
    logger.log_metrics({"val_MAE": 1.5, "bad": math.nan, "inf": math.inf}, step=0)
    logger.log_metrics({"val_MAE": 1.2}, step=1)
    assert logger.logged_steps("val_MAE") == {0, 1}
    end_run(uri, run_id, "FINISHED")

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["loss.margin"] == "0.05"
    assert run.data.params["model.backbone"] == "test_resnet"
    assert len(run.data.params["tracking.run_name"]) <= 6000  # clipped to MLflow's limit
    assert "bad" not in run.data.metrics and "inf" not in run.data.metrics
    assert [m.value for m in client.get_metric_history(run_id, "val_MAE")] == [1.5, 1.2]
    local = client.download_artifacts(run_id, CONFIG_ARTIFACT, str(tmp_path))
    assert yaml.safe_load(Path(local).read_text())["loss"]["margin"] == 0.05
