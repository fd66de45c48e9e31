"""The search space: what a search varies, the reference points it runs first, and checks.

``search.space`` in the config maps dotted config fields to distributions. This module
checks that every value a distribution can produce makes a valid trial config (before
any trial starts), turns the space into Optuna distributions, and builds a trial's
config from its sample. The reference points (MSE only, the paper's point) are served by
:class:`quakeray.search.searchers.ReferenceFirst`.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quakeray.config import (
    VARIANT_KEY,
    ExperimentConfig,
    SpaceParam,
    describe_param,
    field_type,
    get_dotted,
    with_overrides,
)
from quakeray.errors import ConfigError, SearchError
from quakeray.metrics import EPOCH_METRICS
from quakeray.search.trial_spec import sample_of

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

__all__ = [
    "REFERENCE_POINTS",
    "ReferencePoint",
    "check_metric",
    "check_space",
    "data_for_every_trial",
    "describe_sampler",
    "grid_size",
    "in_distribution",
    "num_trials",
    "optuna_space",
    "reference_points",
    "space_value",
    "trial_config",
    "trial_params",
    "varying_fields",
]

log = logging.getLogger(__name__)


def trial_config(base: ExperimentConfig, config: Mapping[str, Any]) -> ExperimentConfig:
    """A trial's resolved config: the search's config with the trial's sample.

    A sampled ``variant`` expands to its bundle of settings (``search.variants``) first;
    the sample's own fields go on top. Built once per search config and sample: the
    driver asks for a trial's config at each of its events (results, the end, the
    console), and validation costs milliseconds each time.

    Raises:
        ConfigError: The sample breaks the config (a value out of range, a wrong type).
    """
    sample = sample_of(config)
    try:
        key = tuple(sorted(sample.items()))
        hash(key)
    except TypeError:  # an unhashable value (a list): built every time
        return _trial_config(base, sample)
    return _cached_trial_config(_Identity(base), key)


class _Identity:
    """A config keyed by its identity: configs are frozen and never compared by value here."""

    __slots__ = ("value",)

    def __init__(self, value: ExperimentConfig) -> None:
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.value is self.value


@functools.lru_cache(maxsize=4096)
def _cached_trial_config(base: _Identity, sample: tuple[tuple[str, Any], ...]) -> ExperimentConfig:
    return _trial_config(base.value, dict(sample))


def _trial_config(base: ExperimentConfig, sample: dict[str, Any]) -> ExperimentConfig:
    variant = sample.pop(VARIANT_KEY, None)
    settings = dict(base.search.variants[variant]) if variant is not None else {}
    return with_overrides(base, {**settings, **sample})


@dataclass(frozen=True)
class ReferencePoint:
    """A configuration every search evaluates first, so its gain over it shows."""

    name: str  # tag value: "mse_only" | "paper"
    values: dict[str, Any]  # dotted config field -> value


REFERENCE_POINTS: tuple[ReferencePoint, ...] = (
    ReferencePoint("mse_only", {"loss.rank_weight": 0.0}),
    ReferencePoint("paper", {"loss.margin": 0.02, "loss.rank_weight": 1.0}),
)
"""The regression-only baseline and the paper's joint loss (margin 0.02, weight 1)."""


def check_space(cfg: ExperimentConfig) -> None:
    """Reject a space that cannot be searched, before Ray or any trial starts.

    ``config.validate_space`` already rejects unknown fields and bad bounds; this adds
    what needs the whole config: an empty space, a float distribution over an integer
    field, choices of a type Optuna cannot store, a grid over non-choice parameters,
    and any bound or choice that makes an invalid trial config (e.g. ``optim.lr`` from 0).

    Raises:
        SearchError: One line naming the parameter and the fix.
    """
    space = cfg.search.space
    if not space:
        raise SearchError(
            "search.space is empty; open at least one field, e.g. "
            "search.space.loss.margin={kind: loguniform, low: 0.001, high: 1.0}"
        )
    for name, param in space.items():
        where = f"search.space.{name}"
        if param.kind in ("uniform", "loguniform") and field_type(name) is int:
            raise SearchError(
                f"{where}: {name} is an integer setting; use kind int or logint, not {param.kind}"
            )
        if cfg.search.sampler == "grid" and param.kind != "choice":
            raise SearchError(
                f"{where}: search.sampler=grid enumerates choices only; "
                f"make it a choice list instead of {describe_param(param)}"
            )
        for value in _probe_values(param):
            if param.kind == "choice" and not isinstance(value, (str, int, float, bool)):
                raise SearchError(
                    f"{where}: choice {value!r} is a {type(value).__name__}; "
                    "choices must be strings, numbers or booleans"
                )
            try:
                trial_config(cfg, {name: value})
            except ConfigError as exc:
                raise SearchError(
                    f"{where}: value {value!r} gives an invalid trial: {exc}"
                ) from None


def optuna_space(space: Mapping[str, SpaceParam]) -> dict[str, BaseDistribution]:
    """Optuna distributions for ``search.space`` (integer bounds inclusive)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, BaseDistribution] = {}
    for name, p in space.items():
        if p.kind == "choice":
            out[name] = CategoricalDistribution(list(p.choices or []))
        elif p.kind in ("uniform", "loguniform"):
            out[name] = FloatDistribution(_num(p.low), _num(p.high), log=p.kind == "loguniform")
        else:
            out[name] = IntDistribution(
                math.ceil(_num(p.low)), math.floor(_num(p.high)), log=p.kind == "logint"
            )
    return out


def in_distribution(distribution: BaseDistribution, value: Any) -> bool:
    """Whether ``value`` is one that ``distribution`` can produce (bounds, step, choices).

    Read from the distributions' public fields: Optuna's own check is private.
    """
    from optuna.distributions import CategoricalDistribution

    if isinstance(distribution, CategoricalDistribution):
        return value in distribution.choices
    low, high = getattr(distribution, "low", None), getattr(distribution, "high", None)
    if low is None or high is None or not isinstance(value, (int, float)):
        return False
    if isinstance(value, bool) or not low <= value <= high:
        return False
    step = getattr(distribution, "step", None)
    if not step:
        return True
    steps = (value - low) / step
    return math.isclose(steps, round(steps), abs_tol=1e-8)


def grid_size(space: Mapping[str, SpaceParam]) -> int:
    """Number of points of the full grid over choice parameters."""
    return math.prod(len(p.choices or []) for p in space.values())


def reference_points(cfg: ExperimentConfig) -> list[ReferencePoint]:
    """The reference points this search runs first ([] when switched off).

    In a space over ``variant`` they run under its first choice, so that every trial of
    the search names the variant it ran.
    """
    if not cfg.search.reference_points:
        return []
    if VARIANT_KEY not in cfg.search.space:
        return list(REFERENCE_POINTS)
    variant = space_value(cfg, VARIANT_KEY)
    return [ReferencePoint(p.name, {VARIANT_KEY: variant, **p.values}) for p in REFERENCE_POINTS]


def data_for_every_trial(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config whose prepared data serves every trial: statistics when any normalises.

    A variant or a searched ``data.normalize`` may turn normalisation on where the
    search's own config has it off; the driver computes the statistics once for all.
    """
    normalize = "data.normalize"
    space = cfg.search.space.get(normalize)
    wanted = (
        cfg.data.normalize
        or any(settings.get(normalize) is True for settings in cfg.search.variants.values())
        or (space is not None and True in (space.choices or []))
    )
    if wanted == cfg.data.normalize:
        return cfg
    return with_overrides(cfg, {normalize: True})


def space_value(cfg: ExperimentConfig, name: str) -> Any:
    """The search config's own value of a searched key (``variant``: its first choice)."""
    if name == VARIANT_KEY:
        return (cfg.search.space[VARIANT_KEY].choices or [None])[0]
    return get_dotted(cfg, name)


def varying_fields(cfg: ExperimentConfig) -> set[str]:
    """Config fields whose value can differ between a search's trials.

    The searched fields, those the reference points set, and every field a variant
    bundle sets when ``variant`` is searched. The others are the same in every trial: the
    parent run holds them once.
    """
    fields = {k for k in _compared(cfg) if k != VARIANT_KEY}
    if VARIANT_KEY in cfg.search.space:
        fields |= {k for bundle in cfg.search.variants.values() for k in bundle}
    return fields


def trial_params(cfg: ExperimentConfig, config: Mapping[str, Any]) -> dict[str, Any]:
    """``trial.<field>`` for every compared field: the trial's sample, else the base value.

    Compared: the searched fields and those the reference points set.

    A reference point does not vary every searched field (MSE only sets no margin): it
    still logs the value it ran with, under the same name, so MLflow's tables and charts
    compare like with like.
    """
    sample = sample_of(config)
    fields = {k: space_value(cfg, k) for k in _compared(cfg)} | sample  # + a seed check's seed
    return {f"trial.{k}": v for k, v in fields.items()}


def _compared(cfg: ExperimentConfig) -> list[str]:
    """The fields trials differ in: the space's, then the reference points' (in order)."""
    keys = list(cfg.search.space)
    for point in reference_points(cfg):
        keys += [k for k in point.values if k not in keys]
    return keys


def describe_sampler(cfg: ExperimentConfig) -> str:
    """One-line description of the sampler, for the parent run's params."""
    if cfg.search.sampler == "grid":
        return f"grid({grid_size(cfg.search.space)} points, in space order)"
    return f"optuna.TPESampler(seed={cfg.search.seed})"


# --------------------------------------------------------------------------- helpers


def _probe_values(param: SpaceParam) -> list[Any]:
    """Values worth validating: every choice, or both bounds (as ints for int kinds)."""
    if param.kind == "choice":
        return list(param.choices or [])
    low, high = _num(param.low), _num(param.high)
    if param.kind in ("int", "logint"):
        return [math.ceil(low), math.floor(high)]
    return [low, high]


def _num(value: float | None) -> float:
    if value is None:  # validate_space guarantees bounds; keeps mypy honest
        raise SearchError("search.space: a numeric distribution needs low and high")
    return float(value)


def check_metric(cfg: ExperimentConfig) -> None:
    """``search.metric`` must be one the trials report (else Tune fails every trial).

    Raises:
        SearchError: Unknown metric, with a did-you-mean.
    """
    if cfg.search.metric in EPOCH_METRICS:
        return
    lower = {name.lower(): name for name in EPOCH_METRICS}
    close = difflib.get_close_matches(cfg.search.metric.lower(), list(lower), n=1)
    hint = (
        f"; did you mean '{lower[close[0]]}'?"
        if close
        else f"; use one of {', '.join(EPOCH_METRICS)}"
    )
    raise SearchError(f"search.metric {cfg.search.metric!r} is not reported by trials{hint}")


def num_trials(cfg: ExperimentConfig) -> int:
    """Trials to run: ``num_samples``, capped by the grid size for a grid search."""
    s = cfg.search
    if s.sampler != "grid":
        return s.num_samples
    available = grid_size(s.space) + len(reference_points(cfg))
    if s.num_samples > available:
        log.warning(
            "grid holds %d points; running %d trials, not %d", available, available, s.num_samples
        )
    return min(s.num_samples, available)
