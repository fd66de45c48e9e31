"""Trials a killed driver ran but Tune never saved: the resumed search continues them.

A real MLflow store and real checkpoint folders; the integration (a driver SIGKILLed
just after a fast trial, then ``--resume``) is ``test_search_faults.py``.
"""

from __future__ import annotations

from pathlib import Path

from quakeray import tracking
from quakeray.checkpoint import checkpoint_dir_name, save_checkpoint
from quakeray.config import load_config
from quakeray.search.runs import open_trial_run
from quakeray.search.space import REFERENCE_KEY, trial_params
from quakeray.search.state import train_run_dir
from quakeray.search.unsaved import (
    TRAIN_KEY,
    offer_unsaved_trials,
    take_unsaved_trial,
    train_name,
)
from quakeray.tracking import tags


def test_a_trained_run_tune_never_saved_is_continued_by_the_same_suggestion(
    tmp_path: Path,
) -> None:
    base = load_config(None, [])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.get_or_create_experiment(uri, "unsaved")
    parent = tracking.start_run(uri, experiment_id, run_name="search")
    search_dir = str(tmp_path / "search")
    paper = {REFERENCE_KEY: "paper", "loss.margin": 0.02, "loss.rank_weight": 1.0}
    sampled = {"loss.margin": 0.0437, "loss.rank_weight": 1.4}
    runs = {}
    for trial_id, config, trained in [
        ("saved", {REFERENCE_KEY: "mse_only", "loss.rank_weight": 0.0}, True),
        ("unsaved-paper", paper, True),
        ("unsaved-tpe", sampled, True),
        ("never-trained", {"loss.margin": 0.5, "loss.rank_weight": 0.1}, False),
    ]:
        extra = {tags.REFERENCE: config[REFERENCE_KEY]} if REFERENCE_KEY in config else {}
        run_id = open_trial_run(
            uri, experiment_id, parent, trial_id, run_name=trial_id, extra_tags=extra
        )
        tracking.RunLogger(uri, run_id).log_params(trial_params(base, config))
        runs[trial_id] = run_id
        if trained:
            folder = Path(train_run_dir(search_dir, trial_id)) / checkpoint_dir_name(0)
            save_checkpoint(folder, {"config": {}}, metrics={"epoch": 0.0, "val_MAE": 1.0})

    offered = offer_unsaved_trials(
        search_dir, uri, experiment_id, parent, known_run_ids={runs["saved"]}
    )
    assert offered == 2  # Tune knows "saved"; "never-trained" has nothing to continue
    # The restored searcher suggests them again (as a new trial id each): same settings.
    assert take_unsaved_trial(parent, base, dict(sampled)) == (runs["unsaved-tpe"], "unsaved-tpe")
    assert take_unsaved_trial(parent, base, dict(paper)) == (runs["unsaved-paper"], "unsaved-paper")
    assert take_unsaved_trial(parent, base, dict(paper)) is None  # each is continued once
    other = {"loss.margin": 0.5, "loss.rank_weight": 0.1}
    assert take_unsaved_trial(parent, base, other) is None
    # Killed again before Tune saved the continuing trial: its run (now tagged with the
    # new trial id) is offered with the folder it trains in, the first trial's.
    tracking.RunLogger(uri, runs["unsaved-paper"]).set_tags(
        {tags.TRIAL_ID: "continuing", tags.CONTINUES: "unsaved-paper"}
    )
    offer_unsaved_trials(search_dir, uri, experiment_id, parent, known_run_ids={runs["saved"]})
    assert take_unsaved_trial(parent, base, dict(paper)) == (runs["unsaved-paper"], "unsaved-paper")
    # The continuing trial trains in the unsaved one's folder.
    assert train_name("new-id", {TRAIN_KEY: "unsaved-paper"}) == "train-unsaved-paper"
    assert train_name("new-id", {}) == "train-new-id"
