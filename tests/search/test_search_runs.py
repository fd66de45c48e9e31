"""A search's trial runs on a real store: closed with a status, none left RUNNING."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from quakeray import tracking
from quakeray.config import load_config
from quakeray.search.layout import SearchRef
from quakeray.search.runs import (
    close_open_children,
    close_trial_run,
    finish_trial_run,
    open_trial_run,
)
from quakeray.tracking.tags import ERROR, STATUS


def _ref(tmp_path: Path) -> SearchRef:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.get_or_create_experiment(uri, "runs")
    return SearchRef(
        str(tmp_path), uri, experiment, tracking.start_run(uri, experiment, run_name="p")
    )


def test_a_closed_run_says_how_it_ended_and_why(tmp_path: Path) -> None:
    ref = _ref(tmp_path)
    run_id = open_trial_run(ref, "t1", run_name="tpe-001")
    error = "Traceback (most recent call last):\n  ...\nRuntimeError: out of memory\n"
    assert close_trial_run(ref.uri, run_id, "failed", error=error) is True
    run = MlflowClient(ref.uri).get_run(run_id)
    assert (run.info.status, run.data.tags[STATUS]) == ("FAILED", "failed")
    assert run.data.tags[ERROR] == "RuntimeError: out of memory"  # the last line, not all
    assert close_trial_run(ref.uri, run_id, "cancelled", only_if_running=True) is False


def test_finishing_leaves_a_run_someone_else_closed(tmp_path: Path) -> None:
    ref = _ref(tmp_path)
    run_id = open_trial_run(ref, "t1", run_name="tpe-001")
    close_trial_run(ref.uri, run_id, "cancelled")
    base = load_config(None, [])
    finish_trial_run(
        ref.uri, run_id, base=base, config={}, checkpoint=None, status="completed", trial_id="t1"
    )
    assert MlflowClient(ref.uri).get_run(run_id).data.tags[STATUS] == "cancelled"


def test_at_the_end_no_run_stays_running(tmp_path: Path) -> None:
    ref = _ref(tmp_path)
    known, stray, trained, held = (
        open_trial_run(ref, t, run_name=t) for t in ("known", "stray", "trained", "held")
    )
    tracking.RunLogger(ref.uri, trained).log_metrics({"val_MAE": 1.0}, step=0)
    close_open_children(ref, tune_runs={known, held}, finalising={held})
    client = MlflowClient(ref.uri)
    assert client.get_run(known).data.tags[STATUS] == "cancelled"
    assert client.get_run(trained).data.tags[STATUS] == "cancelled"  # kept: it logged
    assert client.get_run(stray).info.lifecycle_stage == "deleted"  # a suggestion, nothing ran
    assert client.get_run(held).info.status == "RUNNING"  # its writer is closing it
