"""The search space: what is searched, its checks, variants, without a Ray cluster.

The searchers are in ``test_search_searchers.py``, ASHA in ``test_search_scheduler.py``.
"""

from __future__ import annotations

import pytest
from optuna.distributions import FloatDistribution, IntDistribution

from quakeray.config import SpaceParam, load_config
from quakeray.errors import SearchError
from quakeray.search.space import check_space, optuna_space


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
