"""Fewer labelled events: a stratified, seeded subsample of the train split (``train_fraction``).

The paper's thesis is that the ranking term helps most when labelled data are scarce. A
study of it needs train splits of several sizes that all cover the magnitude range, and
that the same seed draws the same way every time. :func:`stratified_events` sorts the
train events by magnitude, cuts them into as many contiguous strata as events to keep,
and draws one event from each: every size keeps small and large earthquakes alike.
Whole events are kept or dropped (with all their patches and negatives), so no event
leaks between a pair of patches. Validation and test never change.

Example:
    >>> magnitudes = {f"e{i}": 4.0 + 0.1 * i for i in range(10)}
    >>> sorted(stratified_events(magnitudes, 0.3, seed=0))
    ['e3', 'e5', 'e8']
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from quakeray.data.layout import open_h5, read_layout

__all__ = ["stratified_events", "train_events"]


def stratified_events(magnitudes: Mapping[str, float], fraction: float, *, seed: int) -> set[str]:
    """``round(fraction * n)`` events (at least one), one from each magnitude stratum.

    Args:
        magnitudes: Event id -> magnitude of the events to draw from.
        fraction: The share to keep, in (0, 1]; 1 keeps every event.
        seed: Seeds the draw inside each stratum.
    """
    ordered = sorted(magnitudes, key=lambda e: (magnitudes[e], e))
    keep = max(1, round(fraction * len(ordered)))
    if keep >= len(ordered):
        return set(ordered)
    rng = np.random.default_rng(seed)
    strata = np.array_split(np.arange(len(ordered)), keep)
    return {ordered[int(rng.choice(stratum))] for stratum in strata}


def train_events(path: str | Path, fraction: float, *, seed: int) -> set[str] | None:
    """The train events a run with ``data.train_fraction`` uses (None: all of them)."""
    if fraction >= 1.0:
        return None
    with open_h5(path) as f:
        events = read_layout(f, Path(path))
    train = {e.event_id: e.magnitude for e in events if e.split == "train"}
    return stratified_events(train, fraction, seed=seed)
