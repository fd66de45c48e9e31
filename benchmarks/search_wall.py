"""Search wall time: one sequential 4-trial search, start to summary, as a user waits for it.

The end-to-end counterpart of ``search_overhead.py``: ``quakeray.search.run_search`` on
generated 32 px data, ``test_resnet``, 2 workers per trial, 3 epochs, one trial at a time,
no ASHA (so every run trains the same trial-epochs), driver set-up and summary included.
Repeats the search and reports each wall time, the median, and the best ``val_MAE``
(equal across repeats and versions: the same seed gives the same trials).

To compare with another version of quakeray, check its package out in place (the venv's
install is editable), run, and restore::

    git checkout 27ac39b -- quakeray && .venv/bin/python benchmarks/search_wall.py --no-save
    git checkout HEAD -- quakeray

Prints the figures and writes ``benchmarks/results/search_wall.json``.

    .venv/bin/python benchmarks/search_wall.py                # ~2.5 min on 2 cores
    .venv/bin/python benchmarks/search_wall.py --smoke-test   # ~1 min
    .venv/bin/python benchmarks/search_wall.py --no-save scaling.poll_interval_s=2  # a setting
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import ray
from search_overhead import search_cfg, start_local_ray  # the same search and Ray

from quakeray.data.synthetic import write_synthetic
from quakeray.search import run_search

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "search_wall.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true", help="one search of 2 trials")
    parser.add_argument("--repeats", type=int, default=2, help="searches to time")
    parser.add_argument("--no-save", action="store_true", help="print only (other versions)")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()
    trials, repeats = (2, 1) if args.smoke_test else (4, args.repeats)
    root = Path(tempfile.mkdtemp(prefix="qr-search-wall-"))
    data = str(write_synthetic(root / "q.h5", events=48, size=32, seed=0))
    start_local_ray()
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    for i in range(repeats):
        cfg = search_cfg(
            root,
            data,
            f"wall-{i}",
            [
                "optim.epochs=3",
                "scaling.num_workers=2",
                "scaling.cpus_per_worker=0.5",
                f"search.num_samples={trials}",
                "search.max_concurrent=1",
                "search.asha=false",
                *args.overrides,
            ],
        )
        t0 = time.perf_counter()
        summary = run_search(cfg)
        runs.append(
            {
                "wall_s": time.perf_counter() - t0,
                "trials": len(summary.rows),
                "best_val_MAE": summary.best.value if summary.best else None,
            }
        )
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)
    git = ["git", "-C", str(REPO)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "quakeray"], capture_output=True)
    figures = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "commit": commit.stdout.strip() + (" (quakeray/ differs from it)" if dirty.stdout else ""),
        "trials_per_search": trials,
        "overrides": args.overrides,
        "runs": runs,
        "median_wall_s": statistics.median(r["wall_s"] for r in runs),
        "median_wall_per_trial_s": statistics.median(r["wall_s"] for r in runs) / trials,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    print(f"\nsequential {trials}-trial search, 3 epochs, 2 workers per trial; {figures['commit']}")
    for r in runs:
        best = r["best_val_MAE"]
        print(f"  wall {r['wall_s']:6.1f} s  trials {r['trials']}  best val_MAE {best:.4f}")
    print(
        f"  median {figures['median_wall_s']:.1f} s = "
        f"{figures['median_wall_per_trial_s']:.1f} s per trial"
    )
    if not (args.smoke_test or args.no_save):
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(figures, indent=1))
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
