"""Tokens/s of raylm on Ray Train against the same per-rank code under torchrun.

Both runs train the same model with the same ZeRO stage, worker count, global
batch and steps, in one invocation; the figure of merit is the ratio. A third
run on one worker gives MFU against the fp32 (and bf16) matmul peak measured
here, in this process, with one thread (what each worker gets).

    .venv/bin/python benchmarks/ray_vs_torchrun.py [--steps 30] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

MODEL = [
    "model.d_model=256",
    "model.n_layer=4",
    "model.n_head=8",
    "model.n_kv_head=4",
    "model.max_seq_len=256",
    "model.vocab_size=2048",
]


def common(steps: int, workers: int, zero: int) -> list:
    return [
        *MODEL,
        "stages=[{name: pretrain, kind: pretrain}]",
        f"train.max_steps={steps}",
        f"train.log_every={steps}",
        "train.eval_every=0",
        "train.ckpt_every=0",
        "train.global_batch_size=16",
        "train.sample_tokens=0",
        "parallel.micro_batch_size=4",
        f"parallel.zero_stage={zero}",
        f"cluster.num_workers={workers}",
        "logging.wandb.mode=disabled",
        "logging.progress=false",
    ]


def ray_run(root: Path, name: str, overrides: list) -> dict:
    from rich.console import Console

    from raylm.cluster.connect import describe, start_or_connect
    from raylm.configs.loader import load_config
    from raylm.launcher import run_dir as rundir
    from raylm.launcher.stages import run_all

    start_or_connect(None)
    run = load_config("tiny", [f"runs_dir={root}", f"name={name}", *overrides])
    run_dir = rundir.create(run, name)
    return run_all(run_dir, run, describe(embedded=True), Console(quiet=True))["stages"][0]


def torchrun_run(root: Path, name: str, overrides: list, workers: int) -> dict:
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={workers}", "--master-addr=127.0.0.1", "--master-port=29533",
        "-m", "raylm.launcher.torchrun_main", "--run-dir", str(root / name), "tiny", *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    return json.loads((root / name / "pretrain" / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from raylm.launcher.mfu import measure_matmul_peak

    torch.set_num_threads(1)
    peak_fp32 = measure_matmul_peak(torch.device("cpu"), torch.float32, seconds=2.0)
    peak_bf16 = measure_matmul_peak(torch.device("cpu"), torch.bfloat16, seconds=2.0)
    root = Path(tempfile.mkdtemp(prefix="raylm-bench-"))
    peak_override = [f"logging.mfu_peak_tflops={peak_fp32 / 1e12}"]
    on_ray = ray_run(root, "ray2", common(args.steps, 2, args.zero) + peak_override)
    on_torchrun = torchrun_run(root, "torchrun2", common(args.steps, 2, args.zero) + peak_override, 2)
    single = ray_run(root, "ray1", common(args.steps, 1, args.zero) + peak_override)
    result = {
        "steps": args.steps,
        "zero_stage": args.zero,
        "ray_tokens_per_s": on_ray["tokens_per_s"],
        "torchrun_tokens_per_s": on_torchrun["tokens_per_s"],
        "ray_over_torchrun": on_ray["tokens_per_s"] / on_torchrun["tokens_per_s"],
        "single_worker_tokens_per_s": single["tokens_per_s"],
        "peak_fp32_gflops_1_thread": peak_fp32 / 1e9,
        "peak_bf16_gflops_1_thread": peak_bf16 / 1e9,
        "single_worker_mfu_vs_fp32_peak": single["mfu"],
        "single_worker_mfu_vs_bf16_peak": single["mfu"] * peak_fp32 / peak_bf16,
        "final_loss_ray": on_ray["final_loss"],
        "final_loss_torchrun": on_torchrun["final_loss"],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ray_vs_torchrun.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
