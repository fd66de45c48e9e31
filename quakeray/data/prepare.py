"""Driver-side data preparation: the file every worker opens, and its statistics, made once.

A training run or a search calls :func:`prepare_data` on the driver before any worker
starts; the workers then only open what it names (:class:`PreparedData`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from quakeray import storage
from quakeray.config import ExperimentConfig
from quakeray.errors import DataError

__all__ = ["PreparedData", "prepare_data", "synthetic_path", "train_subset"]


@dataclass(frozen=True)
class PreparedData:
    """The data file and its normalisation statistics, as absolute paths."""

    path: str
    stats_path: str | None


def synthetic_path(cfg: ExperimentConfig) -> Path:
    """Where ``data.path: ""`` generates its file: ``<run.storage_path>/data/synthetic-...h5``.

    A remote ``run.storage_path`` (s3://) keeps it in the local temp folder instead: every
    worker of a one-machine run sees that, and a cluster stages real data anyway.
    """
    d, location = cfg.data, cfg.run.storage_path
    root = (
        Path(tempfile.gettempdir()) / "quakeray-data"
        if storage.is_remote(location)
        else Path(storage.resolve(location)) / "data"
    )
    return root / f"synthetic-e{d.synthetic_events}-s{d.synthetic_size}-seed{d.synthetic_seed}.h5"


def train_subset(cfg: ExperimentConfig, path: str | Path) -> set[str] | None:
    """The train events this run uses (``data.train_fraction``, drawn with ``optim.seed``)."""
    from quakeray.data.subsample import train_events

    return train_events(path, cfg.data.train_fraction, seed=cfg.optim.seed)


def _check_train_fraction(cfg: ExperimentConfig, path: Path) -> None:
    """A subsample must hold at least one batch (the loop would run no step otherwise)."""
    from quakeray.data.quakeset import QuakeSetDataset

    events = train_subset(cfg, path)
    if events is None:
        return
    n = len(QuakeSetDataset(path, "train", positives_only=cfg.data.positives_only, events=events))
    if n < cfg.optim.batch_size:
        raise DataError(
            f"data.train_fraction={cfg.data.train_fraction} leaves {n} train samples of {path} "
            f"({len(events)} events), fewer than one batch (optim.batch_size="
            f"{cfg.optim.batch_size}); raise data.train_fraction or lower optim.batch_size"
        )


def prepare_data(cfg: ExperimentConfig) -> PreparedData:
    """Make the data usable by every worker, once, on the driver.

    ``data.path`` "" generates a synthetic file (:func:`synthetic_path`; reused when
    present: same settings, same file). Statistics are computed and saved when
    normalising and missing. Both splits the loop needs must hold samples.

    Raises:
        DataError: Missing or malformed file, empty train/val split, statistics that do
            not match the transform settings.
    """
    from quakeray.data.quakeset import QuakeSetDataset
    from quakeray.data.synthetic import write_synthetic
    from quakeray.data.transforms import (
        ChannelStats,
        build_transform,
        compute_stats,
        default_stats_path,
    )

    d = cfg.data
    if d.path:
        path = Path(d.path).expanduser().resolve()
        if path.is_dir():
            raise DataError(
                f"data.path {path} is a directory; set it to the QuakeSet HDF5 file inside "
                "(e.g. .../earthquakes.h5)"
            )
        if not path.is_file():
            raise DataError(
                f"data file not found: {path}; set data.path to a QuakeSet HDF5 file "
                "(quakeray data download) or data.path= for synthetic data"
            )
    else:
        path = synthetic_path(cfg)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_synthetic(
                path, events=d.synthetic_events, size=d.synthetic_size, seed=d.synthetic_seed
            )
    for split in ("train", "val"):
        n = len(QuakeSetDataset(path, split, positives_only=d.positives_only))  # type: ignore[arg-type]
        if n == 0:
            raise DataError(f"{path}: the {split} split holds no samples; use a file with one")
    _check_train_fraction(cfg, path)
    stats_path: Path | None = None
    if d.normalize:
        stats_path = (
            Path(d.stats_path).expanduser().resolve() if d.stats_path else default_stats_path(path)
        )
        if stats_path.is_file():
            stats = ChannelStats.load(stats_path)
        else:
            stats = compute_stats(path, to_db=d.to_db, eps=d.db_eps, nan_fill=d.nan_fill)
            stats.save(stats_path)
        build_transform(d, stats)  # DataError if the statistics are of another domain
    return PreparedData(str(path), str(stats_path) if stats_path else None)
