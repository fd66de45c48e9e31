"""Does the demo's model learn the magnitude scale? Each change alone, against the median predictor.

Trains ``test_resnet`` through the product's own path (``quakeray.train.run_training``
in-process, ``scaling.num_workers=0``: the same worker loop as a Ray run) on the demo's
generated file, once per seed, and evaluates the best checkpoint on test. Every figure is
a ratio to the constant that predicts the train split's median magnitude for every
sample, on the same split (1.0: no better than that constant; the demo's target: at most
0.5 on validation and 0.6 on test).

Cases, each on 3 seeds:

- ``before``: the demo as it was (48 events, 4 epochs of batch 8 at lr 3e-3, raw head);
- ``raw_short``: the same schedule on the demo's data now (96 events);
- ``std_short``: + the standardised target (the head learns (y - mean) / std);
- ``raw_long``: the raw head with the demo's schedule now (60 epochs, batch 16, lr 1e-2);
- ``after``: both, the demo now (the settings of ``experiments/paper/improved/``);
- ``faithful``: the demo's data and schedule with every switch of the paper's code
  (``experiments/paper/protocol.yaml``): raw head, clamp in forward, halves pairing with
  ties, no input standardisation, the checkpoint with the best ``val_loss``.

Run: ``.venv/bin/python benchmarks/learning.py`` (about 4 minutes on 2 cores); writes
``benchmarks/results/learning.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np

from quakeray.config import load_config
from quakeray.data.synthetic import write_synthetic
from quakeray.evaluate import evaluate_checkpoint
from quakeray.train import run_training

OLD_SCHEDULE = ["optim.epochs=4", "optim.batch_size=8", "optim.lr=0.003"]
NEW_SCHEDULE = ["optim.epochs=60", "optim.batch_size=16", "optim.lr=0.01"]
FAITHFUL = [
    "model.standardize_target=false",
    "model.clamp_in_forward=true",
    "loss.pairing=halves",
    "data.normalize=false",
    "run.checkpoint_metric=val_loss",
]
CASES: dict[str, tuple[int, list[str]]] = {
    "before": (48, [*OLD_SCHEDULE, "model.standardize_target=false"]),
    "raw_short": (96, [*OLD_SCHEDULE, "model.standardize_target=false"]),
    "std_short": (96, [*OLD_SCHEDULE, "model.standardize_target=true"]),
    "raw_long": (96, [*NEW_SCHEDULE, "model.standardize_target=false"]),
    "after": (96, [*NEW_SCHEDULE, "model.standardize_target=true"]),
    # The paper's code on the same data and schedule (experiments/paper/protocol.yaml's
    # switches), against `after`, which is experiments/paper/improved/'s settings.
    "faithful": (96, [*NEW_SCHEDULE, *FAITHFUL]),
}


def train_once(root: Path, data: Path, overrides: list[str], seed: int) -> dict[str, float]:
    """One in-process training run and a test evaluation of its best checkpoint."""
    cfg = load_config(
        None,
        [
            f"data.path={data}",
            f"run.storage_path={root / 'runs'}",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            "scaling.num_workers=0",
            "tracking.log_model=false",
            "model.backbone=test_resnet",
            f"optim.seed={seed}",
            f"run.name=run-{time.time_ns()}",
            *overrides,
        ],
    )
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = run_training(cfg)
    wall = time.perf_counter() - t0
    assert summary.best_checkpoint is not None
    test = evaluate_checkpoint(summary.best_checkpoint, split="test").metrics
    best = summary.best_metrics
    return {
        "val_ratio": best["val_MAE"] / best["val_MAE_const_median"],
        "test_ratio": test["test_MAE"] / test["test_MAE_const_median"],
        "test_spearman": test["test_spearman"],
        "val_MAE": best["val_MAE"],
        "val_MAE_const_median": best["val_MAE_const_median"],
        "best_epoch": float(summary.best_epoch or 0),
        "wall_s": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true", help="1 seed, 2 epochs")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    seeds = [42] if args.smoke_test else [42 + i for i in range(args.seeds)]
    root = Path(tempfile.mkdtemp(prefix="qr-learning-"))
    files = {n: write_synthetic(root / f"e{n}.h5", events=n, size=32, seed=0) for n in (48, 96)}
    figures: dict[str, Any] = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
        "seeds": seeds,
        "cases": {},
    }
    print(f"{'case':<10} {'val/const':>16} {'test/const':>16} {'test rho':>9} {'wall s':>7}")
    for name, (events, overrides) in CASES.items():
        if args.smoke_test:
            overrides = [*overrides, "optim.epochs=2"]
        runs = [train_once(root, files[events], overrides, seed) for seed in seeds]
        summary = {
            key: {
                "mean": statistics.fmean(r[key] for r in runs),
                "sd": statistics.stdev(r[key] for r in runs) if len(runs) > 1 else 0.0,
            }
            for key in runs[0]
        }
        figures["cases"][name] = {"events": events, "overrides": overrides, "runs": runs, **summary}

        def cell(key: str, s: dict[str, Any] = summary) -> str:
            return f"{s[key]['mean']:.2f} +- {s[key]['sd']:.2f}"

        print(
            f"{name:<10} {cell('val_ratio'):>16} {cell('test_ratio'):>16} "
            f"{summary['test_spearman']['mean']:>9.2f} {summary['wall_s']['mean']:>7.1f}",
            flush=True,
        )
    figures["load_after"] = os.getloadavg()
    if not args.smoke_test:
        out = Path(__file__).parent / "results" / "learning.json"
        out.write_text(json.dumps(figures, indent=1, default=float))
        print(f"wrote {out}")
    return 0 if all(np.isfinite(c["val_ratio"]["mean"]) for c in figures["cases"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
