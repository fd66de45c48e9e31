"""Trials a killed driver ran but Tune never saved: the resumed search continues them.

A real MLflow store and real checkpoint folders; the integration (a driver SIGKILLed
just after a fast trial, then ``--resume``) is ``test_search_faults.py``.
"""

from __future__ import annotations

from pathlib import Path

from quakeray import tracking
from quakeray.checkpoint import checkpoint_dir_name, save_checkpoint
from quakeray.config import load_config
from quakeray.search.layout import SearchRef
from quakeray.search.recovery import plan_recovery
from quakeray.search.runs import open_trial_run
from quakeray.search.space import trial_params
from quakeray.search.trial_spec import SPEC_KEY, TrialSpec
from quakeray.tracking import tags


def test_a_trained_run_tune_never_saved_is_continued_by_the_same_suggestion(
    tmp_path: Path,
) -> None:
    base = load_config(None, [])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.get_or_create_experiment(uri, "unsaved")
    parent = tracking.start_run(uri, experiment_id, run_name="search")
    search_dir = str(tmp_path / "search")
    ref = SearchRef(search_dir, uri, experiment_id, parent)
    paper = {
        SPEC_KEY: TrialSpec(role="reference", label="paper"),
        "loss.margin": 0.02,
        "loss.rank_weight": 1.0,
    }
    sampled = {"loss.margin": 0.0437, "loss.rank_weight": 1.4}
    runs = {}
    for trial_id, config, trained in [
        ("saved", {SPEC_KEY: TrialSpec("reference", "mse_only"), "loss.rank_weight": 0.0}, True),
        ("unsaved-paper", paper, True),
        ("unsaved-tpe", sampled, True),
        ("never-trained", {"loss.margin": 0.5, "loss.rank_weight": 0.1}, False),
    ]:
        spec = config.get(SPEC_KEY)
        extra = {tags.REFERENCE: spec.label} if isinstance(spec, TrialSpec) else {}
        run_id = open_trial_run(ref, trial_id, run_name=trial_id, extra_tags=extra)
        tracking.RunLogger(uri, run_id).log_params(trial_params(base, config))
        runs[trial_id] = run_id
        if trained:
            folder = Path(ref.train_dir(trial_id)) / checkpoint_dir_name(0)
            save_checkpoint(folder, {"config": {}}, metrics={"epoch": 0.0, "val_MAE": 1.0})

    plan = plan_recovery(ref, known_run_ids={runs["saved"]})
    assert len(plan.unsaved) == 2  # Tune knows "saved"; "never-trained" has nothing to continue
    # The restored searcher suggests them again (as a new trial id each): same settings.
    assert plan.take(base, dict(sampled))[:2] == (runs["unsaved-tpe"], "unsaved-tpe")  # type: ignore[index]
    assert plan.take(base, dict(paper))[:2] == (runs["unsaved-paper"], "unsaved-paper")  # type: ignore[index]
    assert plan.take(base, dict(paper)) is None  # each is continued once
    other = {"loss.margin": 0.5, "loss.rank_weight": 0.1}
    assert plan.take(base, other) is None
    # Killed again before Tune saved the continuing trial: its run (now tagged with the
    # new trial id) is offered with the folder it trains in, the first trial's.
    tracking.RunLogger(uri, runs["unsaved-paper"]).set_tags(
        {tags.TRIAL_ID: "continuing", tags.CONTINUES: "unsaved-paper"}
    )
    again = plan_recovery(ref, known_run_ids={runs["saved"]})
    taken = again.take(base, dict(paper))
    assert taken is not None and taken[:2] == (runs["unsaved-paper"], "unsaved-paper")
    assert taken.run_name == "unsaved-paper"
    # The continuing trial trains in the unsaved one's folder.
    continuing = TrialSpec(continues="unsaved-paper")
    assert ref.train_name(continuing.train_folder_of("new-id")) == "train-unsaved-paper"
    assert ref.train_name(TrialSpec().train_folder_of("new-id")) == "train-new-id"
