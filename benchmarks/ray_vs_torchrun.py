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

from common import pretrain_overrides, run_on_ray, write_result

def torchrun_run(root: Path, name: str, overrides: list, workers: int) -> dict:
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={workers}", "--master-addr=127.0.0.1", "--master-port=29533",
        "-m", "raylm.trainer.torchrun_main", "--run-dir", str(root / name), "tiny", *overrides,
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

    from raylm.cluster.connect import start_or_connect
    from raylm.trainer.mfu import measure_matmul_peak

    torch.set_num_threads(1)
    peak_fp32 = measure_matmul_peak(torch.device("cpu"), torch.float32, seconds=2.0)
    peak_bf16 = measure_matmul_peak(torch.device("cpu"), torch.bfloat16, seconds=2.0)
    root = Path(tempfile.mkdtemp(prefix="raylm-bench-"))
    peak_override = [f"logging.mfu_peak_tflops={peak_fp32 / 1e12}"]
    info = start_or_connect(None)
    on_ray = run_on_ray(root, "ray2", pretrain_overrides(args.steps, 2, args.zero) + peak_override, info)["stages"][0]
    on_torchrun = torchrun_run(root, "torchrun2", pretrain_overrides(args.steps, 2, args.zero) + peak_override, 2)
    single = run_on_ray(root, "ray1", pretrain_overrides(args.steps, 1, args.zero) + peak_override, info)["stages"][0]
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
    write_result(args.out, "ray_vs_torchrun", result)


if __name__ == "__main__":
    main()
