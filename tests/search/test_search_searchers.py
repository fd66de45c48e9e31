"""The searcher chain: reference points first, then TPE (learning inside its space) or a grid."""

from __future__ import annotations

import pickle
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from ray.tune.search.optuna import OptunaSearch

from quakeray.compat import optuna_study
from quakeray.config import SpaceParam, load_config
from quakeray.errors import SearchError
from quakeray.search.searchers import GridSearcher, ReferenceFirst, build_searcher
from quakeray.search.space import check_space, reference_points
from quakeray.search.trial_spec import SPEC_KEY, TrialSpec


def test_optuna_refuses_the_mse_only_point_in_a_log_space() -> None:
    """Why ReferenceFirst exists: Optuna 5 cannot enqueue rank_weight=0 in loguniform."""
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    study.enqueue_trial({"loss.rank_weight": 0.0})
    with pytest.raises(ValueError, match="invalid value for the case log=True"):
        study.ask(fixed_distributions={"loss.rank_weight": FloatDistribution(1e-2, 10, log=True)})


def test_reference_points_first_then_tpe_and_learning_only_inside_the_space() -> None:
    cfg = load_config(None, ["search.max_concurrent=4"])
    limiter = build_searcher(cfg, study_name="t")
    ref: ReferenceFirst = limiter.searcher
    optuna_search: OptunaSearch = ref.searcher

    first, second, third = (limiter.suggest(f"t{i}") for i in range(3))
    assert first == {"loss.rank_weight": 0.0, SPEC_KEY: TrialSpec("reference", "mse_only")}
    assert second == {
        "loss.margin": 0.02,
        "loss.rank_weight": 1.0,
        SPEC_KEY: TrialSpec("reference", "paper"),
    }
    assert SPEC_KEY not in third
    assert 1e-3 <= third["loss.margin"] <= 1.0 and 1e-2 <= third["loss.rank_weight"] <= 10

    limiter.on_trial_result("t0", {"val_MAE": 2.0, "training_iteration": 1})
    limiter.on_trial_complete("t0", {"val_MAE": 2.0, "training_iteration": 1})
    limiter.on_trial_complete("t1", {"val_MAE": 1.5, "training_iteration": 1})
    limiter.on_trial_complete("t2", {"val_MAE": 1.7, "training_iteration": 1})
    trials = optuna_study(optuna_search).get_trials()
    told = sorted(
        (t.params["loss.margin"], t.params["loss.rank_weight"], t.value)
        for t in trials
        if t.state == optuna.trial.TrialState.COMPLETE
    )
    # The paper's point (inside the space) taught TPE; MSE only (weight 0) could not.
    assert (0.02, 1.0, 1.5) in told
    assert len(told) == 2
    assert all(t.params.get("loss.rank_weight") != 0.0 for t in trials)


def test_searcher_chain_state_survives_save_and_restore(tmp_path: Path) -> None:
    """Tune pickles the wrappers' get_state and the inner searcher's save (restore path)."""
    cfg = load_config(None, ["search.max_concurrent=4"])
    limiter = build_searcher(cfg, study_name="t")
    for i in range(3):
        limiter.suggest(f"t{i}")
    ref_state = pickle.loads(pickle.dumps(limiter.searcher.get_state()))
    limiter.searcher.searcher.save(str(tmp_path / "inner.pkl"))

    again = build_searcher(cfg, study_name="t")
    again.searcher.set_state(ref_state)
    again.searcher.searcher.restore(str(tmp_path / "inner.pkl"))
    nxt = again.searcher.suggest("t3")
    assert SPEC_KEY not in nxt  # the reference points are not served twice
    assert again.searcher.reference_trials == {"t0": "mse_only", "t1": "paper"}


def test_grid_searcher_enumerates_in_space_order_and_finishes() -> None:
    space = {
        "optim.seed": SpaceParam(kind="choice", choices=[1, 2]),
        "loss.rank_weight": SpaceParam(kind="choice", choices=[0.0, 1.0]),
    }
    grid = GridSearcher(space, metric="val_MAE", mode="min")
    points = [grid.suggest(f"t{i}") for i in range(4)]
    assert points == [
        {"optim.seed": 1, "loss.rank_weight": 0.0},
        {"optim.seed": 1, "loss.rank_weight": 1.0},
        {"optim.seed": 2, "loss.rank_weight": 0.0},
        {"optim.seed": 2, "loss.rank_weight": 1.0},
    ]
    assert grid.suggest("t4") == GridSearcher.FINISHED


def test_grid_sampler_config_builds_a_grid_chain_without_reference_points() -> None:
    cfg = load_config(
        None,
        [
            "search.sampler=grid",
            "search.reference_points=false",
            "search.space={loss.rank_weight: {kind: choice, choices: [0.0, 1.0]}}",
        ],
    )
    check_space(cfg)
    assert reference_points(cfg) == []
    chain = build_searcher(cfg, study_name="g")
    assert isinstance(chain.searcher.searcher, GridSearcher)
    assert chain.suggest("a") == {"loss.rank_weight": 0.0}


def test_persistent_optuna_study_is_not_silently_reused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = load_config(None, [f"search.optuna_storage={url}"])
    chain = build_searcher(cfg, study_name="search-a")
    chain.suggest("t0")
    assert "search-a" in {s.study_name for s in optuna.get_all_study_summaries(url)}
    with pytest.raises(SearchError, match="already exists"):
        build_searcher(cfg, study_name="search-a", fresh=True)
    build_searcher(cfg, study_name="search-a", fresh=False)  # resuming reuses it
