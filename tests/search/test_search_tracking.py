"""The driver's MLflow side of a search, on a real sqlite store with stand-in trials.

A search's processes split the work: :class:`TrialRunOpener` opens each trial's child run
when the trial is suggested, :class:`TrialRunTracker` logs what Tune receives and closes
runs. The full path (real trials, ASHA, resume) is in ``test_search*.py``; these tests pin
the contracts those rely on: the run id travels in the trial config, epochs are logged
once each (also by a tracker restored on ``--resume``), restarted runs reopen, and the
checkpoint finalised is the best one reported.
"""

from __future__ import annotations

import math
import pickle
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from ray.tune.search import Searcher

from quakeray import tracking
from quakeray.checkpoint import read_history, save_checkpoint
from quakeray.config import load_config
from quakeray.metrics import EPOCH_METRICS, SCORE_METRIC
from quakeray.search.layout import SearchRef
from quakeray.search.runs import (
    CHECKPOINT_KEY,
    close_trial_run,
    finish_orphaned_runs,
)
from quakeray.search.tracker import TrialRunOpener, TrialRunTracker
from quakeray.search.trial_spec import SPEC_KEY, TrialSpec, sample_of, spec_of
from quakeray.tracking.tags import REFERENCE as TAG_REFERENCE
from quakeray.tracking.tags import RESTARTS as TAG_RESTARTS
from quakeray.tracking.tags import STATUS as TAG_STATUS
from quakeray.tracking.tags import TRIAL_ID as TAG_TRIAL

BASE = load_config(None, ["model.backbone=test_resnet"])


class Scripted(Searcher):  # type: ignore[misc]
    """Suggests what it is given, in order: a dict, None (wait) or FINISHED."""

    def __init__(self, suggestions: list[Any]) -> None:
        super().__init__(metric="val_MAE", mode="min")
        self.suggestions = suggestions
        self.completed: list[str] = []

    def suggest(self, trial_id: str) -> Any:
        return self.suggestions.pop(0)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        self.completed.append(trial_id)


TRACKERS: list[TrialRunTracker] = []


@pytest.fixture(autouse=True)
def _drained() -> Any:
    """No test leaves work on a finaliser thread for the next one."""
    yield
    while TRACKERS:
        TRACKERS.pop()._writer().wait()


def _parent(uri: str) -> tuple[str, str]:
    experiment = tracking.get_or_create_experiment(uri, "search-tracking")
    return experiment, tracking.start_run(uri, experiment, run_name="parent")


def _opener(uri: str, suggestions: list[Any]) -> TrialRunOpener:
    experiment, parent = _parent(uri)
    base = load_config(None, ["model.backbone=test_resnet", "search.name=search-tracking"])
    return TrialRunOpener(
        Scripted(suggestions), ref=SearchRef("/runs", uri, experiment, parent), base=base
    )


def _tracker(opener: TrialRunOpener, folder: str = "/runs") -> TrialRunTracker:
    """A tracker of the opener's search, in ``folder`` (its trials train in ``folder/train``)."""
    ref = SearchRef(folder, opener.ref.uri, opener.ref.experiment_id, opener.ref.parent_run_id)
    tracker = TrialRunTracker(ref, base=BASE, metric_names=EPOCH_METRICS)
    TRACKERS.append(tracker)
    return tracker


def _trial(trial_id: str, config: dict[str, Any], error_file: str | None = None) -> Any:
    return SimpleNamespace(trial_id=trial_id, config=config, error_file=error_file)


def _result(epoch: int, val_mae: float, checkpoint: str | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {name: 0.5 for name in EPOCH_METRICS}
    result |= {"epoch": float(epoch), SCORE_METRIC: val_mae, "training_iteration": epoch + 1}
    if checkpoint:
        result[CHECKPOINT_KEY] = checkpoint
    return result


def test_opener_opens_the_run_and_passes_its_id_in_the_config(mlflow_uri: str) -> None:
    opener = _opener(
        mlflow_uri,
        [
            {"loss.margin": 0.5, SPEC_KEY: TrialSpec(role="reference", label="paper")},
            None,
            Searcher.FINISHED,
        ],
    )
    config = opener.suggest("t1")
    assert config is not None and isinstance(config, dict)
    assert sample_of(config) == {"loss.margin": 0.5}  # the markers are not settings
    run = MlflowClient(mlflow_uri).get_run(spec_of(config).run_id)
    assert run.info.status == "RUNNING"
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == opener.ref.parent_run_id
    assert (tags[TAG_TRIAL], tags[TAG_STATUS], tags[TAG_REFERENCE]) == ("t1", "running", "paper")
    assert run.data.params["trial.loss.margin"] == "0.5"
    assert run.data.params["loss.margin"] == "0.5"  # what the trial ran with
    # Every searched field under the same name, also those the sample leaves at the base.
    assert run.data.params["trial.loss.rank_weight"] == "1.0"
    assert "model.backbone" not in run.data.params  # the same for all trials: on the parent
    assert run.info.run_name == "paper"
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.type"] == "LOCAL"
    # "wait" and "finished" pass through and open nothing.
    assert opener.suggest("t2") is None
    assert opener.suggest("t3") == Searcher.FINISHED
    assert len(MlflowClient(mlflow_uri).search_runs([opener.ref.experiment_id])) == 2


def test_opener_records_a_sample_that_breaks_the_config(mlflow_uri: str) -> None:
    opener = _opener(mlflow_uri, [{"optim.epochs": 0}])  # invalid: the trial will fail on it
    config = opener.suggest("t1")
    assert isinstance(config, dict)
    run = MlflowClient(mlflow_uri).get_run(spec_of(config).run_id)
    assert run.data.params["trial.optim.epochs"] == "0"
    assert not any(k.startswith("optim.") for k in run.data.params)


def test_opener_state_survives_pickling_with_the_wrapped_searcher(mlflow_uri: str) -> None:
    opener = _opener(mlflow_uri, [{"loss.margin": 0.1}])
    restored = pickle.loads(pickle.dumps(opener))
    assert restored.get_state() == opener.get_state()
    restored.on_trial_complete("t9")
    assert restored.searcher.completed == ["t9"]


def test_tracker_logs_each_epoch_once_also_after_a_resume(mlflow_uri: str) -> None:
    opener = _opener(mlflow_uri, [{"loss.margin": 0.1}])
    config = opener.suggest("t1")
    assert isinstance(config, dict)
    trial, run_id = _trial("t1", config), spec_of(config).run_id
    tracker = _tracker(opener)
    tracker.on_trial_result(0, [], trial, _result(0, 2.0))
    tracker.on_trial_result(0, [], trial, _result(0, 2.0))  # a repeated report
    tracker.on_trial_result(0, [], trial, _result(1, 1.5))
    # --resume restores the callback from Tune's pickle, caches and all; a fresh one
    # (another driver) learns the logged epochs from MLflow.
    again = _tracker(opener)
    again.on_trial_result(0, [], trial, _result(1, 1.5))
    again.on_trial_result(0, [], trial, _result(2, 1.2))
    client = MlflowClient(mlflow_uri)
    history = client.get_metric_history(run_id, SCORE_METRIC)
    assert [(m.step, m.value) for m in history] == [(0, 2.0), (1, 1.5), (2, 1.2)]
    logged = set(client.get_run(run_id).data.metrics)
    assert logged == set(EPOCH_METRICS)  # Tune's own fields stay out
    assert pickle.loads(pickle.dumps(again)).metric_names == EPOCH_METRICS


def test_tracker_fills_in_epochs_tune_never_passed_on_from_the_checkpoint_history(
    mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opener = _opener(mlflow_uri, [{"loss.margin": 0.1}])
    config = opener.suggest("t1")
    assert isinstance(config, dict)
    trial, run_id = _trial("t1", config), spec_of(config).run_id
    _tracker(opener).on_trial_result(0, [], trial, _result(0, 2.0))
    # Ctrl-C: Train checkpointed epochs 1 and 2, Tune passed neither on; the resumed
    # trial continues from epoch 2's checkpoint and reports epoch 3 with its history.
    history = [_result(epoch, mae) for epoch, mae in enumerate([2.0, 1.5, 1.2, 1.1])]
    history[1]["val_spearman"] = math.nan  # null in JSON; non-finite values are not logged
    folder = save_checkpoint(tmp_path / "ckpt_3", {"epoch": 3}, metrics=history[3], history=history)
    resumed = _tracker(opener, folder=str(tmp_path))
    reads: list[str] = []
    monkeypatch.setattr(
        "quakeray.search.writer.read_history",
        lambda folder: reads.append(str(Path(folder) / "history.json")) or read_history(folder),
    )
    resumed.on_trial_result(0, [], trial, _result(3, 1.1, str(folder)))
    resumed.on_trial_result(0, [], trial, _result(4, 1.0, str(folder)))  # no gap: no reading
    assert reads == [str(folder / "history.json")]  # that file only, once
    client = MlflowClient(mlflow_uri)
    logged = client.get_metric_history(run_id, SCORE_METRIC)
    assert [(m.step, m.value) for m in logged] == [(0, 2.0), (1, 1.5), (2, 1.2), (3, 1.1), (4, 1.0)]
    spearman = {m.step: m.value for m in client.get_metric_history(run_id, "val_spearman")}
    assert 1 not in spearman and spearman[2] == 0.5
    assert set(client.get_run(run_id).data.metrics) == set(EPOCH_METRICS)  # no Tune fields


def test_an_unfillable_gap_is_looked_up_once_and_the_epoch_still_logged(
    mlflow_uri: str, tmp_path: Path
) -> None:
    opener = _opener(mlflow_uri, [{"loss.margin": 0.1}])
    config = opener.suggest("t1")
    assert isinstance(config, dict)
    trial, run_id = _trial("t1", config), spec_of(config).run_id
    tracker = _tracker(opener, folder=str(tmp_path))
    pruned = str(tmp_path / "gone")  # Train pruned it, or it predates history.json
    tracker.on_trial_result(0, [], trial, _result(2, 1.2, pruned))
    tracker.on_trial_result(0, [], trial, _result(3, 1.1, pruned))
    logged = MlflowClient(mlflow_uri).get_metric_history(run_id, SCORE_METRIC)
    assert [m.step for m in logged] == [2, 3]
    assert tracker._writer().writer.gaps_looked_up == {run_id}


def test_runs_of_ended_trials_left_running_are_finished_from_tunes_record(
    mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pandas as pd

    finalized: list[tuple[str, str]] = []
    monkeypatch.setattr(
        "quakeray.tracking.outputs.finalize_run",
        lambda uri, run_id, cfg, ckpt, **kw: finalized.append((run_id, ckpt)),
    )
    suggestions = [{"optim.epochs": 3}, {"optim.epochs": 3}, {"optim.epochs": 3}]
    opener = _opener(mlflow_uri, suggestions)
    done, short, failed = (opener.suggest(t) for t in ("done", "short", "failed"))
    assert isinstance(done, dict) and isinstance(short, dict) and isinstance(failed, dict)

    def result(config: dict[str, Any], maes: list[float], error: Any = None) -> Any:
        rows = [
            _result(e, mae, f"/st/train/{spec_of(config).run_id}/ckpt_{e}")
            for e, mae in enumerate(maes)
        ]
        return SimpleNamespace(config=config, error=error, metrics_dataframe=pd.DataFrame(rows))

    # Tune's record: two trials ended (one before its last epoch), one failed.
    grid = [result(done, [2.0, 1.2, 1.4]), result(short, [2.5]), result(failed, [], "boom")]
    ref = SearchRef("/st", mlflow_uri, opener.ref.experiment_id, opener.ref.parent_run_id)
    n = finish_orphaned_runs(ref, grid, base=BASE)
    assert n == 2
    assert finalized == [
        (spec_of(done).run_id, f"/st/train/{spec_of(done).run_id}/ckpt_1"),
        (spec_of(short).run_id, f"/st/train/{spec_of(short).run_id}/ckpt_0"),
    ]
    client = MlflowClient(mlflow_uri)
    statuses = {
        key: client.get_run(spec_of(config).run_id).data.tags[TAG_STATUS]
        for key, config in (("done", done), ("short", short), ("failed", failed))
    }
    assert statuses == {"done": "completed", "short": "stopped", "failed": "running"}


@pytest.mark.parametrize(
    ("storage", "scheme"), [("/data/search/train", ""), ("s3://bucket/search/train", "s3://")]
)
def test_tracker_finalizes_the_best_reported_checkpoint_and_closes(
    mlflow_uri: str, monkeypatch: pytest.MonkeyPatch, storage: str, scheme: str
) -> None:
    finalized: list[tuple[str, str, int]] = []

    def record(uri: str, run_id: str, cfg: Any, checkpoint: str, **kwargs: Any) -> None:
        finalized.append((run_id, checkpoint, cfg.optim.epochs))

    monkeypatch.setattr("quakeray.tracking.outputs.finalize_run", record)
    opener = _opener(mlflow_uri, [{"optim.epochs": 3}, {"loss.margin": 0.2}])
    done, stopped = opener.suggest("done"), opener.suggest("stopped")
    assert isinstance(done, dict) and isinstance(stopped, dict)
    tracker = _tracker(opener, folder=storage.removesuffix("/train"))
    # Ray reports checkpoint paths without the storage's scheme.
    where = storage.removeprefix(scheme)
    for epoch, value in enumerate([2.0, 1.1, 1.4]):
        ckpt = f"{where}/train-done/checkpoint_{epoch}"
        tracker.on_trial_result(0, [], _trial("done", done), _result(epoch, value, ckpt))
    # ASHA's decision arrives as the stopped trial's last result, marked done.
    tracker.on_trial_result(
        0,
        [],
        _trial("stopped", stopped),
        _result(0, 3.0, f"{where}/train-stopped/checkpoint_0") | {"done": True},
    )
    tracker.on_trial_complete(0, [], _trial("done", done))
    tracker.on_trial_complete(0, [], _trial("stopped", stopped))
    tracker.on_experiment_end([])  # Tune's last call: the finaliser thread drains
    # The best epoch (1), in the storage's scheme; the sample shapes the finalised config
    # (3 epochs, not the base's 10).
    assert finalized == [
        (spec_of(done).run_id, f"{storage}/train-done/checkpoint_1", 3),
        (spec_of(stopped).run_id, f"{storage}/train-stopped/checkpoint_0", 10),
    ]
    client = MlflowClient(mlflow_uri)
    for config, status in ((done, "completed"), (stopped, "stopped")):
        run = client.get_run(spec_of(config).run_id)
        assert (run.info.status, run.data.tags[TAG_STATUS]) == ("FINISHED", status)


def test_tracker_finalizes_in_the_background_until_the_search_waits(
    mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    monkeypatch.setattr(
        "quakeray.tracking.outputs.finalize_run",
        lambda *args, **kwargs: release.wait(timeout=30) or None,
    )
    opener = _opener(mlflow_uri, [{"loss.margin": 0.1}])
    config = opener.suggest("t1")
    assert isinstance(config, dict)
    trial, run_id = _trial("t1", config), spec_of(config).run_id
    tracker = _tracker(opener)
    tracker.on_trial_result(0, [], trial, _result(0, 2.0, "/ckpt/checkpoint_0"))
    tracker.on_trial_complete(0, [], trial)  # returns while finalize_run still runs
    client = MlflowClient(mlflow_uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    assert pickle.loads(pickle.dumps(tracker)).ref.uri == mlflow_uri  # Tune saves it meanwhile
    release.set()
    tracker._writer().wait()
    run = client.get_run(run_id)
    assert (run.info.status, run.data.tags[TAG_STATUS]) == ("FINISHED", "completed")


def test_tracker_reopens_a_restarted_trial_and_records_a_failure(
    mlflow_uri: str, tmp_path: Path
) -> None:
    opener = _opener(mlflow_uri, [{"loss.margin": 0.1}])
    config = opener.suggest("t1")
    assert isinstance(config, dict)
    run_id = spec_of(config).run_id
    tracker = _tracker(opener)
    tracker.on_trial_start(0, [], _trial("t1", config))  # first start: nothing to do
    client = MlflowClient(mlflow_uri)
    assert TAG_RESTARTS not in client.get_run(run_id).data.tags
    close_trial_run(mlflow_uri, run_id, "cancelled")  # the driver was interrupted
    tracker.on_trial_start(0, [], _trial("t1", config))  # --resume restarts the trial
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert (run.data.tags[TAG_STATUS], run.data.tags[TAG_RESTARTS]) == ("running", "1")
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback ...\nRuntimeError: out of memory\n")
    tracker.on_trial_error(0, [], _trial("t1", config, str(error_file)))
    run = client.get_run(run_id)
    assert (run.info.status, run.data.tags[TAG_STATUS]) == ("FAILED", "failed")
    assert run.data.tags["quakeray.error"] == "RuntimeError: out of memory"


def test_tracker_creates_a_run_for_a_trial_that_failed_before_it_had_one(
    mlflow_uri: str,
) -> None:
    opener = _opener(mlflow_uri, [])
    tracker = _tracker(opener)
    tracker.on_trial_error(0, [], _trial("lost", {}))
    (run,) = MlflowClient(mlflow_uri).search_runs(
        [opener.ref.experiment_id], "tags.`quakeray.role` = 'trial'"
    )
    assert (run.data.tags[TAG_TRIAL], run.info.status) == ("lost", "FAILED")
