"""Ray, Tune, Optuna and MLflow where they offer no public way: the one module that knows.

quakeray uses a handful of names that these libraries keep private (a leading
underscore). Each use lives here, behind a function that says what it needs, so that
the next minor release of a library breaks one module, loudly, instead of a search,
silently. :func:`check_versions` refuses, at start-up, a library outside the minor
series this module was tested against (:data:`TESTED`); ``tests/test_compat.py`` holds
one test per assumption made below, and ``tests/test_architecture.py`` fails when a
private name of these libraries is used anywhere else in the package.

Everything is imported inside the functions: a process that never searches never pays
for Tune or Optuna.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Any

from quakeray.errors import DependencyError

if TYPE_CHECKING:
    from ray.tune import Tuner

__all__ = [
    "TESTED",
    "autoscaler_max_resources",
    "check_versions",
    "mlflow_dataset_entity",
    "optuna_completed",
    "optuna_study",
    "optuna_trial",
    "restored_callbacks",
    "restored_scheduler",
    "restored_search_alg",
    "set_searcher_objective",
    "tune_was_interrupted",
]

TESTED: dict[str, str] = {"ray": "2.60", "optuna": "5.0", "mlflow": "3.17"}
"""The minor series of each library this module's assumptions were tested against.

Keep in step with the pins in ``pyproject.toml``; a new series is adopted by running
``tests/test_compat.py`` against it and moving both.
"""


def check_versions(installed: Mapping[str, str] | None = None) -> None:
    """Refuse a Ray, Optuna or MLflow outside the minor series in :data:`TESTED`.

    Args:
        installed: Package -> version, for tests; default: what is installed.

    Raises:
        DependencyError: One line naming each package out of range and the supported
            series.
    """
    found = dict(installed) if installed is not None else _installed_versions()
    wrong = [
        f"{name} {version}"
        for name, version in sorted(found.items())
        if name in TESTED and _minor(version) != TESTED[name]
    ]
    if wrong:
        supported = ", ".join(f"{name} {series}.x" for name, series in sorted(TESTED.items()))
        raise DependencyError(
            f"installed {', '.join(wrong)}, but this quakeray is tested with {supported}; "
            "reinstall it (pip install -e .) to get the supported versions"
        )


def _installed_versions() -> dict[str, str]:
    out = {}
    for name in TESTED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # pyproject requires all three
            continue
    return out


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


# --------------------------------------------------------------------------- Ray core


def autoscaler_max_resources() -> dict[str, float] | None:
    """The most the autoscaler may provide (``max_workers`` of each node type), or None.

    Ray exposes the autoscaler's cluster config only through ``ray._private.state``;
    without an autoscaler (a local Ray) it holds nothing.
    """
    try:
        from ray._private.state import state

        found = state.get_max_resources_from_cluster_config()
    except Exception:  # not connected, or no autoscaler config
        return None
    return {k: float(v) for k, v in found.items()} if found else None


# --------------------------------------------------------------------------- Tune


def set_searcher_objective(searcher: Any, metric: str | None, mode: str | None) -> None:
    """Set a ``Searcher``'s metric and mode (its ``metric``/``mode`` properties are read-only).

    A searcher that wraps another takes them from the wrapped one after Tune set them
    there (``set_search_properties``); Ray's own wrappers do the same to their fields.
    """
    searcher._metric, searcher._mode = metric, mode


def tune_was_interrupted() -> bool:
    """Whether the last ``Tuner.fit`` on this (main) thread returned on Ctrl-C or SIGUSR1.

    Tune reports an interruption only in a log line, and the trials it returns all look
    TERMINATED (it stops live trials on its way out). Its SIGINT handler, installed on the
    main thread for the duration of ``fit``, puts the previous handler back when a signal
    arrives, and stays installed otherwise: its name tells which happened.
    """
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return False
    if int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")):
        return False
    current = signal.getsignal(signal.SIGINT)
    return getattr(current, "__name__", "") != "signal_interrupt_tune_run"


def restored_callbacks(tuner: Tuner) -> list[Any]:
    """The Tune callbacks of a ``Tuner.restore`` d experiment (unpickled from its folder).

    ``Tuner.restore`` takes no callbacks: those the search started with come back from
    the experiment's ``tuner.pkl``, and only the tuner holds them.
    """
    internal: Any = tuner._local_tuner  # None only under Ray Client, which we do not use
    return list(internal.get_run_config().callbacks or [])


def restored_search_alg(tuner: Tuner) -> Any:
    """The search algorithm of a ``Tuner.restore`` d experiment, as the search started it.

    Its saved state (the searcher's position) is put back when ``fit`` starts; what it
    is handed before then (a resumed search's recovery plan) is not part of that state.
    """
    internal: Any = tuner._local_tuner
    return internal._tune_config.search_alg


def restored_scheduler(tuner: Tuner) -> Any:
    """The trial scheduler of a ``Tuner.restore`` d experiment, as the search started it.

    Tune saves no scheduler state: what a resumed search knows of its ended trials is
    handed to this object before ``fit`` (a resumed ASHA's rungs).
    """
    internal: Any = tuner._local_tuner
    return internal._tune_config.scheduler


# --------------------------------------------------------------------------- Optuna search


def optuna_trial(optuna_search: Any, trial_id: str) -> Any:
    """The Optuna trial that ``OptunaSearch`` asked for Tune's ``trial_id``, or None."""
    return optuna_search._ot_trials.get(trial_id)


def optuna_completed(optuna_search: Any) -> set[str]:
    """The Tune trial ids ``OptunaSearch`` already told Optuna about (a live set)."""
    completed: set[str] = optuna_search._completed_trials
    return completed


def optuna_study(optuna_search: Any) -> Any:
    """The ``optuna.Study`` behind an ``OptunaSearch`` (None before Tune set it up)."""
    return optuna_search._ot_study


# --------------------------------------------------------------------------- MLflow


def mlflow_dataset_entity(dataset: Any) -> Any:
    """The ``mlflow.entities.Dataset`` of an ``mlflow.data`` dataset (for ``log_inputs``).

    ``MlflowClient.log_inputs`` takes entities; the dataset classes build theirs only in a
    private method (``mlflow.log_input`` calls it on the fluent API's active run).
    """
    return dataset._to_mlflow_entity()
