"""What the benchmarks share: the model, the single-stage overrides, one Ray run, result files, timed raw baselines."""

from __future__ import annotations

import json
import statistics
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

# Tiny but not trivial: d_model 256, 4 layers, GQA 8/4 heads, 256-token context.
MODEL = ["model.d_model=256", "model.n_layer=4", "model.n_head=8", "model.n_kv_head=4", "model.max_seq_len=256", "model.vocab_size=2048"]


def pretrain_overrides(steps: int, workers: int, zero: int, tp: int = 1, pp: int = 1, log_every: Optional[int] = None) -> List[str]:
    """One pretrain stage, global batch 16 x micro-batch 4, no eval, W&B and progress bar off."""
    return [
        *MODEL,
        "stages=[{name: pretrain, kind: pretrain}]",
        f"train.max_steps={steps}",
        f"train.log_every={log_every or steps}",
        "train.eval_every=0",
        "train.global_batch_size=16",
        "train.sample_tokens=0",
        "parallel.micro_batch_size=4",
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        f"parallel.zero_stage={zero}",
        f"cluster.num_workers={workers}",
        "logging.wandb.mode=disabled",
        "logging.progress=false",
    ]


def run_on_ray(root: Path, name: str, overrides: List[str], info) -> dict:
    """Run every stage of the tiny preset with ``overrides``; the summary of run_all."""
    from rich.console import Console

    from raylm.configs.loader import load_config
    from raylm.trainer import run_dir as rundir
    from raylm.launcher.stages import run_all

    run = load_config("tiny", [f"runs_dir={root}", f"name={name}", *overrides])
    return run_all(rundir.create(run, name), run, info, Console(quiet=True))


def write_result(out: Optional[Path], name: str, result: dict) -> None:
    print(json.dumps(result, indent=2))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))


def cpu_model() -> str:
    """The CPU's model name, as lscpu gives it (results name the machine they were measured on)."""
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "?")


def torchrun_stage(run_dir: Path, overrides: List[str], workers: int, threads: int = 1) -> float:
    """One stage of the tiny preset with ``overrides`` under torchrun into ``run_dir`` (its metrics.jsonl and
    ``<stage>/summary.json`` there); the command's wall seconds."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={workers}", "--master-addr=127.0.0.1",
               "--master-port=29533", "-m", "raylm.trainer.torchrun_main", "--run-dir", str(run_dir), "tiny", *overrides]
    began = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True)
    return time.perf_counter() - began


def median_rate(transfer: Callable[[int], None], size: int, probes: int = 3) -> float:
    """Bytes/s of ``transfer(attempt)``, which moves ``size`` bytes: the median of ``probes`` timed attempts (a raw
    baseline varies from one attempt to the next on a shared machine)."""
    seconds = []
    for attempt in range(probes):
        began = time.perf_counter()
        transfer(attempt)
        seconds.append(time.perf_counter() - began)
    return size / statistics.median(seconds)
