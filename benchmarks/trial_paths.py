"""Single-worker trials: Ray Train's worker group (before) against the trial's own process (after).

Two measurements, each with the old and the new path side by side in one run, interleaved
in rounds (the machine's load drifts):

(1) **Fixed cost per single-worker trial.** Sequential searches (one trial at a time, no
ASHA) of ``--trials`` trials of 2 epochs each, every trial clocked by the same driver-side
Tune callback as ``search_overhead.py`` (its span minus its epochs, plus the gap before
it). Per round:

- **bare Tune trial + torch/timm**: a Tune function trial that imports torch and timm and
  reports once (Tune's defaults: a fresh trial process each time). The reference of the
  target: a quakeray trial's fixed cost <= 1.3x this.
- **bare Tune trial + torch/timm, reused**: the same with ``reuse_actors=True`` (the
  process setting the new path uses), for scale.
- **quakeray, worker group** (``search.in_process_trials=false``, the old path): a
  1-worker ``TorchTrainer`` per trial.
- **quakeray, in the trial's process** (the default now).

Target: new <= 0.5x old, and new <= 1.3x the bare Tune trial.

(2) **The demo's work per minute.** ``experiments/demo.yaml`` as the README runs it (6
trials, 2 at a time, on this machine's local Ray), at equal trials and epochs: ASHA off,
``--demo-epochs`` epochs per trial (8 = the demo's first ASHA rung, where most of its
trials stop), no confirmation. Wall time of ``run_search`` and trial-epochs per minute,
old and new path. Target: new >= 2x old.

Prints a table and writes ``benchmarks/results/trial_paths.json``.

    .venv/bin/python benchmarks/trial_paths.py               # ~12 min on 2 cores
    .venv/bin/python benchmarks/trial_paths.py --smoke-test  # ~3 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray
from optuna.distributions import FloatDistribution
from ray import tune
from search_overhead import TrialClock, search_cfg

from quakeray.config import load_config
from quakeray.search import run_search

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "trial_paths.json"
PATHS = {"worker_group": "false", "in_process": "true"}  # search.in_process_trials


def _bare_trial(config: dict[str, Any]) -> None:
    """A Tune function trial that imports torch and timm, then reports once."""
    import timm  # noqa: F401
    import torch  # noqa: F401

    tune.report({"ok": 1.0})


def bare_trials(storage: str, n: int, *, reuse: bool) -> list[dict[str, float]]:
    """Fixed costs of ``n`` sequential bare Tune function trials (1 CPU each, as ours)."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    clock = TrialClock()
    searcher = OptunaSearch(space={"x": FloatDistribution(0.0, 1.0)}, metric="ok", mode="max")
    tuner = tune.Tuner(
        tune.with_resources(_bare_trial, {"cpu": 1.5}),
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=1),
            num_samples=n,
            reuse_actors=reuse,
        ),
        run_config=tune.RunConfig(
            name=f"bare-{'reuse' if reuse else 'fresh'}",
            storage_path=storage,
            callbacks=[clock],
            verbose=0,
        ),
    )
    tuner.fit()
    return clock.costs()


def quakeray_trials(root: Path, data: str, name: str, n: int, in_process: str) -> Any:
    """Fixed costs of ``n`` sequential 1-worker quakeray trials of 2 epochs."""
    cfg = search_cfg(
        root,
        data,
        name,
        [
            "optim.epochs=2",
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=0.5",
            f"search.num_samples={n}",
            "search.max_concurrent=1",
            "search.asha=false",
            f"search.in_process_trials={in_process}",
        ],
    )
    clock = TrialClock()
    run_search(cfg, callbacks=[clock])
    return clock.costs()


def demo_run(root: Path, name: str, epochs: int, in_process: str) -> dict[str, float]:
    """The README's demo at equal trials and epochs: wall seconds and trial-epochs/min."""
    cfg = load_config(
        REPO / "experiments" / "demo.yaml",
        [
            f"run.storage_path={root / 'ray_results'}",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            f"search.name={name}",
            f"optim.epochs={epochs}",
            "search.asha=false",
            "search.confirm=false",
            "search.evaluate_best=false",
            f"search.in_process_trials={in_process}",
        ],
    )
    clock = TrialClock()
    t0 = time.perf_counter()
    run_search(cfg, callbacks=[clock])
    wall = time.perf_counter() - t0
    trial_epochs = sum(len(t["results"]) for t in clock.trials.values())
    return {
        "wall_s": wall,
        "trials": len(clock.trials),
        "trial_epochs": trial_epochs,
        "trial_epochs_per_min": trial_epochs / wall * 60,
    }


def _median_fixed(costs: list[dict[str, float]]) -> float:
    return statistics.median(c["fixed_s"] for c in costs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true", help="one short round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trials", type=int, default=4, help="per fixed-cost search")
    parser.add_argument("--demo-epochs", type=int, default=8)
    args = parser.parse_args()
    rounds = 1 if args.smoke_test else args.rounds
    trials = 2 if args.smoke_test else args.trials
    demo_epochs = 2 if args.smoke_test else args.demo_epochs

    from quakeray.data.synthetic import write_synthetic

    root = Path(tempfile.mkdtemp(prefix="qr-trial-paths-"))
    data = str(write_synthetic(root / "q.h5", events=48, size=32, seed=0))
    load_before = os.getloadavg()
    # The demo's Ray, as `quakeray tune` starts it on this machine (2 trials x 1.5 CPUs).
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    fixed_rounds, demo_rounds = [], []
    for i in range(rounds):
        row: dict[str, Any] = {
            "bare_fresh": bare_trials(str(root / f"bare-fresh-{i}"), trials + 1, reuse=False),
            "bare_reused": bare_trials(str(root / f"bare-reuse-{i}"), trials + 1, reuse=True),
        }
        for path, flag in PATHS.items():
            row[path] = quakeray_trials(root, data, f"fixed-{path}-{i}", trials + 1, flag)
        row["median_fixed_s"] = {k: _median_fixed(v) for k, v in row.items()}
        fixed_rounds.append(row)
        demo_rounds.append(
            {
                path: demo_run(root, f"demo-{path}-{i}", demo_epochs, flag)
                for path, flag in PATHS.items()
            }
        )
    ray.shutdown()

    def med(key: str) -> float:
        return statistics.median(r["median_fixed_s"][key] for r in fixed_rounds)

    fixed = {k: med(k) for k in ("bare_fresh", "bare_reused", "worker_group", "in_process")}
    demo = {
        path: statistics.median(r[path]["trial_epochs_per_min"] for r in demo_rounds)
        for path in PATHS
    }
    figures = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "smoke_test": args.smoke_test,
        "fixed_cost": {
            "rounds": fixed_rounds,
            "median_fixed_s": fixed,
            "new_over_old": fixed["in_process"] / fixed["worker_group"],
            "new_over_bare_fresh": fixed["in_process"] / fixed["bare_fresh"],
            "new_over_bare_reused": fixed["in_process"] / fixed["bare_reused"],
            "targets": {"new_over_old_max": 0.5, "new_over_bare_fresh_max": 1.3},
        },
        "demo": {
            "epochs_per_trial": demo_epochs,
            "rounds": demo_rounds,
            "median_trial_epochs_per_min": demo,
            "new_over_old": demo["in_process"] / demo["worker_group"],
            "target_min": 2.0,
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=1))
    print(f"\nfixed cost of a single-worker trial (median of {rounds} rounds, s):")
    for key, value in fixed.items():
        print(f"  {key:<14} {value:7.2f}")
    fc = figures["fixed_cost"]
    print(f"  new / old          {fc['new_over_old']:.2f}  (target <= 0.5)")
    print(f"  new / bare fresh   {fc['new_over_bare_fresh']:.2f}  (target <= 1.3)")
    print(f"  new / bare reused  {fc['new_over_bare_reused']:.2f}")
    print(f"demo, {demo_epochs} epochs x 6 trials, trial-epochs per minute:")
    for path, value in demo.items():
        print(f"  {path:<14} {value:7.1f}")
    print(f"  new / old          {figures['demo']['new_over_old']:.2f}  (target >= 2)")
    print(f"saved {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
