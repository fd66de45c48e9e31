"""Training outlives its tracking server: a real ``mlflow server`` killed mid-run.

``quakeray train`` runs as a real process against a real server on 127.0.0.1; the test
SIGKILLs the server after the third epoch. Brought back while training goes on, the
held-back epochs reach it; gone for good, training still finishes, the command says how
to complete the record, and ``quakeray sync`` completes it once the server is back.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from quakeray.checkpoint import read_history
from tests.conftest import MlflowServer

pytestmark = pytest.mark.slow

EPOCHS = 60


def _train(data: Path, root: Path, uri: str, name: str) -> subprocess.Popen[str]:
    """The run, its stdout a pipe read line by line, its stderr to ``<root>/<name>.err``."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "quakeray",
            "train",
            f"data.path={data}",
            f"run.storage_path={root / 'ray_results'}",
            f"tracking.uri={uri}",
            "tracking.experiment=outage",
            f"run.name={name}",
            "scaling.num_workers=0",
            f"optim.epochs={EPOCHS}",
            "optim.batch_size=8",
            "run.checkpoints_to_keep=1",
        ],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=(root / f"{name}.err").open("w"),  # Ray's INFO lines would fill a pipe
        text=True,
    )


def _wait_for_epoch(proc: subprocess.Popen[str], epoch: int, seen: list[str]) -> None:
    """Read the run's output until it reports ``epoch`` (1-based), keeping the lines."""
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"epoch {epoch}/"):
            return
    raise AssertionError(f"training ended before epoch {epoch}:\n{''.join(seen[-20:])}")


def _epochs_in_mlflow(uri: str, run_id: str) -> list[int]:
    return sorted(int(m.step) for m in MlflowClient(uri).get_metric_history(run_id, "epoch"))


def _run_id(root: Path, name: str) -> str:
    import json

    return str(
        json.loads((root / "ray_results" / name / "quakeray_run.json").read_text())["run_id"]
    )


def _data(tiny_h5: Path, root: Path) -> Path:
    data = root / "q.h5"
    data.write_bytes(tiny_h5.read_bytes())  # its statistics are written beside it
    return data


def test_a_server_killed_mid_run_and_brought_back_misses_nothing(
    tiny_h5: Path, tmp_path: Path
) -> None:
    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server").start()
    proc, seen = _train(_data(tiny_h5, tmp_path), tmp_path, server.uri, "back"), []
    try:
        _wait_for_epoch(proc, 3, seen)
        server.stop(kill=True)
        _wait_for_epoch(proc, 8, seen)  # training goes on without it
        server.start()
        proc.communicate(timeout=600)
    finally:
        proc.kill()
        server.stop()
    err = (tmp_path / "back.err").read_text()
    assert proc.returncode == 0, err[-3000:]
    assert "does not answer" in err and "answers again" in err
    server.start()
    try:
        run_id = _run_id(tmp_path, "back")
        assert _epochs_in_mlflow(server.uri, run_id) == list(range(EPOCHS))  # none lost, none twice
        run = MlflowClient(server.uri).get_run(run_id)
        assert run.info.status == "FINISHED" and "quakeray.best_checkpoint" in run.data.tags
    finally:
        server.stop()


def test_a_server_gone_for_good_loses_nothing_that_sync_cannot_bring_back(
    tiny_h5: Path, tmp_path: Path
) -> None:
    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server").start()
    proc, seen = _train(_data(tiny_h5, tmp_path), tmp_path, server.uri, "gone"), []
    t0 = time.monotonic()
    try:
        _wait_for_epoch(proc, 3, seen)
        server.stop(kill=True)
        proc.communicate(timeout=600)
    finally:
        proc.kill()
    err = (tmp_path / "gone.err").read_text()
    # Training finished every epoch; the end is one line that says what to do.
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("quakeray: error: training finished") and "quakeray sync" in last
    folder = tmp_path / "ray_results" / "gone"
    history = read_history(sorted(folder.glob("checkpoint_epoch_*"))[-1])
    assert len(history) == EPOCHS
    assert time.monotonic() - t0 < 300  # no minutes of retries per epoch

    server.start()
    try:
        run_id = _run_id(tmp_path, "gone")
        assert len(_epochs_in_mlflow(server.uri, run_id)) < EPOCHS
        assert MlflowClient(server.uri).get_run(run_id).info.status == "RUNNING"
        sync = subprocess.run(
            [sys.executable, "-m", "quakeray", "sync", str(folder)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert sync.returncode == 0, sync.stderr[-3000:]
        assert _epochs_in_mlflow(server.uri, run_id) == list(range(EPOCHS))
        run = MlflowClient(server.uri).get_run(run_id)
        assert run.info.status == "FINISHED" and "quakeray.best_checkpoint" in run.data.tags
        assert "best_val_MAE" in run.data.metrics
        again = subprocess.run(
            [sys.executable, "-m", "quakeray", "sync", str(folder)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert again.returncode == 0 and "none missing" in again.stdout  # idempotent
        assert _epochs_in_mlflow(server.uri, run_id) == list(range(EPOCHS))
    finally:
        server.stop()
