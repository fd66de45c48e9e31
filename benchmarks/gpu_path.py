"""The GPU path in one short run, for a session that is lent a GPU machine.

Everything issue 12 (item 5) asks of a GPU, in one script that a device call runs once:

1. **Training**: bf16 autocast training steps (forward, joint loss, backward, AdamW) of
   each paper backbone at 512 px (LeViT at its 224 px) on synthetic tensors already on
   the device: samples/s and peak GPU memory (``torch.cuda.max_memory_allocated``).
2. **The data path beside it**: a generated 512 px QuakeSet file read the way training
   reads it (``QuakeSetDataset(layout="raw")`` + ``collate``, one loader process, warm page
   cache), samples/s; and ``BatchTransform`` on the device, ms per batch. Per backbone:
   input-bound when one loader process delivers fewer samples/s than the step consumes
   (then raise ``data.loader_workers``), else compute-bound.
3. **A 2-trial smoke search on the GPU**: ``quakeray tune --smoke-test
   scaling.use_gpu=true`` in a subprocess (its single-worker trials train in the trial's
   own process, on the GPU Ray gives it): exit code and wall time.

Prints a table and writes ``benchmarks/results/gpu_path.json`` (the card's name in it).

    .venv/bin/python benchmarks/gpu_path.py                            # a GPU machine, ~4 min
    .venv/bin/python benchmarks/gpu_path.py --device cpu --smoke-test  # checks it runs, here
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from quakeray.config import DataConfig, LossConfig, ModelConfig
from quakeray.data.quakeset import QuakeSetDataset, collate
from quakeray.data.synthetic import write_synthetic
from quakeray.data.transforms import build_transform, compute_stats
from quakeray.losses import build_loss
from quakeray.models import PRESETS, build_model, input_size_for

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "gpu_path.json"


def _timed(fn: Any, steps: int, device: torch.device) -> float:
    """Median seconds of ``fn`` over ``steps`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_rate(
    name: str, *, native: int, batch: int, steps: int, device: torch.device
) -> dict[str, Any]:
    """bf16 training samples/s and peak memory of one backbone on ``device``."""
    cfg = ModelConfig(backbone=name)
    size = input_size_for(cfg, native)
    torch.manual_seed(0)
    model = build_model(cfg, in_chans=4, img_size=size).to(device).train()
    loss_fn = build_loss(LossConfig(margin=0.02, rank_weight=1.0, pairing="halves"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    x = torch.randn(batch, 4, size, size, device=device)
    y = torch.rand(batch, device=device) * 8.0
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the previous backbone's tensors are gone by now
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        optimizer.step()

    seconds = _timed(step, steps, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "input_px": size,
        "batch": batch,
        "train_samples_per_s": round(batch / seconds, 1),
        "peak_gpu_mib": None if peak is None else round(peak, 1),
    }


def input_rates(path: Path, *, batch: int, device: torch.device) -> dict[str, float]:
    """Samples/s of training's read (one loader process) and ms of the transform per batch."""
    dataset = QuakeSetDataset(path, "train", layout="raw")
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, collate_fn=collate)
    for _ in loader:  # warm the page cache
        pass
    start, samples = time.perf_counter(), 0
    for _ in range(3):
        for item in loader:
            samples += len(item["magnitude"])
    read_s = time.perf_counter() - start
    stats = compute_stats(path, progress=False)  # as `quakeray data stats` does
    transform = build_transform(DataConfig(), stats).to(device).train()
    images = next(iter(loader))["image"].to(device)
    transform_s = _timed(lambda: transform(images, layout="raw"), 5, device)
    return {
        "read_samples_per_s": round(samples / read_s, 1),
        "transform_ms_per_batch": round(transform_s * 1000, 2),
        "transform_batch": int(images.shape[0]),
    }


def smoke_search(root: Path, device: torch.device) -> dict[str, Any]:
    """``quakeray tune --smoke-test`` on the device: exit code and wall seconds."""
    gpu = "true" if device.type == "cuda" else "false"
    start = time.perf_counter()
    command = [sys.executable, "-m", "quakeray", "tune", "--smoke-test"]
    proc = subprocess.run(
        [*command, f"scaling.use_gpu={gpu}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}"],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        timeout=600,
    )
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
    return {
        "exit_code": proc.returncode,
        "wall_s": round(time.perf_counter() - start, 1),
        "tail": tail,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--smoke-test", action="store_true", help="64 px, batch 2, one step")
    parser.add_argument("--batch", type=int, default=16, help="the paper's batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backbones", nargs="*", default=list(PRESETS))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_path: no CUDA device here; pass --device cpu to check the script", file=sys.stderr
        )
        return 2
    native = 64 if args.smoke_test else 512
    batch = 2 if args.smoke_test else args.batch
    steps = 1 if args.smoke_test else args.steps
    root = Path(tempfile.mkdtemp(prefix="qr-gpu-path-"))
    figures: dict[str, Any] = {
        "machine": platform.platform(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "smoke_test": args.smoke_test,
        "native_px": native,
    }
    data = write_synthetic(root / "q.h5", events=8 if args.smoke_test else 24, size=native)
    inputs = input_rates(data, batch=batch, device=device)
    figures["input"] = inputs
    backbones = {}
    for name in args.backbones:
        rate = train_rate(name, native=native, batch=batch, steps=steps, device=device)
        rate["bound"] = (
            "input" if inputs["read_samples_per_s"] < rate["train_samples_per_s"] else "compute"
        )
        backbones[name] = rate
        print(f"{name:<22} {rate}", flush=True)
    figures["train_bf16"] = backbones
    figures["smoke_search"] = smoke_search(root, device)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    out = root / "gpu_path.json" if args.smoke_test else RESULTS  # a smoke run: not a figure
    out.write_text(json.dumps(figures, indent=1))
    print(f"\ndevice {figures['device']}; input: {inputs}")
    print(f"{'backbone':<22} {'px':>4} {'samples/s':>10} {'peak MiB':>9}  bound")
    for name, rate in backbones.items():
        peak = "-" if rate["peak_gpu_mib"] is None else f"{rate['peak_gpu_mib']:.0f}"
        print(
            f"{name:<22} {rate['input_px']:>4} {rate['train_samples_per_s']:>10.1f} "
            f"{peak:>9}  {rate['bound']}"
        )
    search = figures["smoke_search"]
    print(f"smoke search: exit {search['exit_code']} in {search['wall_s']} s")
    print(f"saved {out}")
    return 0 if search["exit_code"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
