"""The search space, the searcher chain and the scheduler, without a Ray cluster.

The searchers and ASHA are Ray's and Optuna's real classes, driven the way Tune drives
them (suggest / on_trial_result / on_trial_complete, save and restore).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from ray.tune.schedulers import TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from quakeray.compat import optuna_study
from quakeray.config import SpaceParam, load_config
from quakeray.errors import SearchError
from quakeray.search.scheduler import EpochASHA, build_scheduler
from quakeray.search.searchers import GridSearcher, ReferenceFirst, build_searcher
from quakeray.search.space import check_space, optuna_space, reference_points
from quakeray.search.trial_spec import SPEC_KEY, TrialSpec


def test_optuna_space_kinds_and_inclusive_int_bounds() -> None:
    space = optuna_space(
        {
            "loss.margin": SpaceParam(kind="loguniform", low=1e-3, high=1.0),
            "optim.lr": SpaceParam(kind="uniform", low=1e-4, high=1e-3),
            "optim.epochs": SpaceParam(kind="int", low=2, high=5),
            "optim.batch_size": SpaceParam(kind="logint", low=4, high=32),
            "model.backbone": SpaceParam(kind="choice", choices=["test_resnet", "test_vit"]),
        }
    )
    assert space["loss.margin"] == FloatDistribution(1e-3, 1.0, log=True)
    assert space["optim.lr"] == FloatDistribution(1e-4, 1e-3)
    assert space["optim.epochs"] == IntDistribution(2, 5)
    assert space["optim.batch_size"] == IntDistribution(4, 32, log=True)
    assert space["model.backbone"].choices == ("test_resnet", "test_vit")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["search.space={}"], "search.space is empty"),
        (
            ["search.space.optim.epochs={kind: uniform, low: 1, high: 4}"],
            "integer setting; use kind int or logint",
        ),
        (
            ["search.space.optim.lr={kind: uniform, low: 0.0, high: 0.1}"],
            "optim.lr must be > 0",
        ),
        (
            ["search.space.loss.pairing={kind: choice, choices: [halves, sideways]}"],
            "search.space.loss.pairing: value 'sideways' gives an invalid trial",
        ),
        (
            ["search.space.loss.margin={kind: choice, choices: [0.1, -0.5]}"],
            "loss.margin must be >= 0",
        ),
        (
            ["search.space.model.backbone={kind: choice, choices: [[1, 2]]}"],
            "choices must be strings, numbers or booleans",
        ),
        (["search.sampler=grid"], "search.sampler=grid enumerates choices only"),
    ],
)
def test_check_space_rejects_unsearchable_spaces(overrides: list[str], message: str) -> None:
    cfg = load_config(None, overrides)
    with pytest.raises(SearchError, match=message) as info:
        check_space(cfg)
    assert "\n" not in str(info.value)


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


def _trial(tid: str, config: dict[str, object] | None = None) -> SimpleNamespace:
    return SimpleNamespace(trial_id=tid, config=config or {}, status="PENDING")


def test_epoch_asha_stops_weak_trials_but_never_on_their_last_epoch() -> None:
    cfg = load_config(
        None, ["optim.epochs=3", "search.grace_period=1", "search.reduction_factor=2"]
    )
    asha = build_scheduler(cfg)
    assert isinstance(asha, EpochASHA)
    asha.set_search_properties("val_MAE", "min")
    good, bad, late = _trial("good"), _trial("bad"), _trial("late")
    for t in (good, bad, late):
        asha.on_trial_add(None, t)
    # Time is epochs completed (epoch + 1), whatever Tune's own iteration count says.
    assert (
        asha.on_trial_result(None, good, {"epoch": 0.0, "val_MAE": 1.0, "training_iteration": 7})
        == TrialScheduler.CONTINUE
    )
    assert (
        asha.on_trial_result(None, bad, {"epoch": 0.0, "val_MAE": 5.0, "training_iteration": 1})
        == TrialScheduler.STOP
    )
    # A weak result on the last epoch (max_t = 3) ends the trial anyway: no STOP from ASHA.
    asha.on_trial_result(None, late, {"epoch": 0.0, "val_MAE": 0.5, "training_iteration": 1})
    assert (
        asha.on_trial_result(None, late, {"epoch": 2.0, "val_MAE": 9.0, "training_iteration": 3})
        == TrialScheduler.CONTINUE
    )


def test_no_scheduler_when_asha_is_off() -> None:
    assert build_scheduler(load_config(None, ["search.asha=false"])) is None


def test_epoch_asha_never_stops_a_reference_point() -> None:
    asha = build_scheduler(load_config(None, ["optim.epochs=3"]))
    assert asha is not None
    asha.set_search_properties("val_MAE", "min")
    good, baseline = _trial("good"), _trial("mse", {SPEC_KEY: TrialSpec("reference", "mse_only")})
    asha.on_trial_add(None, good)
    asha.on_trial_add(None, baseline)
    asha.on_trial_result(None, good, {"epoch": 0.0, "val_MAE": 1.0})
    decision = asha.on_trial_result(None, baseline, {"epoch": 0.0, "val_MAE": 5.0})
    assert decision == TrialScheduler.CONTINUE


def _variants(*extra: str) -> list[str]:
    return [
        "search.variants={paper: {model.standardize_target: false, loss.pairing: halves}, "
        "ours: {}}",
        "search.space={variant: {kind: choice, choices: [paper, ours]}, "
        "loss.rank_weight: {kind: choice, choices: [0.0, 1.0]}}",
        *extra,
    ]


def test_a_sampled_variant_expands_to_its_settings_and_the_sample_goes_on_top() -> None:
    from quakeray.search.space import trial_config

    cfg = load_config(None, _variants())
    check_space(cfg)
    paper = trial_config(cfg, {"variant": "paper", "loss.rank_weight": 0.0, "_run_id": "x"})
    assert (paper.model.standardize_target, paper.loss.pairing) == (False, "halves")
    assert paper.loss.rank_weight == 0.0
    ours = trial_config(cfg, {"variant": "ours", "loss.rank_weight": 1.0})
    assert (ours.model.standardize_target, ours.loss.pairing) == (True, "all")
    # The sample's own field beats the variant's setting of it.
    both = trial_config(cfg, {"variant": "paper", "loss.pairing": "all"})
    assert both.loss.pairing == "all"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["search.space.variant={kind: choice, choices: [gone]}"],
            "search.space.variant: must be a choice of the names in search.variants (none",
        ),
        (
            _variants("search.space.variant={kind: choice, choices: [paper, other]}"),
            "must be a choice of the names in search.variants (paper, ours)",
        ),
        (
            ["search.variants={v: {model.standardise_target: true}}"],
            "search.variants.v: 'model.standardise_target' is no config field; "
            "did you mean 'model.standardize_target'",
        ),
    ],
)
def test_a_bad_variant_is_one_line_before_any_trial(overrides: list[str], message: str) -> None:
    from quakeray.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_variant_that_makes_an_invalid_trial_is_refused_by_check_space() -> None:
    cfg = load_config(None, _variants("search.variants.ours={optim.lr: 0}"))
    with pytest.raises(SearchError, match=r"search\.space\.variant: value 'ours' gives an invalid"):
        check_space(cfg)
