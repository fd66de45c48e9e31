"""Figures of a search, logged to its parent MLflow run.

Built on :class:`matplotlib.figure.Figure` directly (no pyplot): no global state, no
display backend, safe in any process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from quakeray.search import TrialRow

_STATUS_STYLE = {
    "completed": ("o", "tab:blue"),
    "stopped": ("v", "tab:orange"),
    "failed": ("x", "tab:red"),
    "cancelled": ("s", "tab:gray"),
    "running": ("s", "tab:gray"),
}


def history_figure(rows: Sequence[TrialRow], *, metric: str, mode: str) -> Figure:
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


def margin_weight_figure(rows: Sequence[TrialRow], *, metric: str) -> Figure | None:
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
