"""Ctrl-C in the middle of a search, then ``quakeray tune --resume``: nothing lost, nothing twice.

The search runs as a real ``python -m quakeray tune`` process with its own local Ray. It
gets SIGINT (what Ctrl-C sends) while its second trial trains; the resumed search must
keep the first trial (not run again), restart the second into its existing MLflow run,
run the third, and leave exactly one MLflow run per trial, all closed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from quakeray.search import STATE_FILE

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# Enough epochs that the second trial is still training when the poll below sees it (a
# tiny trial in a warm trial process takes well under a second per epoch).
EPOCHS = 16


def _wait_for(
    what: str, check: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + 300
    while not check():
        if proc.poll() is not None:
            raise AssertionError(
                f"search exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def _children(client: MlflowClient, experiment: str) -> list[object]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return [
        r
        for r in client.search_runs([exp.experiment_id], max_results=100)
        if r.data.tags.get("quakeray.role") == "trial"
    ]


def _epoch_stamps(client: MlflowClient, run_id: str) -> list[tuple[int, int]]:
    return sorted((m.step, m.timestamp) for m in client.get_metric_history(run_id, "val_MAE"))


def test_interrupted_search_resumes_without_repeats_or_duplicate_runs(
    tiny_h5: Path, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = {
        "data": {"path": str(tiny_h5)},
        "model": {"backbone": "test_resnet"},
        "optim": {"epochs": EPOCHS, "batch_size": 8},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "tracking": {"uri": uri, "log_model": False},
        "run": {"storage_path": str(tmp_path / "ray_results")},
        "search": {
            "name": "resume-test",
            "num_samples": 3,
            "max_concurrent": 1,
            "asha": False,
            "evaluate_best": False,
        },
    }
    cfg_file = tmp_path / "search.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "quakeray", "tune"]
    log1 = tmp_path / "first.log"

    with log1.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, "-c", str(cfg_file)], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env
        )
        # The store exists once the state file does (never race its schema creation).
        _wait_for(
            "the search folder",
            lambda: any((tmp_path / "ray_results").glob(f"*/{STATE_FILE}")),
            proc,
            log1,
        )
        client = MlflowClient(tracking_uri=uri)

        def second_trial_training() -> bool:
            runs = _children(client, "resume-test")
            done = [r for r in runs if r.data.tags.get("quakeray.status") == "completed"]
            return len(done) == 1 and len(runs) == 2

        _wait_for("the second trial", second_trial_training, proc, log1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) == 130, log1.read_text()[-3000:]

    (search_dir,) = [p.parent for p in (tmp_path / "ray_results").glob(f"*/{STATE_FILE}")]
    assert f"quakeray tune --resume {search_dir}" in log1.read_text()
    before = {r.data.tags["quakeray.trial_id"]: r for r in _children(client, "resume-test")}
    assert sorted(r.data.tags["quakeray.status"] for r in before.values()) == [
        "cancelled",
        "completed",
    ]
    assert all(r.info.status in ("FINISHED", "KILLED") for r in before.values())  # none RUNNING
    (finished_id,) = [t for t, r in before.items() if r.data.tags["quakeray.status"] == "completed"]
    finished_epochs = _epoch_stamps(client, before[finished_id].info.run_id)

    resumed = subprocess.run(
        [*cmd, "--resume", str(search_dir)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=480,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    after = _children(client, "resume-test")
    trial_ids = [r.data.tags["quakeray.trial_id"] for r in after]
    assert len(after) == 3 and len(set(trial_ids)) == 3  # one MLflow run per trial
    assert set(before) <= set(trial_ids)
    assert sorted(r.data.tags.get("quakeray.reference", "") for r in after) == [
        "",
        "mse_only",
        "paper",
    ]
    for run in after:
        tid = run.data.tags["quakeray.trial_id"]
        assert run.info.status == "FINISHED" and run.data.tags["quakeray.status"] == "completed"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_MAE")]
        assert steps == list(range(EPOCHS)), (tid, steps)  # no epoch logged twice
        if tid == finished_id:
            # Finished before Ctrl-C: not run again (the run was never reopened, its
            # epochs are the ones logged then). Its end time may move: the best trial's
            # run gets the registered model at the search's end.
            assert "quakeray.restarts" not in run.data.tags
            assert _epoch_stamps(client, run.info.run_id) == finished_epochs
        elif tid in before:
            assert run.data.tags["quakeray.restarts"] == "1"  # restarted into its own run
    parent = client.get_run(before[finished_id].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["quakeray.search_dir"] == str(search_dir)
