"""A search driver that scales: its CPU time per trial over a search of 200 tiny trials.

One ``quakeray.search.run_search`` of ``--trials`` tiny trials (test_resnet, 32 px, one
epoch, two at a time, Optuna TPE after the two reference points, ASHA on) on this
machine's local Ray. The driver is the process that runs Tune, the searcher and every
MLflow write (trial runs opened at suggestion, epochs logged, runs finalised and closed on
the finaliser thread): a Tune callback reads the process's CPU time (all its threads)
each time a trial completes. The CPU time between two completions is one trial's share.

Reported: the mean driver CPU per trial in blocks of 20 trials, the least-squares slope of
per-trial CPU against the trial's number (ms per trial, per trial), and the last block
over the first. Then the MLflow store is read back: the search must hold exactly
``--trials`` child runs, none of them left RUNNING.

Prints a table and writes ``benchmarks/results/search_driver_scaling.json``.

    .venv/bin/python benchmarks/search_driver_scaling.py               # ~8 min on 2 cores
    .venv/bin/python benchmarks/search_driver_scaling.py --smoke-test  # 30 trials, ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import ray
from ray.tune import Callback

from quakeray.config import load_config
from quakeray.search import run_search
from quakeray.search.runs import child_runs

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "search_driver_scaling.json"
BLOCK = 20


class DriverClock(Callback):  # type: ignore[misc]
    """The driver's CPU and wall time at each trial's completion (or error)."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = [(time.process_time(), time.perf_counter())]

    def _stamp(self) -> None:
        self.stamps.append((time.process_time(), time.perf_counter()))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._stamp()

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._stamp()

    def per_trial(self) -> tuple[list[float], list[float]]:
        """CPU seconds and wall seconds between consecutive completions."""
        cpu = [b[0] - a[0] for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        wall = [b[1] - a[1] for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        return cpu, wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true", help="30 trials")
    parser.add_argument("--trials", type=int, default=200)
    args = parser.parse_args()
    n = 30 if args.smoke_test else args.trials

    from quakeray.data.synthetic import write_synthetic

    root = Path(tempfile.mkdtemp(prefix="qr-driver-scaling-"))
    data = write_synthetic(root / "q.h5", events=16, size=32, seed=0)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(
        None,
        [
            f"data.path={data}",
            f"run.storage_path={root / 'ray_results'}",
            f"tracking.uri={uri}",
            "model.backbone=test_resnet",
            "optim.epochs=1",
            "optim.batch_size=8",
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=0.5",
            "tracking.log_model=false",
            "search.name=driver-scaling",
            f"search.num_samples={n}",
            "search.max_concurrent=2",
            "search.evaluate_best=false",
        ],
    )
    load_before = os.getloadavg()
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    clock = DriverClock()
    t0 = time.perf_counter()
    summary = run_search(cfg, callbacks=[clock])
    wall = time.perf_counter() - t0
    ray.shutdown()

    cpu, gaps = clock.per_trial()
    index = np.arange(1, len(cpu) + 1)
    slope, intercept = np.polyfit(index, np.asarray(cpu) * 1000, 1)
    blocks = [
        {
            "trials": f"{i + 1}-{min(i + BLOCK, len(cpu))}",
            "driver_cpu_ms_per_trial": float(np.mean(cpu[i : i + BLOCK]) * 1000),
            "wall_s_per_trial": float(np.mean(gaps[i : i + BLOCK])),
        }
        for i in range(0, len(cpu), BLOCK)
    ]
    runs = child_runs(summary.tracking_uri, summary.experiment_id, summary.parent_run_id)
    statuses = Counter(r.info.status for r in runs)
    figures = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "trials": n,
        "wall_s": wall,
        "driver_cpu_s_total": float(sum(cpu)),
        "blocks": blocks,
        "slope_ms_per_trial_per_trial": float(slope),
        "intercept_ms": float(intercept),
        "last_block_over_first": blocks[-1]["driver_cpu_ms_per_trial"]
        / blocks[0]["driver_cpu_ms_per_trial"],
        "child_runs": len(runs),
        "child_run_statuses": dict(statuses),
        "running_left": statuses.get("RUNNING", 0),
        "per_trial_cpu_s": cpu,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=1))
    print(f"\n{n} trials in {wall:.0f} s; the driver's CPU per trial, by block:")
    for block in blocks:
        print(
            f"  trials {block['trials']:>8}: {block['driver_cpu_ms_per_trial']:7.0f} ms CPU, "
            f"{block['wall_s_per_trial']:5.2f} s wall"
        )
    print(
        f"slope {slope:+.3f} ms per trial per trial (over {n} trials: {slope * n:+.0f} ms); "
        f"last block / first {figures['last_block_over_first']:.2f}"
    )
    print(f"MLflow: {len(runs)} child runs, statuses {dict(statuses)}")
    print(f"saved {RESULTS}")
    ok = len(runs) == n and not statuses.get("RUNNING")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
