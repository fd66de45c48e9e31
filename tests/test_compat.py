"""Every assumption ``quakeray/compat.py`` makes about Ray, Tune, Optuna and MLflow, tested.

One test per private name it uses, against the installed libraries: a new minor release
that moves one fails here, by name, instead of in a search.
"""

from __future__ import annotations

import inspect
import signal
from pathlib import Path
from typing import Any

import optuna
import pytest
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from quakeray import compat
from quakeray.errors import DependencyError


def test_the_installed_libraries_are_the_tested_series() -> None:
    compat.check_versions()  # the pins in pyproject.toml and compat.TESTED agree
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    for name, series in compat.TESTED.items():
        major, minor = (int(p) for p in series.split("."))
        assert f'>={series},<{major}.{minor + 1}"' in pyproject, name


def test_a_library_outside_the_tested_series_is_refused_in_one_line() -> None:
    with pytest.raises(DependencyError) as caught:
        compat.check_versions({"ray": "2.61.0", "optuna": "5.0.1", "mlflow": "3.17.2"})
    message = str(caught.value)
    assert "ray 2.61.0" in message and "ray 2.60.x" in message and "\n" not in message
    assert "optuna 5.0.1" not in message  # a patch release of the tested series is fine


def test_the_cli_refuses_an_untested_library(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from quakeray import cli

    monkeypatch.setattr(compat, "_installed_versions", lambda: {"optuna": "6.1.0"})
    assert cli.main(["report", "nothing"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quakeray: error: installed optuna 6.1.0") and "\n" not in err


def test_autoscaler_resources_come_from_rays_private_state(ray_local: None) -> None:
    from ray._private.state import state

    assert callable(state.get_max_resources_from_cluster_config)
    assert compat.autoscaler_max_resources() is None  # a local Ray has no autoscaler


def test_a_searchers_objective_is_its_private_metric_and_mode() -> None:
    searcher = Searcher(metric="a", mode="max")
    compat.set_searcher_objective(searcher, "val_MAE", "min")
    assert (searcher.metric, searcher.mode) == ("val_MAE", "min")


def test_tunes_sigint_handler_is_known_by_its_name() -> None:
    import ray.tune.tune as tune_module

    assert "def signal_interrupt_tune_run" in inspect.getsource(tune_module)

    def signal_interrupt_tune_run(signum: int, frame: Any) -> None:  # Tune's, still installed
        raise AssertionError("not called")

    previous = signal.signal(signal.SIGINT, signal_interrupt_tune_run)
    try:
        assert compat.tune_was_interrupted() is False
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Tune put it back: a signal
        assert compat.tune_was_interrupted() is True
    finally:
        signal.signal(signal.SIGINT, previous)


def _space() -> dict[str, Any]:
    return {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}


def test_optuna_search_keeps_its_trials_study_and_completed_set() -> None:
    search = OptunaSearch(space=_space(), metric="loss", mode="min", seed=0)
    config = search.suggest("t1")
    assert 0.0 <= config["x"] <= 1.0
    trial = compat.optuna_trial(search, "t1")
    assert isinstance(trial, optuna.trial.Trial)
    assert compat.optuna_trial(search, "never") is None
    study = compat.optuna_study(search)
    assert isinstance(study, optuna.Study)
    completed = compat.optuna_completed(search)
    assert isinstance(completed, set) and "t1" not in completed
    search.on_trial_complete("t1", {"loss": 0.5})
    assert "t1" in compat.optuna_completed(search)
    assert [t.value for t in study.get_trials()] == [0.5]


def test_mlflow_datasets_build_their_entity(tmp_path: Path) -> None:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    (tmp_path / "q.h5").write_bytes(b"x")
    with pytest.warns(UserWarning, match="interpreted in multiple ways"):  # a local file
        source = resolve_dataset_source(str(tmp_path / "q.h5"))
    dataset = MetaDataset(source, name="q/train", digest="abc")  # type: ignore[abstract]
    entity = compat.mlflow_dataset_entity(dataset)
    assert (entity.name, entity.digest) == ("q/train", "abc")


class _Callback(tune.Callback):  # type: ignore[misc]
    """A callback the restored experiment must give back."""


def _trainable(config: dict[str, Any]) -> None:
    tune.report({"loss": float(config["x"])})


def test_a_restored_tuner_gives_back_its_search_alg_and_callbacks(
    ray_local: None, tmp_path: Path
) -> None:
    search_alg = ConcurrencyLimiter(
        OptunaSearch(space=_space(), metric="loss", mode="min", seed=0), max_concurrent=1
    )
    tuner = tune.Tuner(
        _trainable,
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=ASHAScheduler(metric="loss", mode="min", max_t=2),
            num_samples=2,
        ),
        run_config=tune.RunConfig(
            name="compat", storage_path=str(tmp_path), callbacks=[_Callback()]
        ),
    )
    assert [type(c) for c in compat.restored_callbacks(tuner)] == [_Callback]
    tuner.fit()
    restored = tune.Tuner.restore(str(tmp_path / "compat"), _trainable)
    assert [type(c) for c in compat.restored_callbacks(restored)] == [_Callback]
    assert isinstance(compat.restored_search_alg(restored), ConcurrencyLimiter)
    assert isinstance(compat.restored_scheduler(restored), ASHAScheduler)


def test_a_deprecation_in_an_api_quakeray_calls_fails_the_test() -> None:
    """pyproject's filterwarnings: a library's deprecation, warned at its caller in quakeray."""
    import warnings

    def old_api() -> None:
        warnings.warn("old_api is deprecated", DeprecationWarning, stacklevel=2)

    caller = compile("old_api()", "quakeray/caller.py", "exec")
    with pytest.raises(DeprecationWarning, match="old_api is deprecated"):
        exec(caller, {"__name__": "quakeray.caller", "old_api": old_api})
    with warnings.catch_warnings(record=True):  # the same call from elsewhere only shows
        exec(caller, {"__name__": "elsewhere", "old_api": old_api})
