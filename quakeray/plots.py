"""Every figure: a run's predictions and errors per magnitude bin, a search's history and surface.

Pure functions from arrays (or trial rows) to matplotlib figures, built on
:class:`matplotlib.figure.Figure` directly (no pyplot): no global state, no display
backend, safe in any process. The caller logs them to MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "TrialPoint",
    "confirmation_figure",
    "format_bin_table",
    "history_figure",
    "margin_weight_figure",
    "per_bin_figure",
    "scatter_figure",
    "size_figure",
]


class TrialPoint(Protocol):
    """What the search figures read of a trial (``quakeray.search.results.TrialRow``)."""

    @property
    def status(self) -> str:
        """Completed | stopped | failed | cancelled | running."""

    @property
    def reference(self) -> str:
        """The reference point (mse_only | paper), "" for a sampled trial."""

    @property
    def params(self) -> Mapping[str, Any]:
        """The trial's settings: dotted config field -> value."""

    @property
    def value(self) -> float | None:
        """The searched metric (None when the trial reported none)."""


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


_STATUS_STYLE = {
    "completed": ("o", "tab:blue"),
    "stopped": ("v", "tab:orange"),
    "failed": ("x", "tab:red"),
    "cancelled": ("s", "tab:gray"),
    "running": ("s", "tab:gray"),
}


def history_figure(rows: Sequence[TrialPoint], *, metric: str, mode: str) -> Figure:
    """Optimisation history: each trial's metric in trial order, and the best so far."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    best: float | None = None
    xs: list[int] = []
    best_line: list[float] = []
    for i, row in enumerate(rows, start=1):
        if row.value is None or not math.isfinite(row.value):
            continue
        marker, color = _STATUS_STYLE.get(row.status, ("o", "black"))
        ax.scatter([i], [row.value], marker=marker, color=color, zorder=3)
        if row.reference:
            ax.annotate(row.reference, (i, row.value), textcoords="offset points", xytext=(4, 4))
        if best is None or (row.value < best if mode == "min" else row.value > best):
            best = row.value
        xs.append(i)
        best_line.append(best)
    if xs:
        ax.step(xs, best_line, where="post", color="black", lw=1, label=f"best {metric}")
    for status, (marker, color) in _STATUS_STYLE.items():
        if any(r.status == status for r in rows) and status != "running":
            ax.scatter([], [], marker=marker, color=color, label=status)
    ax.set_xlabel("trial (in start order)")
    ax.set_ylabel(f"{metric} (last reported)")
    ax.set_title("optimisation history")
    ax.legend(loc="best", fontsize="small")
    return fig


def margin_weight_figure(rows: Sequence[TrialPoint], *, metric: str) -> Figure | None:
    """``metric`` over ranking margin x loss weight (log axes); None without such trials.

    The MSE-only baseline (weight 0) has no place on a log axis: its value is written in
    the corner instead, the number every other point is compared with.
    """
    from matplotlib.figure import Figure

    points = [
        (m, w, r.value)
        for r in rows
        if r.value is not None and math.isfinite(r.value)
        for m, w in [(_num(r.params.get("loss.margin")), _num(r.params.get("loss.rank_weight")))]
        if m is not None and w is not None and m > 0 and w > 0
    ]
    baseline = [
        r.value
        for r in rows
        if r.value is not None and _num(r.params.get("loss.rank_weight")) == 0.0
    ]
    if not points:
        return None
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.add_subplot()
    margins, weights, values = zip(*points, strict=True)
    sc = ax.scatter(margins, weights, c=values, cmap="viridis_r", s=60, edgecolors="black")
    fig.colorbar(sc, ax=ax, label=metric)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("loss.margin")
    ax.set_ylabel("loss.rank_weight")
    ax.set_title(f"{metric} over margin x weight")
    if baseline:
        ax.text(
            0.02,
            0.02,
            f"MSE only (weight 0): {min(baseline):.4f}",
            transform=ax.transAxes,
            fontsize="small",
            bbox={"facecolor": "white", "alpha": 0.8},
        )
    return fig


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def confirmation_figure(
    scores: Mapping[str, tuple[float, float]], *, metric: str, constant: float | None
) -> Figure:
    """Each confirmed configuration's mean +- sd over seeds, beside the constant predictor."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    labels = list(scores)
    means = [scores[k][0] for k in labels]
    sds = [scores[k][1] for k in labels]
    ax.bar(labels, means, yerr=sds, capsize=6, color="tab:blue", alpha=0.8)
    if constant is not None:
        ax.axhline(constant, color="tab:red", linestyle="--", label="constant (train median)")
        top = max([constant, *(m + s for m, s in zip(means, sds, strict=True))])
        ax.set_ylim(0, 1.25 * top)  # room for the legend above the line and the bars
        ax.legend(loc="upper right", fontsize="small")
    ax.set_ylabel(f"{metric} (mean +- sd over seeds)")
    ax.set_title("the search's answer on fresh seeds")
    return fig


def size_figure(
    fractions: Sequence[float],
    series: Mapping[str, Sequence[tuple[float, float] | None]],
    *,
    metric: str,
    constant: float | None,
) -> Figure:
    """``metric`` against training-set size, one line per loss, mean +- sd over seeds.

    Args:
        fractions: The train fractions (x axis, log scale).
        series: Loss name -> (mean, sd) per fraction (None where that loss has no run).
        metric: The y axis.
        constant: The constant train-median predictor's score, drawn as a line.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for name, points in series.items():
        xs = [f for f, p in zip(fractions, points, strict=True) if p is not None]
        ys = [p[0] for p in points if p is not None]
        sds = [p[1] for p in points if p is not None]
        ax.errorbar(xs, ys, yerr=sds, marker="o", capsize=4, label=name)
    if constant is not None:
        ax.axhline(constant, color="tab:red", linestyle="--", label="constant (train median)")
    ax.set_xscale("log")
    ax.set_xticks(list(fractions), [f"{f:g}" for f in fractions])
    ax.set_xlabel("share of the train split's events (data.train_fraction)")
    ax.set_ylabel(f"{metric} (mean +- sd over seeds)")
    ax.set_title("error against training-set size")
    ax.legend(loc="best", fontsize="small")
    return fig
