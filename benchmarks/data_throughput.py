"""Data loading throughput: QuakeSetDataset vs torchgeo's way vs the read_direct floor.

Generates (once, into an ignored folder) a 512 px QuakeSet-format file of a few hundred MB,
warms the page cache, then measures samples per second into batched ``4 x 512 x 512``
float32 tensors:

- ``torchgeo``: ``torchgeo.datasets.QuakeSet`` through a DataLoader (opens the file for
  every item, NaN fill in numpy);
- ``floor``: the same arrays read with ``read_direct`` into preallocated buffers, nothing else;
- ``quakeset``: our dataset + DataLoader with the zero-copy ``collate`` (0 and 2 workers),
  also with ``default_collate``, and with the ``BatchTransform`` (NaN fill, dB, normalise,
  flips) applied to each batch (on the GPU when there is one);
- ``raw``: the same in the ``raw`` layout (arrays read straight into the batch as stored,
  the transposition fused into the transform's first pass);
- ``reference transform``: the stacked reads with the transform as it was before it was
  made fast (a pass per step), for the before/after of the same run.

It also times the transform alone on one batch (reference vs today, stacked and raw), and
with ``--rss-file-gb N`` the peak RSS of a fresh process reading (and transforming) one
epoch of the bench file and of a file of N GB, to show memory does not grow with the file.

Prints a table and writes ``benchmarks/results/data_throughput.json``.

    .venv/bin/python benchmarks/data_throughput.py              # the full run, ~2-3 min
    .venv/bin/python benchmarks/data_throughput.py --rss-file-gb 2  # + RSS (writes 2 GB once)
    .venv/bin/python benchmarks/data_throughput.py --smoke-test  # tiny file, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader

from quakeray.data.quakeset import QuakeSetDataset, collate
from quakeray.data.synthetic import write_synthetic
from quakeray.data.transforms import BatchTransform, compute_stats

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "data_throughput.json"


def warm_cache(path: Path) -> None:
    """Read the whole file once so every measurement sees a warm page cache."""
    with path.open("rb") as fh:
        while fh.read(1 << 24):
            pass


def timed(fn: Callable[[], int], *, repeats: int) -> tuple[float, int]:
    """Best samples/s over ``repeats`` runs of ``fn`` (which returns the samples it made)."""
    best = 0.0
    n = 0
    for _ in range(repeats):
        start = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - start))
    return best, n


def reference_transform(t: BatchTransform, x: torch.Tensor) -> torch.Tensor:
    """``BatchTransform.forward`` as it was before it was made fast: a pass per step."""
    fill = t.nan_fill
    x = torch.nan_to_num(x.float(), nan=fill, posinf=fill, neginf=fill)
    if t.to_db:
        x.masked_fill_(x < 0, fill)
        x.clamp_(min=0.0).add_(t.eps).log10_().mul_(10.0)
    if t.normalize:
        x.sub_(t.mean).div_(t.std)
    if t.training and t.flips:
        coins = torch.rand(x.shape[0], 2, device=x.device) < 0.5
        h = coins[:, 0].nonzero().squeeze(1)
        x[h] = x[h].flip(-1)
        v = coins[:, 1].nonzero().squeeze(1)
        x[v] = x[v].flip(-2)
    return x


def run_loader(
    loader: DataLoader[Any],
    limit: int,
    transform: BatchTransform | None,
    *,
    raw: bool = False,
    reference: bool = False,
) -> int:
    n = 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    while n < limit:  # as many passes as it takes
        for batch in loader:
            image = batch["image"]
            if transform is not None and reference:
                image = reference_transform(transform, image.to(device, non_blocking=True))
            elif transform is not None:
                image = image.to(device, non_blocking=True)
                image = transform(image, layout="raw" if raw else None)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            assert image.shape[1] == (4 if transform is not None or not raw else 2)
            n += image.shape[0]
            if n >= limit:
                break
    return n


def floor(ds: QuakeSetDataset, limit: int) -> int:
    """Read each sample's two arrays into preallocated buffers: the I/O floor."""
    h, w = ds.image_size
    bufs = [np.empty((h, w, 2), np.float32), np.empty((h, w, 2), np.float32)]
    n = 0
    with h5py.File(ds.path, "r") as f:
        handles = {name: f[name] for pair in ds._sources for name in pair}
        while n < limit:
            for pair in ds._sources[: limit - n]:
                for buf, name in zip(bufs, pair, strict=True):
                    handles[name].read_direct(buf)
                n += 1
    return n


def time_transform(
    ds: QuakeSetDataset, raw: QuakeSetDataset, transform: BatchTransform, *, repeats: int
) -> dict[str, float]:
    """ms per batch of the transform alone (training mode, flips on) on one CPU batch."""
    idx = list(range(min(16, len(ds))))
    stacked_batch = collate(ds.__getitems__(idx))["image"].clone()
    raw_batch = collate(raw.__getitems__(idx))["image"].clone()
    device = transform.mean.device
    stacked_batch, raw_batch = stacked_batch.to(device), raw_batch.to(device)
    fns: dict[str, Callable[[], torch.Tensor]] = {
        "reference_ms": lambda: reference_transform(transform, stacked_batch),
        "stacked_ms": lambda: transform(stacked_batch),
        "raw_ms": lambda: transform(raw_batch, layout="raw"),
    }
    best = dict.fromkeys(fns, float("inf"))
    transform.train()
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[key] = min(best[key], 1e3 * (time.perf_counter() - start))
    out = {k: round(v, 1) for k, v in best.items()}
    out["speedup_stacked"] = round(best["reference_ms"] / best["stacked_ms"], 1)
    out["speedup_raw"] = round(best["reference_ms"] / best["raw_ms"], 1)
    return out


def memory_kb(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in KiB, from /proc (Linux).

    Not ``getrusage``: its ``ru_maxrss`` survives fork + exec, so a child started by a
    big parent would report the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: the best there is


def rss_child(path: Path, layout: str, batch_size: int) -> None:
    """(In a fresh process) one epoch of the train split, read and transformed; print RSS."""
    start_kb = memory_kb("VmRSS")  # after the imports
    ds = QuakeSetDataset(path, "train", layout=layout)  # type: ignore[arg-type]
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, collate_fn=collate)
    transform = BatchTransform(mean=[-15.0, -20.0], std=[5.0, 4.0], flips=True)
    n = run_loader(loader, len(ds), transform, raw=layout == "raw")
    peak_kb = memory_kb("VmHWM")
    mb = {"after_imports_mb": round(start_kb / 1024), "peak_rss_mb": round(peak_kb / 1024)}
    print(json.dumps({"samples": n, **mb, "growth_mb": mb["peak_rss_mb"] - mb["after_imports_mb"]}))


def rss_figures(
    small: Path, big_gb: float, data_dir: Path, *, size: int, events: int
) -> dict[str, Any]:
    """Peak RSS of a fresh process per file and layout: the bench file vs a ``big_gb`` file."""
    per_event = small.stat().st_size / events
    big_events = max(events, int(big_gb * 1e9 / per_event) + 1)
    big = data_dir / f"quakeset_{size}px_{big_events}ev.h5"
    if not big.exists():
        t0 = time.perf_counter()
        write_synthetic(big, events=big_events, size=size, seed=1)
        took = time.perf_counter() - t0
        print(f"generated {big} ({big.stat().st_size / 1e9:.1f} GB) in {took:.0f} s")
    figures: dict[str, Any] = {}
    for path in (small, big):
        warm_cache(path)
        for layout in ("stacked", "raw"):
            cmd = [sys.executable, __file__, "--rss-child", str(path), layout]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            child = json.loads(done.stdout.strip().splitlines()[-1])
            key = f"{path.stat().st_size / 1e9:.2f} GB, {layout}"
            figures[key] = child
            print(
                f"  peak RSS, one epoch read + transformed, {key}: {child['peak_rss_mb']} MB, "
                f"{child['growth_mb']} MB over the imports ({child['samples']} samples)"
            )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true", help="tiny file, one repeat")
    parser.add_argument("--data-dir", type=Path, default=REPO / "data" / "bench")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--rss-file-gb",
        type=float,
        default=0.0,
        help="also measure peak RSS reading the bench file vs a file of this many GB",
    )
    parser.add_argument("--rss-child", nargs=2, metavar=("FILE", "LAYOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(Path(args.rss_child[0]), args.rss_child[1], args.batch_size)
        return

    size, events, repeats, passes = (64, 12, 1, 1) if args.smoke_test else (512, 40, 3, 3)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    path = args.data_dir / f"quakeset_{size}px_{events}ev.h5"
    if not path.exists():
        t0 = time.perf_counter()
        write_synthetic(path, events=events, size=size, seed=0)
        print(f"generated {path} in {time.perf_counter() - t0:.0f} s")
    warm_cache(path)
    ds = QuakeSetDataset(path, "train")
    stats = compute_stats(path, progress=False)
    n_all = len(ds)
    bs = args.batch_size
    print(
        f"{path.name}: {path.stat().st_size / 1e6:.0f} MB, train split {n_all} samples, "
        f"batch {bs}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    )

    # Every case runs once per round, rounds interleaved, best round kept: on a shared
    # machine, load changes during the run, and this way it hits every case alike.
    cases: dict[str, Callable[[], int]] = {}
    notes: dict[str, str] = {}
    tg_dir = tempfile.TemporaryDirectory()
    try:
        from torchgeo.datasets import QuakeSet

        os.symlink(path, Path(tg_dir.name) / "earthquakes.h5")
        tg_loader = DataLoader(QuakeSet(tg_dir.name, split="train"), batch_size=bs)
        cases["torchgeo QuakeSet (open per item)"] = lambda: run_loader(tg_loader, n_all, None)
    except ImportError:
        print("  torchgeo not installed: skipping its baseline")
    cases["floor: read_direct, 2 arrays/sample"] = lambda: floor(ds, passes * n_all)
    notes["floor: read_direct, 2 arrays/sample"] = "(2 arrays per sample)"

    transform = BatchTransform(mean=stats.mean, std=stats.std, flips=True)
    if torch.cuda.is_available():
        transform = transform.cuda()
    raw = QuakeSetDataset(path, "train", layout="raw")
    fast: dict[str, Any] = {"collate_fn": collate}
    two: dict[str, Any] = {"collate_fn": collate, "num_workers": 2}
    loaders: list[tuple[str, QuakeSetDataset, dict[str, Any], BatchTransform | None]] = [
        ("quakeray, collate, 0 workers", ds, fast, None),
        ("quakeray raw, collate, 0 workers", raw, fast, None),
        ("quakeray, default_collate, 0 workers", ds, {}, None),
        ("quakeray, collate, 2 workers", ds, two, None),
        ("quakeray + reference transform, 0 workers", ds, fast, transform),
        ("quakeray + BatchTransform, 0 workers", ds, fast, transform),
        ("quakeray raw + BatchTransform, 0 workers", raw, fast, transform),
        ("quakeray + BatchTransform, 2 workers", ds, two, transform),
        ("quakeray raw + BatchTransform, 2 workers", raw, two, transform),
    ]
    for name, dataset, kwargs, tf in loaders:
        loader = DataLoader(
            dataset,
            batch_size=bs,
            shuffle=True,
            persistent_workers=bool(kwargs.get("num_workers")),
            **kwargs,
        )
        cases[name] = lambda loader=loader, tf=tf, name=name: run_loader(
            loader, passes * n_all, tf, raw=" raw" in name, reference="reference" in name
        )

    load_before = [round(v, 2) for v in os.getloadavg()]
    best: dict[str, float] = dict.fromkeys(cases, 0.0)
    counts: dict[str, int] = {}
    for _ in range(repeats):
        for name, fn in cases.items():
            rate, counts[name] = timed(fn, repeats=1)
            best[name] = max(best[name], rate)
    tg_dir.cleanup()

    results: dict[str, dict[str, float]] = {}
    for name, rate in best.items():
        results[name] = {"samples_per_s": round(rate, 1), "samples": counts[name]}
        extra = f"= {2 * rate:.0f} arrays/s" if name.startswith("floor") else ""
        print(f"  {name:<42} {rate:>8.1f} samples/s  {extra}")
    tg_rate = best.get("torchgeo QuakeSet (open per item)", float("nan"))
    floor_rate = best["floor: read_direct, 2 arrays/sample"]

    def measured(name: str) -> float:
        return results[name]["samples_per_s"]

    def vs_tg(value: float) -> float | None:
        return round(value / tg_rate, 1) if tg_rate == tg_rate else None

    ours = measured("quakeray, collate, 0 workers")
    ours_raw = measured("quakeray raw, collate, 0 workers")
    full = measured("quakeray raw + BatchTransform, 0 workers")
    transform_alone = time_transform(ds, raw, transform, repeats=5 if not args.smoke_test else 1)
    summary = {
        "vs_torchgeo": vs_tg(ours),
        "fraction_of_floor": round(ours / floor_rate, 2),
        "raw_vs_torchgeo": vs_tg(ours_raw),
        "raw_fraction_of_floor": round(ours_raw / floor_rate, 2),
        "read_transform_vs_torchgeo": vs_tg(full),
        "read_transform_speedup": round(
            full / measured("quakeray + reference transform, 0 workers"), 1
        ),
        "transform_speedup": transform_alone["speedup_raw"],
        "targets": {
            "vs_torchgeo": ">= 5",
            "fraction_of_floor": ">= 0.5",
            "raw_fraction_of_floor": ">= 0.7",
            "transform_speedup": ">= 2",
        },
    }
    print(
        f"quakeray (0 workers) = {summary['vs_torchgeo']}x torchgeo's way, "
        f"{summary['fraction_of_floor']:.0%} of the floor; raw layout "
        f"{summary['raw_vs_torchgeo']}x, {summary['raw_fraction_of_floor']:.0%} of the floor"
    )
    print(
        f"read + transform (raw, 0 workers) = {summary['read_transform_vs_torchgeo']}x "
        f"torchgeo's way (which does less: NaN fill only), "
        f"{summary['read_transform_speedup']}x the reference transform's"
    )
    for key, value in transform_alone.items():
        print(f"  transform alone: {key:<22} {value}")
    rss = (
        rss_figures(path, args.rss_file_gb, args.data_dir, size=size, events=events)
        if args.rss_file_gb
        else None
    )
    payload = {
        "benchmark": "data_throughput",
        "smoke_test": args.smoke_test,
        "file": {
            "name": path.name,
            "mb": round(path.stat().st_size / 1e6),
            "size_px": size,
            "events": events,
            "train_samples": n_all,
        },
        "batch_size": bs,
        "passes_per_measurement": passes,
        "load_average_before_after": [load_before, [round(v, 2) for v in os.getloadavg()]],
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "h5py": h5py.__version__,
        },
        "results": results,
        "transform_alone": transform_alone,
        "summary": summary,
    }
    if rss is not None:
        payload["peak_rss"] = rss
    if not args.smoke_test:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        shutil.move(tmp, args.out)
        print(f"wrote {args.out}")
    else:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
