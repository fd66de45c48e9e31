"""``quakeray predict`` on large scenes: tiles per second, and peak memory against scene size.

For each scene side (default 2,500, 5,000 and 10,000 px) the script writes a synthetic
Sentinel-1-like pair (two float32 bands VV/VH, linear gamma speckle, tiled 512 x 512, UTM
33N, 10 m) and predicts it in a fresh process with ``quakeray.predict.predict_pair``:
512 px tiles, no overlap, ``test_resnet`` (the figures are of the input path and the tile
machinery; a real backbone adds its own forward time). A second 10,000 px case puts the
post image on a shifted, larger grid, so every window is read through the warp. Each
child reports its wall time and its peak RSS (``ru_maxrss``); the target is peak memory
that does not grow with the scene (it holds one batch of tiles, not the scene).

Prints a table and writes ``benchmarks/results/predict_throughput.json``.

    .venv/bin/python benchmarks/predict_throughput.py               # minutes; 3.5 GB of disk
    .venv/bin/python benchmarks/predict_throughput.py --smoke-test  # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "predict_throughput.json"
TILE = 512


def write_scene(path: Path, side: int, *, seed: int, pad: int = 0) -> None:
    """A ``side`` x ``side`` two-band scene, written block row by block row (low memory)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(seed)
    full = side + 2 * pad
    profile = {
        "driver": "GTiff",
        "width": full,
        "height": full,
        "count": 2,
        "dtype": "float32",
        "crs": "EPSG:32633",
        "transform": from_origin(500_000.0 - 10 * pad, 4_650_000.0 + 10 * pad, 10.0, 10.0),
        "nodata": float("nan"),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "BIGTIFF": "IF_SAFER",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.descriptions = ("VV", "VH")
        for row in range(0, full, 512):
            h = min(512, full - row)
            block = rng.gamma(4.4, 0.1 / 4.4, size=(2, h, full)).astype(np.float32)
            block[1] *= 0.2  # VH about 7 dB below VV
            dst.write(block, window=Window(0, row, full, h))


def child(pre: str, post: str, out: str, batch: int) -> dict[str, Any]:
    """Runs in a fresh process: build the model, predict, report time and peak RSS."""
    import torch

    from quakeray.config import ExperimentConfig, replace
    from quakeray.data.transforms import BatchTransform
    from quakeray.inference import InferenceModel
    from quakeray.models import build_model
    from quakeray.predict.model import Predictor
    from quakeray.predict.pair import PredictOptions, predict_pair

    torch.manual_seed(0)
    cfg = ExperimentConfig()
    model = build_model(replace(cfg.model, backbone="test_resnet"), in_chans=4, img_size=TILE)
    transform = BatchTransform(mean=[-11.0, -18.0], std=[3.0, 3.0])
    predictor = Predictor(InferenceModel(transform, model).eval(), TILE, "benchmark")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    result = predict_pair(
        predictor, [pre], [post], Path(out), PredictOptions(batch_size=batch, progress=False)
    )
    seconds = time.perf_counter() - start
    return {
        "tiles": result.tiles,
        "seconds": round(seconds, 2),
        "tiles_per_s": round(result.tiles / seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_imports_mb": round(rss_before, 1),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2500, 5000, 10000])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-warp-case", action="store_true")
    parser.add_argument("--smoke-test", action="store_true", help="one 1,024 px scene, seconds")
    parser.add_argument("--child", nargs=4, metavar=("PRE", "POST", "OUT", "BATCH"))
    args = parser.parse_args()
    if args.child:
        pre, post, out, batch = args.child
        print(json.dumps(child(pre, post, out, int(batch))))
        return
    if args.smoke_test:
        args.sizes, args.no_warp_case = [1024], True
    cases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="predict-bench-") as tmp:
        root = Path(tmp)
        plan = [(side, 0) for side in args.sizes]
        if not args.no_warp_case:
            plan.append((max(args.sizes), 37))  # post on a shifted grid: read through the warp
        for side, pad in plan:
            pre, post = root / f"pre_{side}.tif", root / f"post_{side}_{pad}.tif"
            start = time.perf_counter()
            if not pre.exists():
                write_scene(pre, side, seed=1)
            write_scene(post, side, seed=2, pad=pad)
            written = time.perf_counter() - start
            out = root / f"out_{side}_{pad}"
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(pre),
                    str(post),
                    str(out),
                    str(args.batch),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            case = json.loads(proc.stdout.strip().splitlines()[-1])
            case |= {"side_px": side, "warped_post": bool(pad), "write_s": round(written, 1)}
            case["scene_mb"] = round(2 * 2 * side * side * 4 / 2**20)  # two dates, two bands
            cases.append(case)
            print(
                f"{side:>6} px {'warped' if pad else 'aligned':>8}: {case['tiles']:>4} tiles in "
                f"{case['seconds']:>6.1f} s = {case['tiles_per_s']:>6.1f} tiles/s, peak RSS "
                f"{case['peak_rss_mb']:>6.0f} MB (scene pair {case['scene_mb']} MB)",
                flush=True,
            )
            post.unlink()
    aligned = [c for c in cases if not c["warped_post"]]
    rss = [c["peak_rss_mb"] for c in aligned]
    summary = {
        "benchmark": "predict_throughput",
        "date": time.strftime("%Y-%m-%d"),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "device": "cpu"},
        "tile_px": TILE,
        "batch": args.batch,
        "model": "test_resnet",
        "cases": cases,
        "peak_rss_growth_mb_smallest_to_largest": round(rss[-1] - rss[0], 1) if rss else None,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"peak RSS growth from {args.sizes[0]} to {args.sizes[-1]} px: "
        f"{summary['peak_rss_growth_mb_smallest_to_largest']} MB; wrote {RESULTS}"
    )


if __name__ == "__main__":
    main()
