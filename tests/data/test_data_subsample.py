"""The stratified train subsample: deterministic, across the magnitude range, all at 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quakeray.config import load_config
from quakeray.data.prepare import prepare_data, train_subset
from quakeray.data.quakeset import QuakeSetDataset
from quakeray.data.subsample import stratified_events, train_events
from quakeray.errors import ConfigError, DataError


def test_same_seed_same_events_and_every_stratum_is_represented() -> None:
    rng = np.random.default_rng(0)
    magnitudes = {f"e{i:03d}": float(m) for i, m in enumerate(rng.uniform(4.0, 7.5, 100))}
    first = stratified_events(magnitudes, 0.1, seed=3)
    assert first == stratified_events(magnitudes, 0.1, seed=3)  # deterministic
    assert first != stratified_events(magnitudes, 0.1, seed=4)  # the seed draws
    assert len(first) == 10
    # One event per tenth of the sorted magnitudes: the whole range is covered.
    ordered = sorted(magnitudes, key=magnitudes.__getitem__)
    deciles = sorted(ordered.index(e) // 10 for e in first)
    assert deciles == list(range(10))
    assert stratified_events(magnitudes, 1.0, seed=3) == set(magnitudes)
    assert len(stratified_events(magnitudes, 0.001, seed=3)) == 1  # at least one


def test_fraction_one_is_the_full_split_and_a_fraction_keeps_whole_events(
    tiny_h5: Path,
) -> None:
    assert train_events(tiny_h5, 1.0, seed=0) is None
    full = QuakeSetDataset(tiny_h5, "train")
    events = train_events(tiny_h5, 0.5, seed=0)
    assert events is not None and 0 < len(events) < len(set(full.event_ids))
    half = QuakeSetDataset(tiny_h5, "train", events=events)
    assert set(half.event_ids) == events
    kept = np.isin(full.event_ids, sorted(events))
    np.testing.assert_array_equal(half.magnitudes, full.magnitudes[kept])  # with negatives
    assert len(QuakeSetDataset(tiny_h5, "val", events=None)) > 0  # val untouched


def test_bad_fractions_are_refused(tiny_h5: Path) -> None:
    for bad in ("0", "1.5", "-0.2"):
        with pytest.raises(ConfigError, match=r"data.train_fraction must be in \(0, 1\]"):
            load_config(None, [f"data.train_fraction={bad}"])
    cfg = load_config(
        None, [f"data.path={tiny_h5}", "data.train_fraction=0.05", "data.normalize=false"]
    )
    assert train_subset(cfg, tiny_h5) is not None
    with pytest.raises(DataError, match=r"fewer than one batch.*raise data.train_fraction"):
        prepare_data(cfg)
