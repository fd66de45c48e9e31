"""``quakeray data inspect``: what a QuakeSet-format file holds, and whether it is well formed.

The layout is validated first (metadata only; a malformed file fails with a DataError
naming the group). Then the pixels are scanned once, array by array, for the NaN fraction
and the entirely-NaN acquisitions that occur at swath edges.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quakeray.data.layout import FILE_SPLITS, open_h5, read_layout
from quakeray.errors import DataError

__all__ = ["HIST_EDGES", "InspectReport", "inspect_file"]

HIST_EDGES: tuple[float, ...] = (0.0, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 10.0)
"""Magnitude histogram bins (events): below 4, half-unit bins over 4-7.5, above 7.5."""


@dataclass
class InspectReport:
    """Summary of one file (all counts per file split name: train/validation/test)."""

    path: str
    size_bytes: int
    image_size: tuple[int, int]
    events: dict[str, int]
    positives: dict[str, int]
    negatives: dict[str, int]
    magnitude_min: float
    magnitude_max: float
    magnitude_hist: list[dict[str, Any]]
    shapes: dict[str, list[list[int]]]
    dtypes: dict[str, list[str]]
    arrays: int = 0
    nan_fraction: float = 0.0
    all_nan_arrays: int = 0
    all_nan_patches: int = 0
    all_nan_examples: list[str] = field(default_factory=list)
    # Pixels no sensor reports (+-inf, negative linear backscatter): gaps, like NaN.
    infinite_pixels: int = 0
    negative_pixels: int = 0
    invalid_examples: list[str] = field(default_factory=list)  # arrays holding some
    pixels_scanned: bool = True

    def samples(self, split: str) -> int:
        """Samples (positives + negatives) of a file split."""
        return self.positives[split] + self.negatives[split]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return asdict(self)

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(self.to_dict(), indent=2)

    def format(self) -> str:
        """Human-readable multi-line summary."""
        h, w = self.image_size
        lines = [
            f"{self.path}  ({self.size_bytes / 1e6:.1f} MB, {h}x{w} px patches)",
            f"{'split':<12}{'events':>8}{'samples':>9}{'positive':>10}{'negative':>10}",
        ]
        for s in FILE_SPLITS:
            lines.append(
                f"{s:<12}{self.events[s]:>8}{self.samples(s):>9}"
                f"{self.positives[s]:>10}{self.negatives[s]:>10}"
            )
        lines.append(
            f"magnitudes: {self.magnitude_min:.1f} to {self.magnitude_max:.1f} (events per bin)"
        )
        top = max((b["events"] for b in self.magnitude_hist), default=0) or 1
        for b in self.magnitude_hist:
            bar = "#" * round(30 * b["events"] / top)
            lines.append(f"  [{b['low']:>4.1f}, {b['high']:>4.1f})  {b['events']:>5}  {bar}")
        for name, shapes in self.shapes.items():
            shown = ", ".join("x".join(str(d) for d in s) for s in shapes)
            lines.append(f"{name:<7} shape {shown}  dtype {', '.join(self.dtypes[name])}")
        if self.pixels_scanned:
            lines.append(
                f"NaN fraction {self.nan_fraction:.4%} over {self.arrays} arrays; "
                f"entirely NaN: {self.all_nan_arrays} arrays in {self.all_nan_patches} patches"
                + (f" (e.g. {', '.join(self.all_nan_examples)})" if self.all_nan_examples else "")
            )
            if self.infinite_pixels or self.negative_pixels:
                lines.append(
                    f"invalid pixels: {self.infinite_pixels} infinite, {self.negative_pixels} "
                    f"negative (e.g. {', '.join(self.invalid_examples)}); training and "
                    "statistics treat them as gaps, like NaN: check how the file was made"
                )
        return "\n".join(lines)


def inspect_file(path: str | Path, *, scan_pixels: bool = True) -> InspectReport:
    """Validate a QuakeSet-format file and summarise it.

    Args:
        path: The HDF5 file.
        scan_pixels: Read every array for NaN statistics (the whole file once).

    Returns:
        The report.

    Raises:
        DataError: Missing, unreadable, not HDF5, truncated, or a layout violation
            (naming the group and what is wrong).
    """
    p = Path(path)
    with open_h5(p) as f:
        events = read_layout(f, p)
        report = _summarise(p, events)
        if scan_pixels:
            _scan(f, p, events, report)
        else:
            report.pixels_scanned = False
    return report


def _summarise(path: Path, events: list[Any]) -> InspectReport:
    counts = {s: Counter[str]() for s in FILE_SPLITS}
    shapes: dict[str, set[tuple[int, ...]]] = {}
    dtypes: dict[str, set[str]] = {}
    for e in events:
        c = counts[e.split]
        c["events"] += 1
        for patch in e.patches:
            c["positives"] += 1
            c["negatives"] += int(patch.has_before)
            for name, dtype in patch.dtypes.items():
                shapes.setdefault(name, set()).add(patch.shape)
                dtypes.setdefault(name, set()).add(dtype)
    mags = np.array([e.magnitude for e in events], dtype=np.float64)
    hist, _ = np.histogram(np.clip(mags, HIST_EDGES[0], HIST_EDGES[-1]), bins=HIST_EDGES)
    first = next((pt.shape for e in events for pt in e.patches), (0, 0, 2))
    return InspectReport(
        path=str(path),
        size_bytes=path.stat().st_size,
        image_size=(first[0], first[1]),
        events={s: counts[s]["events"] for s in FILE_SPLITS},
        positives={s: counts[s]["positives"] for s in FILE_SPLITS},
        negatives={s: counts[s]["negatives"] for s in FILE_SPLITS},
        magnitude_min=float(mags.min()),
        magnitude_max=float(mags.max()),
        magnitude_hist=[
            {"low": HIST_EDGES[i], "high": HIST_EDGES[i + 1], "events": int(hist[i])}
            for i in range(len(hist))
        ],
        shapes={k: [list(s) for s in sorted(v)] for k, v in sorted(shapes.items())},
        dtypes={k: sorted(v) for k, v in sorted(dtypes.items())},
    )


def _scan(f: Any, path: Path, events: list[Any], report: InspectReport) -> None:
    from tqdm import tqdm

    total = sum(len(pt.dtypes) for e in events for pt in e.patches)
    nan = 0
    pixels = 0
    buf: np.ndarray | None = None
    bar = tqdm(total=total, desc="scan", unit="array", disable=total < 200, leave=False)
    for e in events:
        for patch in e.patches:
            nan_here = 0
            for name in patch.dtypes:
                where = f"/{e.event_id}/{patch.name}/{name}"
                if buf is None or buf.shape != patch.shape:
                    buf = np.empty(patch.shape, dtype=np.float32)
                try:
                    f[where].read_direct(buf)
                except (OSError, RuntimeError) as exc:
                    raise DataError(
                        f"{path}: cannot read {where} ({exc}); the file is damaged, re-create "
                        "or re-download it"
                    ) from None
                count = int(np.count_nonzero(np.isnan(buf)))
                infinite = int(np.count_nonzero(np.isinf(buf)))
                # NaN compares False; -inf is counted as infinite, not twice.
                negative = int(np.count_nonzero(buf < 0)) - int(np.count_nonzero(np.isneginf(buf)))
                report.infinite_pixels += infinite
                report.negative_pixels += negative
                if (infinite or negative) and len(report.invalid_examples) < 3:
                    report.invalid_examples.append(where)
                nan += count
                pixels += buf.size
                report.arrays += 1
                if count == buf.size:
                    report.all_nan_arrays += 1
                    nan_here += 1
                bar.update()
            if nan_here:
                report.all_nan_patches += 1
                if len(report.all_nan_examples) < 3:
                    report.all_nan_examples.append(f"/{e.event_id}/{patch.name}")
    bar.close()
    report.nan_fraction = nan / pixels if pixels else 0.0
