"""Many events on Ray: a manifest of pre/post pairs, actors that load the model once each.

A manifest is a CSV with one row per event: ``pre`` and ``post`` (a file, or a VV and a
VH file joined by ``;``; local paths relative to the manifest, or URIs such as
``s3://bucket/key.tif``), and optionally ``event_id``, ``lon`` and ``lat`` (the
epicentre). Each row becomes ``OUT/events/<event_id>/`` (see
:mod:`quakeray.predict.outputs`) and a line of ``OUT/results.csv`` and
``OUT/results.parquet``; a row whose files are broken is a line with its error, and the
other rows finish. The actors take a GPU each when the cluster has them, else one CPU.
"""

from __future__ import annotations

import csv
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from quakeray import storage
from quakeray.errors import DataError, QuakerayError
from quakeray.predict.model import Predictor
from quakeray.predict.outputs import folder_written_whole
from quakeray.predict.pair import PredictOptions, predict_pair

__all__ = [
    "MANIFEST_COLUMNS",
    "RESULT_COLUMNS",
    "EventRow",
    "ManifestResult",
    "predict_manifest",
    "read_manifest",
]

MANIFEST_COLUMNS = ("pre", "post")
"""Required columns; ``event_id``, ``lon`` and ``lat`` are optional."""

RESULT_COLUMNS = (
    "event_id",
    "status",
    "magnitude",
    "detected",
    "tiles",
    "affected_tiles",
    "seconds",
    "error",
    "pre",
    "post",
    "output",
)


@dataclass(frozen=True)
class EventRow:
    """One manifest row, paths resolved."""

    event_id: str
    pre: tuple[str, ...]
    post: tuple[str, ...]
    epicentre: tuple[float, float] | None


def read_manifest(path: Path) -> list[EventRow]:
    """Parse and check a manifest before anything runs.

    Raises:
        DataError: Missing file or columns, empty, duplicate event ids, bad coordinates.
    """
    if not path.is_file():
        raise DataError(f"manifest {path} not found; pass a CSV with columns pre,post")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in MANIFEST_COLUMNS if c not in columns]
        if missing:
            raise DataError(
                f"manifest {path} lacks column(s) {', '.join(missing)} (has: "
                f"{', '.join(columns) or 'none'}); give one row per event with pre,post"
                "[,event_id,lon,lat]"
            )
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    if not rows:
        raise DataError(f"manifest {path} has no rows; give one row per event")
    events = [_row(r, i + 2, path) for i, r in enumerate(rows)]  # line 1 is the header
    seen: set[str] = set()
    for e in events:
        if e.event_id in seen:
            raise DataError(f"manifest {path}: event_id {e.event_id!r} appears twice")
        seen.add(e.event_id)
    return events


def _row(raw: Mapping[str, str], line: int, manifest: Path) -> EventRow:
    where = f"manifest {manifest} line {line}"
    files = {}
    for date in MANIFEST_COLUMNS:
        parts = tuple(_resolve(p.strip(), manifest.parent) for p in raw[date].split(";") if p)
        if not parts:
            raise DataError(f"{where}: empty {date}; give the {date}-event image")
        files[date] = parts
    lon, lat = raw.get("lon", ""), raw.get("lat", "")
    epicentre = None
    if lon or lat:
        try:
            epicentre = (float(lon), float(lat))
        except ValueError:
            raise DataError(f"{where}: lon/lat {lon!r},{lat!r} are not numbers") from None
        if not (-180 <= epicentre[0] <= 180 and -90 <= epicentre[1] <= 90):
            raise DataError(f"{where}: lon/lat {lon},{lat} out of range (lon first)")
    event_id = raw.get("event_id") or f"row{line - 1}"
    if not re.fullmatch(r"[\w.-]+", event_id):
        raise DataError(f"{where}: event_id {event_id!r} must be letters, digits, . _ -")
    return EventRow(event_id, files["pre"], files["post"], epicentre)


def _resolve(path: str, base: Path) -> str:
    if storage.is_remote(path) and not storage.on_local_disk(path):
        return path
    local = storage.local_path(path) if storage.is_remote(path) else Path(path).expanduser()
    return str(local if local.is_absolute() else (base / local).resolve())


@contextmanager
def _local_files(paths: Sequence[str]) -> Iterator[list[str]]:
    """Local paths for ``paths``: remote files are copied to a temporary folder first."""
    if not any(storage.is_remote(p) for p in paths):
        yield list(paths)
        return
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quakeray-")))
        local = []
        for i, p in enumerate(paths):
            if storage.is_remote(p):
                target = folder / f"{i}-{storage.name(p)}"
                storage.download_file(p, target)
                local.append(str(target))
            else:
                local.append(p)
        yield local


def predict_event(
    predictor: Predictor, row: EventRow, out: Path, options: PredictOptions
) -> dict[str, Any]:
    """One manifest row to its outputs and its results line; errors become the line."""
    line: dict[str, Any] = dict.fromkeys(RESULT_COLUMNS)  # None: empty in the CSV
    line |= {"event_id": row.event_id, "pre": ";".join(row.pre), "post": ";".join(row.post)}
    opts = replace(options, epicentre=row.epicentre or options.epicentre, progress=False)
    try:
        with _local_files(row.pre) as pre, _local_files(row.post) as post:
            result = predict_pair(predictor, pre, post, out, opts)
    except QuakerayError as exc:
        return line | {"status": "error", "error": str(exc)}
    except Exception as exc:  # one broken event must not end the others
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return line | {"status": "error", "error": f"{type(exc).__name__}: {first}"}
    return line | {
        "status": "ok",
        "magnitude": result.estimate.magnitude,
        "detected": result.estimate.detected,
        "tiles": result.tiles,
        "affected_tiles": result.estimate.affected_tiles,
        "seconds": round(result.seconds, 3),
        "output": str(out),
    }


@dataclass
class ManifestResult:
    """The results table of a manifest run."""

    out: Path
    lines: list[dict[str, Any]]

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The lines of events that could not be predicted."""
        return [r for r in self.lines if r["status"] != "ok"]

    def format(self) -> str:
        """Summary lines: counts, each failure, where the table is."""
        ok = len(self.lines) - len(self.failed)
        lines = [f"{ok} of {len(self.lines)} events predicted; results in {self.out}/results.csv"]
        lines += [f"  {r['event_id']}: error: {r['error']}" for r in self.failed]
        return "\n".join(lines)


def predict_manifest(
    predictor: Predictor,
    rows: list[EventRow],
    out: Path,
    options: PredictOptions,
    *,
    workers: int = 0,
    overwrite: bool = False,
) -> ManifestResult:
    """Predict every event on Ray; write per-event outputs and the results table.

    Args:
        predictor: The model; put in Ray's object store once and loaded once per actor.
        rows: The manifest's events (:func:`read_manifest`).
        out: Output folder, written whole or not at all.
        options: Tiling and estimate settings for every event.
        workers: Actors; 0 = one per GPU, else one per CPU, at most one per event.
        overwrite: Replace a non-empty ``out``.

    Raises:
        DataError: A bad output folder (before anything runs).
    """
    with folder_written_whole(out, overwrite=overwrite) as tmp:
        lines = _run_on_ray(predictor, rows, tmp, options, workers)
        order = {r.event_id: i for i, r in enumerate(rows)}
        lines.sort(key=lambda r: order[r["event_id"]])
        for line in lines:  # the folder is renamed into place: report the final paths
            if line["output"]:
                line["output"] = str(out / Path(line["output"]).relative_to(tmp))
        _write_results(tmp, lines)
    return ManifestResult(out, lines)


def _run_on_ray(
    predictor: Predictor,
    rows: list[EventRow],
    tmp: Path,
    options: PredictOptions,
    workers: int,
) -> list[dict[str, Any]]:
    import ray
    from ray.util import ActorPool
    from tqdm.auto import tqdm

    from quakeray.config import ExperimentConfig
    from quakeray.runtime import init_ray

    init_ray(ExperimentConfig())
    resources = ray.cluster_resources()  # type: ignore[no-untyped-call]
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    count = min(len(rows), workers or gpus or cpus)
    device = "cuda" if gpus else "cpu"
    opts = replace(options, device=device)
    shared = ray.put(predictor)
    actor = ray.remote(EventWorker).options(num_cpus=1, num_gpus=1 if gpus else 0)
    pool = ActorPool([actor.remote(shared, opts) for _ in range(count)])
    lines = []
    tasks = pool.map_unordered(
        lambda a, row: a.predict.remote(row, str(tmp / "events" / row.event_id)), rows
    )
    for line in tqdm(tasks, total=len(rows), desc="events", unit="event"):
        lines.append(line)
    return lines


class EventWorker:
    """A Ray actor: the model loaded once, then one event per call."""

    def __init__(self, predictor: Predictor, options: PredictOptions) -> None:
        import torch

        torch.set_num_threads(1)
        self.predictor = predictor
        self.predictor.module.to(options.device)
        self.options = options

    def predict(self, row: EventRow, out: str) -> dict[str, Any]:
        """Predict one event into ``out``; the results line (errors included)."""
        return predict_event(self.predictor, row, Path(out), self.options)


def _write_results(folder: Path, lines: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with (folder / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(lines)
    table = pa.table({c: [line[c] for line in lines] for c in RESULT_COLUMNS})
    pq.write_table(table, folder / "results.parquet")
