"""Typed experiment configuration: defaults, YAML files, ``key=value`` overrides, validation.

The dataclasses below are the documentation of every setting: one commented line each.
An experiment file (``experiments/*.yaml``; it may ``extends:`` another, see
:mod:`quakeray.config_files`) is a partial mapping over these defaults, and
command-line overrides (``loss.margin=0.05``) go on top, in that order. The resolved
config is validated once, here, so the rest of the code can trust it.

Example:
    >>> cfg = load_config(None, ["loss.margin=0.05", "optim.epochs=3"])
    >>> cfg.loss.margin
    0.05
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import TypeAdapter, ValidationError

from quakeray.config_files import read_yaml
from quakeray.errors import ConfigError

__all__ = [
    "VARIANT_KEY",
    "DataConfig",
    "ExperimentConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "Pairing",
    "Precision",
    "RunConfig",
    "ScalingConfig",
    "SearchConfig",
    "SpaceKind",
    "SpaceParam",
    "TrackingConfig",
    "describe_param",
    "dump_config",
    "field_paths",
    "field_type",
    "flatten",
    "from_dict",
    "get_dotted",
    "load_config",
    "replace",
    "to_dict",
    "validate_config",
    "validate_space",
    "with_overrides",
]

Pairing = Literal["halves", "all", "global"]
"""How the ranking term pairs samples: the paper's ``halves`` (i with i + B/2, ties count
as +1), ``all`` (every i < j pair in the local batch, ties excluded) or ``global`` (every
pair across all data-parallel workers)."""

Precision = Literal["fp32", "bf16", "fp16"]
SpaceKind = Literal["uniform", "loguniform", "int", "logint", "choice"]


@dataclass
class DataConfig:
    """Where the samples come from and how they are transformed."""

    path: str = ""  # QuakeSet-format HDF5 file; "" = generate one under run.storage_path/data
    synthetic_events: int = 64  # events in the generated file (used when path is "")
    synthetic_size: int = 64  # patch side in pixels of the generated file
    synthetic_seed: int = 0  # seed of the generated file
    positives_only: bool = False  # drop the (before, pre) negatives
    # Share of the train split's events used: a subsample stratified by magnitude, drawn
    # with optim.seed (so seeds also vary the subsample); val and test never change.
    train_fraction: float = 1.0
    nan_fill: float = 0.0  # value for NaN pixels (torchgeo uses 0)
    to_db: bool = True  # linear backscatter -> 10*log10(x + db_eps)
    db_eps: float = 1e-9  # keeps log10 finite on zero / filled pixels
    normalize: bool = True  # per-channel standardisation with train-split statistics
    stats_path: str = ""  # statistics JSON; "" = "<path>.stats.json" beside the data file
    flips: bool = True  # random horizontal/vertical flips (training split only)
    image_size: int = 0  # resize to image_size x image_size; 0 = native size
    loader_workers: int = 0  # DataLoader worker processes per training worker


@dataclass
class ModelConfig:
    """The timm backbone and its magnitude head."""

    backbone: str = "test_resnet"  # timm model name or a preset (mobilenetv3, convnextv2, ...)
    pretrained: bool = False  # load weights from the local cache only; never a hub download
    weights_path: str = ""  # weights file for pretrained=true; "" = the local HF/torch cache
    clamp_in_forward: bool = False  # the paper's clamp to [0, 10] in training too (zeroes grads)
    drop_rate: float = 0.0  # dropout before the head
    # The head predicts (magnitude - mean) / std of the train targets and the model adds
    # them back, so predictions leave the model in magnitude units from the first step;
    # the statistics travel in the weights. false: the paper's raw head.
    standardize_target: bool = True


@dataclass
class LossConfig:
    """Joint loss ``MSE + rank_weight * margin_ranking(margin)``."""

    margin: float = 0.02  # margin of the ranking hinge (paper: 0.02)
    rank_weight: float = 1.0  # lambda; 0 = plain MSE regression (paper: 1.0)
    pairing: Pairing = "all"  # halves (paper) | all | global (across workers)


@dataclass
class OptimConfig:
    """AdamW + OneCycleLR with the paper's defaults."""

    epochs: int = 10  # passes over the training split
    batch_size: int = 16  # global batch per step, split evenly over the workers
    eval_batch_size: int = 0  # validation batch per worker; 0 = batch_size per worker
    lr: float = 1e-4  # peak learning rate of the one-cycle schedule
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    pct_start: float = 0.1  # fraction of steps spent warming up
    div_factor: float = 1e9  # initial lr = lr / div_factor
    final_div_factor: float = 1e4  # final lr = initial lr / final_div_factor
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping
    precision: Precision = "fp32"  # bf16 / fp16 autocast on GPU
    seed: int = 42  # model init, shuffling and flips (offset by rank where needed)


@dataclass
class ScalingConfig:
    """How one training run maps onto Ray workers."""

    num_workers: int = 2  # data-parallel Ray Train workers; 0 = run in-process (no Ray workers)
    use_gpu: bool = False  # one GPU per worker, NCCL backend
    cpus_per_worker: float = 0.5  # logical CPUs reserved per worker (fractions are fine)
    gpus_per_worker: float = 1.0  # GPUs per worker when use_gpu
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    max_failures: int = 1  # worker-group restarts from the last checkpoint before giving up
    # Seconds between the Train controller's collections of worker reports. Workers hold
    # one unconsumed report, so Ray's default (2 s) throttles epochs shorter than that and
    # adds up to 4 s to every run's end. Failure detection has its own timeout.
    poll_interval_s: float = 0.5


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "quakeray"  # MLflow experiment name
    run_name: str = ""  # "" = generated from backbone and time
    log_model: bool = True  # log the best model with mlflow.pytorch.log_model
    register_best: bool = True  # a search registers its best model: models:/<name>@champion


@dataclass
class RunConfig:
    """Where a run keeps its state, and which Ray cluster runs it."""

    name: str = ""  # run name (Ray storage folder); "" = generated
    storage_path: str = "ray_results"  # checkpoints and Tune state; s3://... or NFS on clusters
    checkpoints_to_keep: int = 2  # best k by checkpoint_metric, plus the latest (to resume)
    # What ranks a run's checkpoints (lower is better): the best one is the model a run
    # or trial stands for. val_MAE here; the paper's code kept the best val_loss.
    checkpoint_metric: Literal["val_MAE", "val_loss"] = "val_MAE"
    ray_address: str = ""  # "" = $RAY_ADDRESS, else start a local Ray
    num_cpus: int = 0  # logical CPUs of a local Ray; 0 = max(os.cpu_count(), what jobs need)


@dataclass
class SpaceParam:
    """One searched setting: a distribution over a config field."""

    kind: SpaceKind  # uniform | loguniform | int | logint | choice
    low: float | None = None  # lower bound (not for choice)
    high: float | None = None  # upper bound (not for choice)
    choices: list[Any] | None = None  # values (choice only)


def _default_space() -> dict[str, SpaceParam]:
    return {
        "loss.margin": SpaceParam(kind="loguniform", low=1e-3, high=1.0),
        "loss.rank_weight": SpaceParam(kind="loguniform", low=1e-2, high=10.0),
    }


@dataclass
class SearchConfig:
    """Ray Tune + Optuna + ASHA."""

    name: str = "search"  # search name: the MLflow experiment and the Tune folder
    num_samples: int = 8  # trials, the reference points included
    max_concurrent: int = 1  # trials at once; bounded by what the cluster holds
    metric: str = "val_MAE"  # reported metric to optimise
    mode: Literal["min", "max"] = "min"
    seed: int = 0  # Optuna TPE sampler seed
    sampler: Literal["tpe", "grid"] = "tpe"  # Optuna TPE, or every combination of choice params
    # Searched fields -> distributions. A space written in a file or override replaces this
    # default (the space written is the space searched); override entries add to the file's.
    space: dict[str, SpaceParam] = field(default_factory=_default_space)
    # Named bundles of settings, e.g. {faithful: {model.clamp_in_forward: true, ...},
    # improved: {...}}; the space picks one with the key "variant" (a choice of names).
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    reference_points: bool = True  # evaluate MSE-only and the paper's point first
    asha: bool = True  # early stopping with ASHA
    grace_period: int = 1  # epochs before ASHA may stop a trial
    reduction_factor: int = 2  # ASHA keeps 1/reduction_factor at each rung
    trial_cpus: float = 1.0  # logical CPUs of the trial driver (workers reserve their own)
    # A 1-worker trial trains in the trial's own process, kept warm for the next trial: no
    # Train worker group to start (false: Ray Train's worker group, as multi-worker trials).
    in_process_trials: bool = True
    optuna_storage: str = ""  # persistent Optuna storage (sqlite:///... or a DB URL); "" = memory
    study_name: str = ""  # Optuna study name; "" = the search folder name (unique per search)
    top_k: int = 5  # trials listed in the final table
    evaluate_best: bool = True  # evaluate the best trial on the test split
    test_trials: bool = False  # evaluate every trial's best checkpoint on test (paper tables)
    log_trial_models: bool = False  # each trial logs its model (the best is registered anyway)
    # Each trial's validation figures (scatter, errors per bin), drawn by the trial itself
    # for its best epoch and logged by the driver; false for very large searches.
    trial_figures: bool = True
    # At the end, train the MSE-only point, the paper's point and the best configuration
    # again on confirm_seeds fresh seeds (optim.seed + 1, + 2, ...), evaluate them on test,
    # and say whether the ranking term's gain is beyond seed noise.
    confirm: bool = False
    confirm_seeds: int = 3


@dataclass
class ExperimentConfig:
    """Everything one training run or search needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    search: SearchConfig = field(default_factory=SearchConfig)


_ADAPTER = TypeAdapter(ExperimentConfig)
_T = TypeVar("_T")


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), *, validate: bool = True
) -> ExperimentConfig:
    """Read defaults, then a YAML file, then ``key=value`` overrides, and validate.

    Args:
        path: YAML experiment file, or None for the defaults alone.
        overrides: Dotted ``section.field=value`` strings; values are parsed as YAML.
        validate: Run the semantic checks of :func:`validate_config`.

    Returns:
        The resolved configuration.

    Raises:
        ConfigError: The file is missing or malformed, a key is unknown, a value has the
            wrong type or is out of range.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(Path(path))
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value, source=f"override {item!r}")
    cfg = from_dict(raw, source=str(path) if path else "overrides")
    if validate:
        validate_config(cfg)
    return cfg


def from_dict(raw: Mapping[str, Any], *, source: str = "config") -> ExperimentConfig:
    """Build a config from a (partial) nested mapping, rejecting unknown keys.

    Args:
        raw: Nested mapping, e.g. from YAML or a checkpoint.
        source: Where the mapping came from, for error messages.

    Raises:
        ConfigError: Unknown key (with a did-you-mean) or a value of the wrong type.
    """
    _check_keys(raw, ExperimentConfig, prefix="", source=source)
    try:
        return _ADAPTER.validate_python(dict(raw))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(
            f"{source}: {where}: {err['msg']} (got {err.get('input')!r}); fix the value"
        ) from None


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Plain nested dict of the config (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def flatten(cfg: ExperimentConfig) -> dict[str, Any]:
    """Dotted ``section.field`` -> value, the form used for MLflow params and search spaces.

    The search space is flattened to one entry per searched field
    (``search.space.loss.margin`` -> ``"loguniform(0.001, 1.0)"``), the variants to one
    per variant (``search.variants.paper`` -> ``"loss.pairing=halves, ..."``).
    """
    flat: dict[str, Any] = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            if section == "search" and key == "space":
                for name, param in cfg.search.space.items():
                    flat[f"search.space.{name}"] = describe_param(param)
            elif section == "search" and key == "variants":
                for name, settings in cfg.search.variants.items():
                    text = ", ".join(f"{k}={v}" for k, v in settings.items())
                    flat[f"search.variants.{name}"] = text or "(the config as it is)"
            else:
                flat[f"{section}.{key}"] = value
    return flat


def describe_param(param: SpaceParam) -> str:
    """Short human form of a search distribution, e.g. ``loguniform(0.001, 1.0)``."""
    if param.kind == "choice":
        return f"choice({param.choices})"
    return f"{param.kind}({param.low}, {param.high})"


def with_overrides(cfg: ExperimentConfig, values: Mapping[str, Any]) -> ExperimentConfig:
    """Copy of ``cfg`` with dotted fields replaced (e.g. a search trial's sample).

    Raises:
        ConfigError: A key does not name a config field, or a value has the wrong type.
    """
    raw = to_dict(cfg)
    for key, value in values.items():
        _set_dotted(raw, key, value, source=f"setting {key!r}")
    new = from_dict(raw, source="search sample")
    validate_config(new)
    return new


def get_dotted(cfg: ExperimentConfig, name: str) -> Any:
    """The value of a dotted field, e.g. ``get_dotted(cfg, "loss.margin")``."""
    node: Any = cfg
    for part in name.split("."):
        node = getattr(node, part)
    return node


def field_type(name: str) -> Any:
    """The declared type of a dotted config field (``optim.epochs`` -> int); None if no field."""
    cls: Any = ExperimentConfig
    for part in name.split("."):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return None
        if part not in {f.name for f in dataclasses.fields(cls)}:
            return None
        cls = _type_hints(cls)[part]
    return cls


def dump_config(cfg: ExperimentConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return out


def field_paths(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """All dotted leaf field names of a config dataclass, e.g. ``loss.margin``."""
    return list(_field_paths(cls, prefix))


@functools.cache
def _field_paths(cls: type, prefix: str) -> tuple[str, ...]:
    paths: list[str] = []
    for f in dataclasses.fields(cls):
        sub = _dataclass_type(cls, f.name)
        name = f"{prefix}{f.name}"
        if sub is not None:
            paths.extend(_field_paths(sub, f"{name}."))
        else:
            paths.append(name)
    return tuple(paths)


def validate_config(cfg: ExperimentConfig) -> None:
    """Semantic checks the types alone cannot express.

    Raises:
        ConfigError: The first violated rule, naming the field and the fix.
    """
    checks: list[tuple[bool, str]] = [
        (cfg.loss.margin >= 0, f"loss.margin must be >= 0, got {cfg.loss.margin}"),
        (
            cfg.loss.rank_weight >= 0,
            f"loss.rank_weight must be >= 0 (0 = MSE only), got {cfg.loss.rank_weight}",
        ),
        (cfg.optim.epochs >= 1, f"optim.epochs must be >= 1, got {cfg.optim.epochs}"),
        (cfg.optim.batch_size >= 1, f"optim.batch_size must be >= 1, got {cfg.optim.batch_size}"),
        (
            cfg.optim.batch_size // max(cfg.scaling.num_workers, 1) >= 2,
            f"optim.batch_size ({cfg.optim.batch_size}) gives each of "
            f"{max(cfg.scaling.num_workers, 1)} worker(s) batches of "
            f"{cfg.optim.batch_size // max(cfg.scaling.num_workers, 1)}; training needs at "
            "least 2 per worker (BatchNorm, ranking pairs): raise optim.batch_size",
        ),
        (cfg.optim.eval_batch_size >= 0, "optim.eval_batch_size must be >= 0"),
        (cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (0 < cfg.optim.pct_start < 1, "optim.pct_start must be in (0, 1)"),
        (cfg.optim.div_factor > 0 and cfg.optim.final_div_factor > 0, "div factors must be > 0"),
        (cfg.optim.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 = off)"),
        (cfg.scaling.num_workers >= 0, "scaling.num_workers must be >= 0"),
        (cfg.scaling.cpus_per_worker > 0, "scaling.cpus_per_worker must be > 0"),
        (cfg.scaling.gpus_per_worker > 0, "scaling.gpus_per_worker must be > 0"),
        (
            cfg.scaling.placement_strategy in {"PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"},
            "scaling.placement_strategy must be one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD",
        ),
        (cfg.scaling.max_failures >= 0, "scaling.max_failures must be >= 0"),
        (
            0 < cfg.scaling.poll_interval_s <= 60,
            f"scaling.poll_interval_s must be in (0, 60], got {cfg.scaling.poll_interval_s}",
        ),
        (
            cfg.optim.batch_size % max(cfg.scaling.num_workers, 1) == 0,
            f"optim.batch_size ({cfg.optim.batch_size}) must be divisible by "
            f"scaling.num_workers ({cfg.scaling.num_workers}); it is the global batch",
        ),
        (cfg.data.synthetic_events >= 3, "data.synthetic_events must be >= 3 (one per split)"),
        (cfg.data.synthetic_size >= 16, "data.synthetic_size must be >= 16 pixels"),
        (cfg.data.image_size >= 0, "data.image_size must be >= 0 (0 = native size)"),
        (
            0 < cfg.data.train_fraction <= 1,
            f"data.train_fraction must be in (0, 1] (the share of train events), "
            f"got {cfg.data.train_fraction}",
        ),
        (cfg.data.loader_workers >= 0, "data.loader_workers must be >= 0"),
        (cfg.data.db_eps > 0, "data.db_eps must be > 0"),
        (math.isfinite(cfg.data.nan_fill), "data.nan_fill must be a finite number"),
        (0.0 <= cfg.model.drop_rate < 1.0, "model.drop_rate must be in [0, 1)"),
        (bool(cfg.model.backbone), "model.backbone must name a timm model or preset"),
        (cfg.run.checkpoints_to_keep >= 1, "run.checkpoints_to_keep must be >= 1"),
        (cfg.run.num_cpus >= 0, "run.num_cpus must be >= 0 (0 = automatic)"),
        (bool(cfg.tracking.experiment), "tracking.experiment must not be empty"),
        (
            cfg.search.num_samples >= 1,
            f"search.num_samples must be >= 1, got {cfg.search.num_samples}",
        ),
        (cfg.search.max_concurrent >= 1, "search.max_concurrent must be >= 1"),
        (cfg.search.grace_period >= 1, "search.grace_period must be >= 1 epoch"),
        (cfg.search.reduction_factor >= 2, "search.reduction_factor must be >= 2"),
        (cfg.search.trial_cpus > 0, "search.trial_cpus must be > 0 (Tune rejects 0)"),
        (cfg.search.top_k >= 1, "search.top_k must be >= 1"),
        (
            cfg.search.confirm_seeds >= 1,
            f"search.confirm_seeds must be >= 1 (seeds per confirmed configuration), "
            f"got {cfg.search.confirm_seeds}",
        ),
        (bool(cfg.search.name), "search.name must not be empty"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"config: {message}")
    validate_space(cfg.search.space, cfg.search.variants)


VARIANT_KEY = "variant"
"""The search-space key that picks one of ``search.variants`` (a bundle, not one field)."""

_BOUNDED_AT_ZERO = {"loss.margin", "loss.rank_weight"}


def validate_space(
    space: Mapping[str, SpaceParam], variants: Mapping[str, Mapping[str, Any]] | None = None
) -> None:
    """Check every searched field exists and every distribution is well formed.

    Raises:
        ConfigError: Unknown field (with a did-you-mean), bad bounds, empty choices, or a
            variant that is not defined or sets an unknown field.
    """
    known = [p for p in field_paths() if not p.startswith("search.")]
    for variant, settings in (variants or {}).items():
        for name in settings:
            if name not in known:
                raise ConfigError(
                    f"config: search.variants.{variant}: {name!r} is no config field"
                    f"{_did_you_mean(name, known)}"
                )
    for name, param in space.items():
        where = f"search.space.{name}"
        if name == VARIANT_KEY:
            unknown = [c for c in param.choices or [] if c not in (variants or {})]
            if param.kind != "choice" or not param.choices or unknown:
                raise ConfigError(
                    f"config: {where}: must be a choice of the names in search.variants "
                    f"({', '.join(variants or {}) or 'none defined'}); got {describe_param(param)}"
                )
            continue
        if name not in known:
            raise ConfigError(f"config: {where}: no such config field{_did_you_mean(name, known)}")
        if param.kind == "choice":
            if not param.choices:
                raise ConfigError(f"config: {where}: choice needs a non-empty 'choices' list")
            continue
        if param.low is None or param.high is None:
            raise ConfigError(f"config: {where}: {param.kind} needs both 'low' and 'high'")
        if not param.low < param.high:
            raise ConfigError(
                f"config: {where}: low ({param.low}) must be below high ({param.high})"
            )
        if param.kind in ("loguniform", "logint") and param.low <= 0:
            raise ConfigError(f"config: {where}: {param.kind} needs low > 0, got {param.low}")
        if name in _BOUNDED_AT_ZERO and param.low < 0:
            raise ConfigError(f"config: {where}: bounds must be >= 0, got low={param.low}")


# --------------------------------------------------------------------------- helpers


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not key=value; write e.g. loss.margin=0.05")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_dotted(raw: dict[str, Any], key: str, value: Any, *, source: str) -> None:
    parts = key.split(".")
    if parts[:2] == ["search", "space"] and len(parts) > 2:
        # Space entries are keyed by dotted field names themselves ("loss.margin").
        parts = ["search", "space", ".".join(parts[2:])]
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _dataclass_type(cls: type, name: str) -> type | None:
    """The dataclass type of field ``name`` of ``cls``, or None for a leaf."""
    hints = _type_hints(cls)
    hint = hints.get(name)
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # Resolved once per class: get_type_hints evaluates every annotation string anew, and
    # a search resolves a trial's config several times per trial (a fifth of the driver).
    import typing

    return typing.get_type_hints(cls)


def _check_keys(raw: Mapping[str, Any], cls: type, *, prefix: str, source: str) -> None:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping")
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(
                f"{source}: unknown key '{prefix}{key}'{_did_you_mean(str(key), names, prefix)}"
            )
        sub = _dataclass_type(cls, key)
        if sub is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: '{prefix}{key}' must be a mapping of settings")
            _check_keys(value, sub, prefix=f"{prefix}{key}.", source=source)
        elif cls is SearchConfig and key == "space":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: search.space must map field names to distributions")
            for name, param in value.items():
                _check_keys(param, SpaceParam, prefix=f"search.space.{name}.", source=source)


def _did_you_mean(word: str, options: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def replace(obj: _T, **changes: Any) -> _T:
    """``dataclasses.replace`` with a precise type (used for section copies)."""
    return dataclasses.replace(obj, **changes)  # type: ignore[type-var]
