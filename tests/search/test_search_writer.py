"""The search's MLflow writer in its Ray actor, on a real local Ray and a real sqlite store.

What the search relies on: a run opened at once, every message handled in the order it
was sent, the search able to wait for all of them and to know which runs are still being
closed, a failed write reported on the driver without stopping the writer, and nothing of
the actor pickled with Tune's state. The in-process writer is what
``test_search_tracking.py`` drives; a whole search through the actor is ``test_search.py``.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from quakeray import tracking
from quakeray.config import load_config
from quakeray.metrics import EPOCH_METRICS, SCORE_METRIC
from quakeray.search.layout import SearchRef
from quakeray.search.tracker import TrialRunTracker
from quakeray.search.writer import ActorWriter, start_writer
from quakeray.tracking.tags import STATUS as TAG_STATUS

BASE = load_config(None, ["model.backbone=test_resnet", "search.name=writer"])


def _ref(uri: str, tmp_path: Any) -> SearchRef:
    experiment = tracking.get_or_create_experiment(uri, "writer")
    parent = tracking.start_run(uri, experiment, run_name="parent")
    return SearchRef(str(tmp_path / "search"), uri, experiment, parent)


def _epoch(epoch: int, value: float) -> dict[str, Any]:
    return {name: 0.5 for name in EPOCH_METRICS} | {"epoch": float(epoch), SCORE_METRIC: value}


def test_the_actor_writes_every_message_in_order_and_the_search_can_wait(
    ray_local: None, mlflow_uri: str, tmp_path: Any
) -> None:
    ref = _ref(mlflow_uri, tmp_path)
    writer = start_writer(ref, BASE, EPOCH_METRICS, "")
    assert isinstance(writer, ActorWriter)
    run_id = writer.open_run("t1", {"loss.margin": 0.1}, "tpe-001 m=0.1", {})
    client = MlflowClient(mlflow_uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # open: done when it returns
    for epoch, value in enumerate([2.0, 1.5, 1.2]):
        writer.send("t1", "log_epoch", run_id, _epoch(epoch, value))
    writer.send("t1", "log_epoch", run_id, _epoch(2, 1.2))  # Tune's repeated last report
    writer.finish("t1", run_id, {"loss.margin": 0.1}, None, "completed", "t1")
    writer.wait()
    assert writer.pending() == frozenset()
    history = client.get_metric_history(run_id, SCORE_METRIC)
    assert [(m.step, m.value) for m in history] == [(0, 2.0), (1, 1.5), (2, 1.2)]
    run = client.get_run(run_id)
    assert (run.info.status, run.data.tags[TAG_STATUS]) == ("FINISHED", "completed")
    writer.release()


def test_a_failed_write_is_a_warning_on_the_driver_and_the_writer_goes_on(
    ray_local: None, mlflow_uri: str, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ref = _ref(mlflow_uri, tmp_path)
    writer = start_writer(ref, BASE, EPOCH_METRICS, "")
    run_id = writer.open_run("t1", {"loss.margin": 0.1}, "tpe-001", {})
    with caplog.at_level(logging.WARNING, logger="quakeray.search.writer"):
        writer.send("ghost", "log_epoch", "no-such-run", _epoch(0, 1.0))
        writer.send("t1", "log_epoch", run_id, _epoch(0, 1.0))
        writer.wait()
    warnings = [r.getMessage() for r in caplog.records if r.name == "quakeray.search.writer"]
    assert warnings == ["MLflow tracking failed for trial ghost"]
    history = MlflowClient(mlflow_uri).get_metric_history(run_id, SCORE_METRIC)
    assert [m.step for m in history] == [0]
    writer.release()


def test_runs_being_closed_are_pending_until_the_writer_is_done(
    ray_local: None, mlflow_uri: str, tmp_path: Any
) -> None:
    ref = _ref(mlflow_uri, tmp_path)
    writer = start_writer(ref, BASE, EPOCH_METRICS, "")
    assert isinstance(writer, ActorWriter)
    run_id = writer.open_run("t1", {}, "tpe-001", {})
    writer.finish("t1", run_id, {}, None, "stopped", "t1")
    assert writer.pending() <= {run_id}  # until the actor got to it
    writer.wait()
    assert writer.pending() == frozenset()
    assert MlflowClient(mlflow_uri).get_run(run_id).data.tags[TAG_STATUS] == "stopped"
    writer.release()


def test_a_tracker_pickles_without_its_writer(
    ray_local: None, mlflow_uri: str, tmp_path: Any
) -> None:
    ref = _ref(mlflow_uri, tmp_path)
    tracker = TrialRunTracker(ref, base=BASE, metric_names=EPOCH_METRICS)
    writer = start_writer(ref, BASE, EPOCH_METRICS, "")
    tracker.attach(writer)
    restored = pickle.loads(pickle.dumps(tracker))  # as Tune saves it
    assert restored.writer is None and restored.ref == ref
    writer.release()
