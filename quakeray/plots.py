"""Figures of a run: predicted vs true magnitude, and the error per magnitude bin.

Pure functions from arrays to matplotlib figures (Agg backend, no display needed); the
caller logs them to MLflow and closes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def scatter_figure(
    target: np.ndarray,
    pred: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    title: str = "predicted vs true magnitude",
) -> Figure:
    """Predicted against true magnitude, negatives and positives in two colours.

    The diagonal is the perfect prediction; the dotted line at 1 is the detection
    threshold (a prediction >= 1 means "affected").
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_subplot()
    target = np.asarray(target, dtype=float)
    pred = np.asarray(pred, dtype=float)
    if labels is None:
        labels = (target > 0).astype(int)
    labels = np.asarray(labels)
    for value, name, colour in (
        (0, "negative (no event)", "tab:grey"),
        (1, "positive", "tab:blue"),
    ):
        mask = labels == value
        if mask.any():
            ax.scatter(target[mask], pred[mask], s=12, alpha=0.7, label=name, color=colour)
    hi = float(np.nanmax(np.concatenate([target, pred, [1.0]]))) + 0.5
    ax.plot([0, hi], [0, hi], color="black", linewidth=1, label="perfect")
    ax.axhline(1.0, color="tab:red", linestyle=":", linewidth=1, label="detection threshold")
    ax.set_xlim(-0.2, hi)
    ax.set_ylim(-0.2, hi)
    ax.set_xlabel("true magnitude")
    ax.set_ylabel("predicted magnitude")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def per_bin_figure(
    bins: Sequence[Mapping[str, float]], *, title: str = "error per magnitude bin"
) -> Figure:
    """MAE and bias (mean prediction - truth) per magnitude bin, with sample counts."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    names = [f"[{b['lo']:g}, {b['hi']:g})" for b in bins]
    x = np.arange(len(bins))
    mae = [_finite_or_zero(b["MAE"]) for b in bins]
    bias = [_finite_or_zero(b["bias"]) for b in bins]
    ax.bar(x - 0.2, mae, width=0.4, label="MAE", color="tab:blue")
    ax.bar(x + 0.2, bias, width=0.4, label="bias", color="tab:orange")
    for xi, b, height in zip(x, bins, mae, strict=True):
        ax.annotate(
            f"n={int(b['count'])}", (xi - 0.2, height), ha="center", va="bottom", fontsize=7
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, names, rotation=30, fontsize=8)
    ax.set_xlabel("true magnitude bin")
    ax.set_ylabel("magnitude units")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def format_bin_table(bins: Sequence[Mapping[str, float]]) -> str:
    """Per-bin errors as an aligned text table."""
    lines = [f"{'bin':>12} {'count':>6} {'MAE':>8} {'bias':>8}"]
    for b in bins:
        name = f"[{b['lo']:g}, {b['hi']:g})"
        lines.append(f"{name:>12} {int(b['count']):>6} {b['MAE']:>8.3f} {b['bias']:>+8.3f}")
    return "\n".join(lines)


def _finite_or_zero(value: float) -> float:
    return float(value) if np.isfinite(value) else 0.0
