"""The searchers a search's trials come from, chained as Tune drives them.

Chain::

    ConcurrencyLimiter( ReferenceFirst( OptunaSearch(TPE) | GridSearcher ) )

:class:`ReferenceFirst` hands out the reference points (MSE only, and the paper's
point) before the inner searcher proposes anything. They do not go through Optuna's
``enqueue_trial``: Optuna 5 raises ``ValueError: 0.0 is invalid value for the case
log=True`` at ``ask()`` when an enqueued value lies outside a log distribution, which is
exactly the MSE-only point (``rank_weight = 0``) against the default
``loguniform(1e-2, 10)``. Reference results that do lie inside the space are told to
Optuna afterwards, so TPE still learns from them. Each wrapper follows Ray's own
(``ray/tune/search/repeater.py``): a class around ``searcher``, state saved with Tune's.
The TPE searcher is :class:`~quakeray.search.study.StudySearch` (pruned trials, values by
epoch, each trial's MLflow run id as a user attribute: :func:`set_trial_user_attrs`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ray.tune.search import Searcher

from quakeray.compat import set_searcher_objective
from quakeray.config import ExperimentConfig, SpaceParam
from quakeray.errors import SearchError
from quakeray.search.space import (
    ReferencePoint,
    in_distribution,
    optuna_space,
    reference_points,
    space_value,
)
from quakeray.search.trial_spec import SPEC_KEY, TrialSpec

__all__ = [
    "GridSearcher",
    "PointsSearcher",
    "ReferenceFirst",
    "SearcherWrapper",
    "build_searcher",
    "set_trial_user_attrs",
]

log = logging.getLogger(__name__)


def build_searcher(cfg: ExperimentConfig, *, study_name: str, fresh: bool = True) -> Searcher:
    """The searcher chain of a search: concurrency limit, reference points, TPE or grid.

    Args:
        cfg: The resolved search config.
        study_name: Optuna study name (unique per search; see ``search.study_name``).
        fresh: True for a new search: an existing study of that name in a persistent
            storage is then an error rather than silently continued.

    Raises:
        SearchError: The persistent Optuna storage already holds this study, or cannot
            be opened.
    """
    from ray.tune.search import ConcurrencyLimiter

    s = cfg.search
    inner: Searcher
    if s.sampler == "grid":
        inner = GridSearcher(s.space, metric=s.metric, mode=s.mode)
    else:
        import optuna

        from quakeray.runtime import is_verbose
        from quakeray.search.study import StudySearch

        if not is_verbose():  # "A new study created ...": Optuna sets INFO on its import
            optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = _optuna_storage(s.optuna_storage, study_name, fresh=fresh)
        inner = StudySearch(
            space=optuna_space(s.space),
            metric=s.metric,
            mode=s.mode,
            sampler=optuna.samplers.TPESampler(seed=s.seed),
            study_name=study_name,
            storage=storage,
        )
    base = {name: space_value(cfg, name) for name in s.space}
    ref = ReferenceFirst(inner, reference_points(cfg), base_values=base)
    return ConcurrencyLimiter(ref, max_concurrent=s.max_concurrent)


def set_trial_user_attrs(searcher: Searcher, trial_id: str, attrs: Mapping[str, Any]) -> None:
    """Give the trial's Optuna trial these user attributes, wherever it is in the chain.

    Walks the ``searcher`` attributes (Ray's wrappers and quakeray's) to the first
    searcher that keeps them (``set_trial_user_attrs``); a chain without one (the grid)
    ignores them.
    """
    inner: Searcher | None = searcher
    while inner is not None:
        keep = getattr(inner, "set_trial_user_attrs", None)
        if callable(keep):
            keep(trial_id, attrs)
            return
        inner = getattr(inner, "searcher", None)


class SearcherWrapper(Searcher):  # type: ignore[misc]
    """A searcher around another one: everything is forwarded unless a subclass says so.

    Tune saves and restores wrappers through ``get_state``/``set_state`` (it walks the
    ``searcher`` attribute chain), and the innermost searcher through its own
    ``save``/``restore``; a wrapper's state is its attributes but the wrapped searcher.
    """

    transient: tuple[str, ...] = ("searcher",)
    """Attributes left out of the saved state (the wrapped searcher saves itself)."""

    def __init__(self, searcher: Searcher) -> None:
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher = searcher

    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict[str, Any], **spec: Any
    ) -> bool:
        """Forward Tune's metric/mode to the wrapped searcher."""
        ok = bool(self.searcher.set_search_properties(metric, mode, config, **spec))
        set_searcher_objective(self, self.searcher.metric, self.searcher.mode)
        return ok

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        """The wrapped searcher's suggestion."""
        return self.searcher.suggest(trial_id)  # type: ignore[no-any-return]

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Forward to the wrapped searcher."""
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        """Forward to the wrapped searcher."""
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict[str, Any]:
        """Wrapper state for Tune's experiment checkpoint (the wrapped searcher saves itself)."""
        return {k: v for k, v in self.__dict__.items() if k not in self.transient}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore the wrapper state written by :meth:`get_state`."""
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        """Delegate to the wrapped searcher (Tune calls it on the innermost one)."""
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        """Delegate to the wrapped searcher."""
        self.searcher.restore(checkpoint_path)


class ReferenceFirst(SearcherWrapper):
    """Serve fixed reference points first, then delegate to the wrapped searcher.

    Its state (the points served, and to which trials) is saved with Tune's experiment, so
    a resumed search neither repeats nor skips a reference point.
    """

    def __init__(
        self,
        searcher: Searcher,
        points: Sequence[ReferencePoint],
        *,
        base_values: Mapping[str, Any],
    ) -> None:
        super().__init__(searcher)
        self._points = [(p.name, dict(p.values)) for p in points]
        self._next = 0
        self._reference_trials: dict[str, str] = {}
        self._base_values = dict(base_values)
        self._reference_steps: dict[str, dict[int, float]] = {}  # trial id -> epoch -> value
        self._reference_attrs: dict[str, dict[str, Any]] = {}  # trial id -> user attributes

    @property
    def reference_trials(self) -> dict[str, str]:
        """Trial id -> the reference point it was given (mse_only, paper)."""
        return dict(self._reference_trials)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        """The next reference point, else the wrapped searcher's suggestion."""
        if self._next < len(self._points):
            name, values = self._points[self._next]
            self._next += 1
            self._reference_trials[trial_id] = name
            return {**values, SPEC_KEY: TrialSpec(role="reference", label=name)}
        suggestion: dict[str, Any] | None = self.searcher.suggest(trial_id)
        return suggestion

    def set_trial_user_attrs(self, trial_id: str, attrs: Mapping[str, Any]) -> None:
        """A reference trial's attributes wait for its end; others go down the chain."""
        name = self._reference_trials.get(trial_id)
        if name is None:
            set_trial_user_attrs(self.searcher, trial_id, attrs)
        else:
            self._reference_attrs[trial_id] = {**attrs, "reference": name}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Sampled trials' results go to the wrapped searcher; a reference keeps its epochs."""
        if trial_id not in self._reference_trials:
            self.searcher.on_trial_result(trial_id, result)
            return
        value, epoch = result.get(self.metric), result.get("epoch")
        if isinstance(value, (int, float)) and isinstance(epoch, (int, float)):
            self._reference_steps.setdefault(trial_id, {})[int(epoch)] = float(value)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        """Tell the wrapped searcher; reference points only when they lie in its space."""
        name = self._reference_trials.get(trial_id)
        if name is None:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)
            return
        value = (result or {}).get(self.metric)
        if error or value is None or not hasattr(self.searcher, "add_evaluated_point"):
            return
        params = {**self._base_values, **self._reference_values(name)}
        params = {k: params[k] for k in self._base_values}
        if not _inside(self.searcher, params):
            log.info("reference point %s lies outside the space: not told to the sampler", name)
            return
        extra: dict[str, Any] = {}
        if hasattr(self.searcher, "set_trial_user_attrs"):  # StudySearch: values by epoch too
            self.on_trial_result(trial_id, result or {})  # the last epoch, if not told yet
            steps = self._reference_steps.get(trial_id, {})
            attrs = self._reference_attrs.get(trial_id, {"reference": name})
            extra = {"steps": steps, "user_attrs": attrs}
        with contextlib.suppress(NotImplementedError):  # searchers that cannot learn
            self.searcher.add_evaluated_point(params, float(value), **extra)

    def _reference_values(self, name: str) -> dict[str, Any]:
        return next(values for n, values in self._points if n == name)


class PointsSearcher(Searcher):  # type: ignore[misc]
    """Fixed configurations, served in order, then Tune's FINISHED.

    Deterministic; its position is saved with Tune's experiment, so a resumed run neither
    repeats nor skips a point. The grid and a search's seed confirmation are lists of
    points.
    """

    def __init__(self, points: Sequence[Mapping[str, Any]], *, metric: str, mode: str) -> None:
        super().__init__(metric=metric, mode=mode)
        self._points = [dict(p) for p in points]
        self._next = 0

    # Ray annotates suggest() as returning a dict, yet its own FINISHED sentinel is a str.
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        """The next point, or Tune's FINISHED sentinel when none is left."""
        if self._next >= len(self._points):
            return str(self.FINISHED)
        point = self._points[self._next]
        self._next += 1
        return dict(point)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        """Nothing to learn: fixed points do not adapt."""

    def get_state(self) -> dict[str, Any]:
        """The points and the position among them."""
        return dict(self.__dict__)

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore the position among the points."""
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        """Pickle the position (Tune's experiment checkpoint)."""
        import pickle

        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.get_state(), fh)

    def restore(self, checkpoint_path: str) -> None:
        """Read the position back."""
        import pickle

        with open(checkpoint_path, "rb") as fh:
            self.set_state(pickle.load(fh))


class GridSearcher(PointsSearcher):
    """Every combination of the choice parameters, in space order (last key fastest).

    Deterministic and exhaustive, unlike Optuna's GridSampler under ask/tell (random
    order, and an error from ``tell`` after the last point). Used for protocols such as
    every backbone x {MSE, MSE + ranking} x 3 seeds.
    """

    def __init__(self, space: Mapping[str, SpaceParam], *, metric: str, mode: str) -> None:
        names = list(space)
        combos = itertools.product(*(list(p.choices or []) for p in space.values()))
        super().__init__(
            [dict(zip(names, combo, strict=True)) for combo in combos], metric=metric, mode=mode
        )


def _inside(searcher: Searcher, params: Mapping[str, Any]) -> bool:
    """Whether every value lies in the Optuna distribution of its parameter."""
    space = getattr(searcher, "distributions", None)  # StudySearch's; the grid has none
    if not isinstance(space, Mapping):
        return False
    return all(name in space and in_distribution(space[name], v) for name, v in params.items())


def _optuna_storage(url: str, study_name: str, *, fresh: bool) -> Any:
    """An Optuna RDB storage for ``url`` ("" = in memory), refusing to reuse a study."""
    if not url:
        return None
    import optuna

    try:
        storage = optuna.storages.RDBStorage(url)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SearchError(
            f"search.optuna_storage {url!r} cannot be opened: {first[:160]}; "
            "use e.g. sqlite:////abs/path/optuna.db"
        ) from None
    if fresh:
        names = {s.study_name for s in optuna.study.get_all_study_summaries(storage)}
        if study_name in names:
            raise SearchError(
                f"Optuna study {study_name!r} already exists in {url}; set a new "
                "search.study_name (empty = unique per search) or continue it with --resume"
            )
    return storage
