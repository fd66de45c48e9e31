"""Trials a killed driver ran but Tune never saved: the resumed search continues them.

A real MLflow store and real checkpoint folders; the integration (a driver SIGKILLed
just after a fast trial, then ``--resume``) is ``test_search_faults.py``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from quakeray import tracking
from quakeray.checkpoint import checkpoint_dir_name, save_checkpoint
from quakeray.config import load_config
from quakeray.search.layout import SearchRef
from quakeray.search.recovery import plan_recovery
from quakeray.search.runs import open_trial_run
from quakeray.search.space import trial_params
from quakeray.search.trial_spec import SPEC_KEY, TrialSpec, spec_of
from quakeray.tracking import tags


def _saved(run_id: str, trial_id: str, *, done: bool, checkpoint: str = "") -> Any:
    """A trial in Tune's saved state, as ``Tuner.restore(...).get_results()`` gives it."""
    last: dict[str, Any] = {"trial_id": trial_id, "done": done, "epoch": 0.0}
    if checkpoint:
        last["checkpoint_path"] = checkpoint
    spec = TrialSpec(run_id=run_id, run_name=trial_id)
    return SimpleNamespace(config={SPEC_KEY: spec}, error=None, metrics=last)


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

    # Tune saved one trial, still running when the driver died: it reruns that one itself.
    saved = [_saved(runs["saved"], "saved", done=False)]
    plan = plan_recovery(ref, saved)
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
    again = plan_recovery(ref, saved)
    taken = again.take(base, dict(paper))
    assert taken is not None and taken[:2] == (runs["unsaved-paper"], "unsaved-paper")
    assert taken.run_name == "unsaved-paper"
    # The continuing trial trains in the unsaved one's folder.
    continuing = TrialSpec(continues="unsaved-paper")
    assert ref.train_name(continuing.train_folder_of("new-id")) == "train-unsaved-paper"
    assert ref.train_name(TrialSpec().train_folder_of("new-id")) == "train-new-id"


def test_the_plan_finishes_ended_trials_runs_and_gives_asha_their_epochs(
    tmp_path: Path,
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.get_or_create_experiment(uri, "ended")
    parent = tracking.start_run(uri, experiment_id, run_name="search")
    ref = SearchRef(str(tmp_path / "search"), uri, experiment_id, parent)
    runs = {t: open_trial_run(ref, t, run_name=t) for t in ("ended", "closed", "unfinished")}
    tracking.end_run(uri, runs["closed"], "FINISHED")  # its writer closed it in time
    history = [{"epoch": 0.0, "val_MAE": 2.0}, {"epoch": 1.0, "val_MAE": 1.5}]
    for trial_id in runs:
        folder = Path(ref.train_dir(trial_id)) / checkpoint_dir_name(1)
        save_checkpoint(folder, {"config": {}}, metrics=history[-1], history=history)
    saved = [
        _saved(runs[t], t, done=t != "unfinished", checkpoint=str(checkpoint))
        for t in runs
        for checkpoint in [Path(ref.train_dir(t)) / checkpoint_dir_name(1)]
    ]
    plan = plan_recovery(ref, saved)
    # Ended and still RUNNING: finished now, from Tune's record; the closed one is left.
    assert [spec_of(r.config).run_id for r in plan.ended] == [runs["ended"]]
    # ASHA's rungs: every ended trial's epochs; the unfinished one reports its own again.
    assert plan.histories == {"ended": history, "closed": history}
    assert plan.unsaved == {}  # Tune knows every run
