"""Per-step times of the paper's backbones at 512 px, and what a 64-trial search costs on GPUs.

Measured here, on this machine's CPU: for each paper backbone at the paper's input (512 px,
LeViT at its fixed 224 px), 4 input channels, batch 16 (the paper's), one training step
(forward, joint loss, backward, AdamW step) and one validation forward, plus the forward
FLOPs per sample counted by ``torch.utils.flop_counter``.

Estimated, not measured (no GPU on this machine): the cost of a 64-trial search on a
4-node x 4-GPU cluster (``cluster.yaml``: g5.12xlarge, 4 x A10G). GPU time per trial is
``FLOPs x samples x epochs / achieved throughput``; the achieved throughput is an explicit
assumption (``--gpu-tflops``, a range), as are the dataset size, the per-trial start-up and
the prices. The CPU step times give the backbones' relative cost and the FLOP counts are
exact; everything else is labelled as an assumption in the output.

Prints tables and writes ``benchmarks/results/cluster_step_times.json``.

    .venv/bin/python benchmarks/cluster_step_times.py               # ~3-5 min on 2 cores
    .venv/bin/python benchmarks/cluster_step_times.py --smoke-test  # 64 px, batch 2, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from quakeray.config import LossConfig, ModelConfig
from quakeray.losses import build_loss
from quakeray.models import PRESETS, build_model, input_size_for

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "cluster_step_times.json"

# ---- assumptions of the cost estimate (all printed and saved with the figures)
PRICE_G5_12XL = 5.672  # USD/h on demand, g5.12xlarge, us-east-1/us-west-2 list price (assumed)
PRICE_M5_2XL = 0.384  # USD/h on demand, m5.2xlarge head (assumed)
CLUSTER_YAML = REPO / "cluster.yaml"
DATA_RESULTS = REPO / "benchmarks" / "results" / "data_throughput.json"
DATA_KEY = "quakeray, collate, 0 workers"  # one loader process, warm page cache, this CPU


def measured_input_rate() -> float | None:
    """Samples/s one loader process delivers (benchmarks/data_throughput.py), if measured."""
    if not DATA_RESULTS.is_file():
        return None
    results = json.loads(DATA_RESULTS.read_text()).get("results", {})
    return float(results[DATA_KEY]["samples_per_s"]) if DATA_KEY in results else None


def measure_backbone(name: str, *, native: int, batch: int, steps: int) -> dict[str, Any]:
    """Train-step and eval-forward times (median of ``steps``) and FLOPs of one backbone."""
    cfg = ModelConfig(backbone=name)
    size = input_size_for(cfg, native)
    torch.manual_seed(0)
    model = build_model(cfg, in_chans=4, img_size=size)
    params = sum(p.numel() for p in model.parameters())
    loss_fn = build_loss(LossConfig(margin=0.02, rank_weight=1.0, pairing="halves"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    x = torch.randn(batch, 4, size, size)
    y = torch.rand(batch) * 8.0

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x[:1])
    fwd_flops = counter.get_total_flops()

    def train_step() -> None:
        out = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        optimizer.step()

    def eval_step() -> None:
        with torch.no_grad():
            model(x)

    model.train()
    train_s = _median_time(train_step, steps)
    model.eval()
    eval_s = _median_time(eval_step, steps)
    return {
        "timm_name": PRESETS[name].timm_name,
        "input_px": size,
        "params_m": round(params / 1e6, 2),
        "fwd_gflops_per_sample": round(fwd_flops / 1e9, 3),
        "train_step_s": round(train_s, 3),
        "train_samples_per_s": round(batch / train_s, 2),
        "eval_step_s": round(eval_s, 3),
        "eval_samples_per_s": round(batch / eval_s, 2),
        # fwd + bwd ~ 3 x fwd FLOPs: how much of this CPU the step uses.
        "cpu_achieved_gflops": round(3 * fwd_flops * batch / train_s / 1e9, 1),
    }


def _median_time(fn: Any, steps: int) -> float:
    fn()  # warm-up: allocator, kernels, lazy init
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def asha_trial_epochs(*, trials: int, max_t: int, grace: int, rf: int) -> float:
    """Expected epochs of ``trials`` under synchronous-rate ASHA (1/rf continue per rung).

    An estimate: asynchronous ASHA promotes somewhat more trials early on (empty rungs
    promote everyone), so real searches land between this and ``trials * max_t``.
    """
    rungs = []
    milestone = grace
    while milestone < max_t:
        rungs.append(milestone)
        milestone *= rf
    epochs, done, fraction = 0.0, 0, 1.0
    for rung in [*rungs, max_t]:
        epochs += fraction * (rung - done)
        done = rung
        fraction /= rf
    return trials * epochs


def estimate_search(
    backbones: dict[str, dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    """GPU-hours, wall time and dollars of a 64-trial search per backbone (assumptions!)."""
    gpus = args.nodes * args.gpus_per_node
    concurrent = gpus // args.gpus_per_trial
    # Every GPU node also bills its start-up (boot, setup_commands, data staging) and the
    # idle timeout after the last trial; the idle timeout is read from cluster.yaml.
    idle_min = float(yaml.safe_load(CLUSTER_YAML.read_text())["idle_timeout_minutes"])
    node_fixed_h = (args.node_start_min + idle_min) / 60
    input_rate = measured_input_rate()
    asha = asha_trial_epochs(trials=args.trials, max_t=args.epochs, grace=1, rf=2)
    plans = {"asha": asha, "no_early_stopping": float(args.trials * args.epochs)}
    out: dict[str, Any] = {}
    for name, m in backbones.items():
        flops = m["fwd_gflops_per_sample"] * 1e9
        # One epoch: training (fwd+bwd = 3 x fwd) over the train split, a forward over val.
        epoch_flops = 3 * flops * args.train_samples + flops * args.val_samples
        # Reading and batching the samples bounds an epoch from below, whatever the GPU.
        input_s = (args.train_samples + args.val_samples) / input_rate if input_rate else 0.0
        rows = {}
        for tflops in args.gpu_tflops:
            epoch_gpu_s = max(epoch_flops / (tflops * 1e12), input_s)
            # = the measured CPU step x (measured CPU GFLOP/s / assumed GPU GFLOP/s)
            step_s = m["train_step_s"] * m["cpu_achieved_gflops"] / (tflops * 1e3)
            for plan, trial_epochs in plans.items():
                gpu_s = trial_epochs * epoch_gpu_s * args.gpus_per_trial
                gpu_s += args.trials * args.trial_overhead_s * args.gpus_per_trial
                # Trials run `concurrent` at a time; the cluster holds `gpus` GPUs throughout.
                wall_h = gpu_s / args.gpus_per_trial / concurrent / 3600
                dollars = (wall_h + node_fixed_h) * (args.nodes * PRICE_G5_12XL + PRICE_M5_2XL)
                rows[f"{tflops:g}TFLOPS/{plan}"] = {
                    "gpu_train_step_s": round(step_s, 4),
                    "epoch_gpu_min": round(epoch_gpu_s / 60, 2),
                    "trial_epochs": round(trial_epochs, 1),
                    "gpu_hours": round(gpu_s / 3600, 2),
                    "wall_hours": round(wall_h, 2),
                    "usd": round(dollars, 1),
                }
        out[name] = rows
    return {
        "assumptions": {
            "cluster": (
                f"{args.nodes} x g5.12xlarge ({args.gpus_per_node} x A10G) + m5.2xlarge head"
            ),
            "gpus_per_trial": args.gpus_per_trial,
            "concurrent_trials": concurrent,
            "trials": args.trials,
            "max_epochs": args.epochs,
            "asha": "grace_period 1, reduction_factor 2 (synchronous-rate estimate)",
            "train_samples_per_epoch": args.train_samples,
            "val_samples_per_epoch": args.val_samples,
            "achieved_gpu_tflops": args.gpu_tflops,
            "trial_overhead_s": args.trial_overhead_s,
            "input_samples_per_s": input_rate,
            "input_rate_source": f"{DATA_RESULTS.name}: {DATA_KEY} (measured on this CPU)",
            "gpu_node_start_min": args.node_start_min,
            "gpu_node_idle_timeout_min": idle_min,
            "usd_per_hour": {"g5.12xlarge": PRICE_G5_12XL, "m5.2xlarge": PRICE_M5_2XL},
            "note": "no GPU measurement: achieved TFLOPS is assumed; FLOPs are counted",
        },
        "per_backbone": out,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true", help="64 px, batch 2, 1 step")
    parser.add_argument("--batch", type=int, default=16, help="batch per step (paper: 16)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--backbones", nargs="*", default=list(PRESETS))
    # cost-estimate assumptions
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10, help="max epochs per trial (paper)")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--gpus-per-node", type=int, default=4)
    parser.add_argument("--gpus-per-trial", type=int, default=1)
    parser.add_argument(
        "--train-samples", type=int, default=2700, help="assumed train split size (samples)"
    )
    parser.add_argument("--val-samples", type=int, default=650, help="assumed val split size")
    parser.add_argument(
        "--gpu-tflops",
        type=float,
        nargs="+",
        default=[5.0, 20.0],
        help="assumed achieved TFLOPS per A10G (bf16 dense peak 125; fp32 31.2)",
    )
    parser.add_argument(
        "--trial-overhead-s", type=float, default=60.0, help="assumed start-up per trial"
    )
    parser.add_argument(
        "--node-start-min", type=float, default=10.0, help="assumed GPU node boot + setup"
    )
    parser.add_argument(
        "--from-json",
        action="store_true",
        help="re-estimate from the saved CPU measurements instead of measuring again",
    )
    args = parser.parse_args()
    native = 64 if args.smoke_test else 512
    batch = 2 if args.smoke_test else args.batch
    steps = 1 if args.smoke_test else args.steps

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch}")
    measured: dict[str, dict[str, Any]] = {}
    saved = json.loads(RESULTS.read_text()) if args.from_json else None
    if saved is not None:
        measured = saved["measured_cpu"]
        batch, native, steps = saved["batch"], saved["native_px"], saved["timed_steps"]
    for name in [] if saved is not None else args.backbones:
        t0 = time.perf_counter()
        measured[name] = measure_backbone(name, native=native, batch=batch, steps=steps)
        m = measured[name]
        print(
            f"{name:12s} {m['timm_name']:24s} {m['input_px']:4d}px {m['params_m']:6.2f}M "
            f"{m['fwd_gflops_per_sample']:7.2f} GFLOP/sample  train step {m['train_step_s']:7.2f}s "
            f"({m['train_samples_per_s']:6.2f}/s)  eval {m['eval_step_s']:6.2f}s  "
            f"[{time.perf_counter() - t0:.0f}s]",
            flush=True,
        )
    estimate = estimate_search(measured, args)
    print("\n64-trial search, 4 nodes x 4 A10G, 1 GPU per trial (ESTIMATE, see assumptions):")
    for name, rows in estimate["per_backbone"].items():
        for key, row in rows.items():
            print(
                f"  {name:12s} {key:28s} step {row['gpu_train_step_s'] * 1e3:6.1f} ms  "
                f"epoch {row['epoch_gpu_min']:6.2f} GPU-min  "
                f"{row['trial_epochs']:6.1f} trial-epochs  {row['gpu_hours']:7.2f} GPU-h  "
                f"{row['wall_hours']:6.2f} h wall  ${row['usd']:8.1f}"
            )
    machine = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }
    result = {
        "benchmark": "cluster_step_times",
        "smoke_test": args.smoke_test,
        "machine": saved["machine"] if saved is not None else machine,
        "batch": batch,
        "native_px": native,
        "timed_steps": steps,
        "measured_cpu": measured,
        "estimate": estimate,
    }
    if not args.smoke_test:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {RESULTS}")
    assert all(math.isfinite(m["train_step_s"]) for m in measured.values())


if __name__ == "__main__":
    main()
