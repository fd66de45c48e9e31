"""The Optuna study of a real search, read back from its sqlite storage as Optuna's users would.

One TPE search with ASHA, three trials one at a time, two epochs, no reference points,
``optim.lr`` a choice of 1e-2 (learns) and 1e-9 (does not): TPE (seed 0) draws 1e-9,
1e-2, 1e-9. The first trial has no rung to be judged against and completes; the second
learns and completes; the third does as badly as the first did after one epoch and is
stopped there. In the study: the stopped trial is PRUNED, the others COMPLETE, every
trial holds one intermediate value per epoch it ran and names its MLflow run.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from quakeray.config import load_config
from quakeray.search import run_search

pytestmark = pytest.mark.slow

EPOCHS = 2
STUDY = "optuna-test"


def test_stopped_trials_are_pruned_with_their_epochs_and_every_trial_names_its_run(
    ray_local: None, tiny_h5: Path, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = load_config(
        None,
        [
            f"data.path={tiny_h5}",
            f"run.storage_path={tmp_path / 'ray_results'}",
            f"tracking.uri={uri}",
            "model.backbone=test_resnet",
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=0.5",
            "optim.batch_size=8",
            f"optim.epochs={EPOCHS}",
            "tracking.log_model=false",
            "tracking.register_best=false",
            "search.name=optuna-test",
            f"search.study_name={STUDY}",
            f"search.optuna_storage={storage}",
            "search.reference_points=false",
            "search.evaluate_best=false",
            "search.max_concurrent=1",
            "search.num_samples=3",
            "search.grace_period=1",
            "search.reduction_factor=2",
            "search.space={optim.lr: {kind: choice, choices: [1.0e-2, 1.0e-9]}}",
        ],
    )
    summary = run_search(cfg)
    statuses = {r.trial_id: r.status for r in summary.rows}
    assert sorted(statuses.values()) == ["completed", "completed", "stopped"], summary.rows

    client = MlflowClient(tracking_uri=uri)
    trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials()
    assert len(trials) == len(summary.rows)
    assert len({t.user_attrs["mlflow_run_id"] for t in trials}) == len(trials)
    expected = {"completed": TrialState.COMPLETE, "stopped": TrialState.PRUNED}
    for trial in trials:
        attrs = trial.user_attrs
        run = client.get_run(attrs["mlflow_run_id"])  # an existing run of this search
        assert run.info.experiment_id == summary.experiment_id == attrs["mlflow_experiment_id"]
        assert attrs["mlflow_tracking_uri"] == uri
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == summary.parent_run_id
        assert tags["quakeray.trial_id"] == attrs["tune_trial_id"]
        assert float(run.data.params["trial.optim.lr"]) == trial.params["optim.lr"]
        assert trial.state == expected[tags["quakeray.status"]], (trial.number, tags)
        # One intermediate value per epoch the trial ran, keyed by epoch, as MLflow has them.
        history = client.get_metric_history(run.info.run_id, "val_MAE")
        assert trial.intermediate_values == pytest.approx({m.step: m.value for m in history})
        epochs = EPOCHS if trial.state == TrialState.COMPLETE else 1
        assert sorted(trial.intermediate_values) == list(range(epochs))
        # COMPLETE: the last result's value; PRUNED: Optuna's own, the last intermediate.
        assert trial.value == pytest.approx(trial.intermediate_values[epochs - 1])
