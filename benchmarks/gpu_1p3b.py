"""The 3D-parallelism issue's GPU check: the 1.3b preset on one GPU, bf16, ZeRO-1.

    python benchmarks/gpu_1p3b.py --out DIR [--steps 12] [--preset 1.3b]

Measures the bf16 matmul peak of the GPU in this process (raylm's own best-of-sizes measure),
then trains the preset for a few steps with the per-rank code under torchrun
(one rank, NCCL; Ray is not needed on the GPU machine) and reports tokens/s
and MFU against that peak, leaving out the first steps (allocator and kernel
warm-up). The byte tokenizer replaces BPE training (minutes on 32k merges);
the vocabulary size, so the FLOPs, stay the preset's. ``benchmarks/gpu_wheels.sh``
fetches the packages a bare GPU image lacks. On a CPU, ``--preset tiny``
runs the same path in a minute as a smoke test.

It fits a device slot of minutes: no checkpoint is written (``train.ckpt_every=0``), and the run directory
(tokenized data, the consolidated final weights: 5 GB for 1.3b) lives in a scratch directory that is
deleted at the end; ``--out`` receives only the log and the JSON result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from raylm.configs.loader import load_config
from raylm.trainer.mfu import measured_peak
from raylm.models.flops import flops_per_token

WARMUP_STEPS = 3


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="1.3b")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    peak = measured_peak(device, torch.bfloat16).flops
    overrides = [
        "stages=[{name: pretrain, kind: pretrain}]",
        "cluster.num_workers=1", f"cluster.use_gpu={'true' if gpu else 'false'}",
        "parallel.zero_stage=1", "train.precision=bf16", f"parallel.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.global_batch}", f"train.max_steps={args.steps}", "train.log_every=1",
        "train.eval_every=0", "train.eval_batches=1", "train.ckpt_every=0", "train.sample_tokens=0",
        "data.tokenizer=byte", "logging.wandb.mode=disabled", "logging.progress=false",
        f"logging.mfu_peak_tflops={peak / 1e12}",
    ]
    scratch = Path(tempfile.mkdtemp(prefix="raylm-gpu-check-"))
    run_dir = scratch / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "raylm.trainer.torchrun_main", "--run-dir", str(run_dir), args.preset, *overrides]
    began = time.perf_counter()
    with open(args.out / "train.log", "w") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - began
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] if (run_dir / "metrics.jsonl").exists() else []
    shutil.rmtree(scratch, ignore_errors=True)
    if finished.returncode != 0:
        print((args.out / "train.log").read_text()[-4000:])
        return finished.returncode

    cfg = load_config(args.preset, overrides)
    steady = [r["tokens_per_s"] for r in records if r.get("kind") == "train" and r["step"] > WARMUP_STEPS]
    tokens_per_s = statistics.median(steady)
    per_token = flops_per_token(cfg.model, cfg.model.max_seq_len)
    result = {
        "preset": args.preset, "device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
        "bf16_matmul_peak_tflops": peak / 1e12, "steps": args.steps, "global_batch": args.global_batch,
        "micro_batch": args.micro_batch, "seq_len": cfg.model.max_seq_len, "tokens_per_s_median_after_warmup": tokens_per_s,
        "flops_per_token": per_token, "mfu": per_token * tokens_per_s / peak,
        "peak_memory_gb": max(r["mem_gb"] for r in records if r.get("kind") == "train"), "wall_s": wall,
    }
    (args.out / "gpu_1p3b.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
