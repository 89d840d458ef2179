"""The GPU-readiness issue's check, in one short run on one GPU.

    python benchmarks/gpu_check.py --out DIR [--preset 1.3b] [--steps 12]

Every check runs raylm's per-rank code under torchrun (one rank, NCCL on a GPU;
Ray is not needed there) or a raylm command, in a subprocess with its own time
limit, and the next check runs whatever the last one did, so one device slot
reports on all of them:

- ``bf16_zero0``: the tiny preset in bf16 with ZeRO-0 (which DeepSpeed runs as
  ZeRO-1), checkpoints at steps 4 and 8, eval, the end-of-stage sample; the
  final weights must be fp32, taken from the masters (issue points 3, 4, 10);
- ``resume``: step 8's checkpoint and the final weights removed, the stage
  resumes from step 4 (CUDA RNG states restored) and redoes steps 5-8 with the
  same losses, up to GPU kernels' run-to-run differences (point 6);
- ``mixture`` and ``classify``: a pretrain stage mixing two corpora by weight,
  then a classify stage on the built-in topic task from its weights;
- ``bf16_zero3`` and ``fp32_tf32``: the other precision and ZeRO paths, with a
  checkpoint;
- ``generate`` and ``eval``: ``raylm generate`` (sampling, so the GPU
  generator) and ``raylm eval`` of the first run, on the GPU (point 10);
- ``big``: the 1.3b preset (seq 2048, global batch 8 in micro-batches of 4,
  ZeRO-1, bf16) for a few steps: median tokens/s after the warm-up steps, MFU
  against the bf16 matmul peak measured in this process, peak GPU memory
  against ``raylm plan``'s estimate (points 8, 9). The byte tokenizer replaces
  BPE training (minutes on 32k merges); the vocabulary size, so the FLOPs,
  stay the preset's.

It writes nothing large: no checkpoint for the big run, and every run
directory lives in a scratch directory deleted at the end. ``--out`` receives
``gpu_check.json`` and ``checks.log``. On a CPU, ``--preset tiny`` runs every
check (fp32 in place of bf16) in a few minutes as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch
from safetensors import safe_open

from raylm.configs.loader import load_config
from raylm.models.flops import flops_per_token
from raylm.parallelism.memory import estimate
from raylm.trainer.mfu import measured_peak

WARMUP_STEPS = 3
SMALL_STEPS = 8
QUIET = ["logging.wandb.mode=disabled", "logging.progress=false", "train.log_every=1"]


class Checks:
    """Runs each check's command, keeps its output in one log, and collects the results."""

    def __init__(self, out: Path, scratch: Path, gpu: bool):
        self.log = open(out / "checks.log", "w")
        self.scratch, self.gpu = scratch, gpu
        self.results: Dict[str, dict] = {}

    def command(self, name: str, argv: List[str], timeout_s: int) -> bool:
        began = time.perf_counter()
        self.log.write(f"\n===== {name}: {' '.join(argv)}\n")
        self.log.flush()
        # Its own process group, so a timeout ends torchrun's rank too, not only torchrun.
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            output, _ = child.communicate(timeout=timeout_s)
            rc = child.returncode
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            output, rc = child.communicate()[0], "timeout"
        self.log.write(output[-20000:])
        self.log.flush()
        self.results[name] = {"ok": rc == 0, "rc": rc, "wall_s": round(time.perf_counter() - began, 1)}
        print(f"{name}: rc={rc} in {self.results[name]['wall_s']} s", flush=True)
        return rc == 0

    def train(self, name: str, run_dir: Path, preset: str, overrides: List[str], timeout_s: int, stage: int = 0) -> bool:
        """Stage ``stage`` of a run (one pretrain stage unless ``overrides`` set ``stages``)."""
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                "-m", "raylm.trainer.torchrun_main", "--run-dir", str(run_dir), "--stage", str(stage), preset,
                "stages=[{name: pretrain, kind: pretrain}]", "cluster.num_workers=1",
                f"cluster.use_gpu={'true' if self.gpu else 'false'}", *QUIET, *overrides]
        return self.command(name, argv, timeout_s)

    def note(self, name: str, **values) -> None:
        self.results[name].update(values)
        if values.get("ok") is False:
            print(f"{name}: {values}", flush=True)


def train_records(run_dir: Path) -> List[dict]:
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in records if r.get("kind") == "train"]


def losses_by_step(run_dir: Path) -> Dict[int, float]:
    return {r["step"]: r["loss"] for r in train_records(run_dir)}


def final_dtypes(run_dir: Path) -> List[str]:
    with safe_open(str(run_dir / "pretrain" / "final" / "model.safetensors"), "pt") as weights:
        return sorted({str(weights.get_slice(key).get_dtype()) for key in weights.keys()})


def small_checks(checks: Checks, low: str) -> None:
    """The tiny preset through every precision, ZeRO, checkpoint, resume and inference path."""
    small = ["train.global_batch_size=8", "parallel.micro_batch_size=4", "train.eval_batches=2", "train.sample_tokens=16"]
    run = checks.scratch / "bf16_zero0"
    stage = run / "pretrain"
    if checks.train("bf16_zero0", run, "tiny", [*small, f"train.precision={low}", "parallel.zero_stage=0",
                                              f"train.max_steps={SMALL_STEPS}", "train.ckpt_every=4", "train.eval_every=4"], 240):
        first = losses_by_step(run)
        checks.note("bf16_zero0", checkpoints=sorted(p.name for p in stage.glob("step_*")), final_dtypes=final_dtypes(run),
                    ok=(stage / "step_0000004").is_dir() and final_dtypes(run) == ["F32"])

        for name, argv in (("generate", ["generate", str(run), "--prompt", "The", "--max-new-tokens", "24"]),
                           ("eval", ["eval", str(run), "--max-batches", "4"])):
            checks.command(name, [sys.executable, "-m", "raylm.launcher.cli", *argv], 180)

        for removed in (stage / f"step_{SMALL_STEPS:07d}", stage / "final", stage / "summary.json"):
            shutil.rmtree(removed, ignore_errors=True) if removed.is_dir() else removed.unlink(missing_ok=True)
        (run / "metrics.jsonl").rename(run / "first_metrics.jsonl")
        if checks.train("resume", run, "tiny", [*small, f"train.precision={low}", "parallel.zero_stage=0",
                                                f"train.max_steps={SMALL_STEPS}", "train.ckpt_every=4", "train.eval_every=4"], 240):
            redone = losses_by_step(run)
            worst = max(abs(redone[step] - first[step]) for step in redone)
            # bf16 matmuls and atomics-based embedding gradients differ run to run on a GPU: a loss near 7 moves by ~1e-3.
            checks.note("resume", steps_redone=sorted(redone), max_loss_difference=worst,
                        ok=sorted(redone) == list(range(5, SMALL_STEPS + 1)) and worst < 2e-2)

    stage_kinds(checks, small, low)
    # Its checkpoints are asynchronous: the snapshot copies CUDA storages into reused host buffers.
    checks.train("bf16_zero3", checks.scratch / "bf16_zero3", "tiny",
                 [*small, f"train.precision={low}", "parallel.zero_stage=3", "train.max_steps=6", "train.ckpt_every=3", "train.eval_every=0",
                  "train.async_checkpoint=true"], 240)
    checks.train("fp32_tf32", checks.scratch / "fp32_tf32", "tiny",
                 [*small, "train.precision=fp32", "parallel.zero_stage=1", "train.max_steps=4", "train.ckpt_every=4", "train.eval_every=0"], 240)


def stage_kinds(checks: Checks, small: List[str], low: str) -> None:
    """A mixture of two corpora, then a classify stage on the built-in topic task from its weights."""
    extra = checks.scratch / "extra.jsonl"
    extra.write_text("".join(json.dumps({"text": f"Document {i}: the quick brown fox jumps over the lazy dog."}) + "\n" for i in range(400)))
    run = checks.scratch / "kinds"
    stages = ("stages=[{name: pretrain, kind: pretrain, data: {sources: [{path: 'builtin:pydoc', weight: 0.7}, "
              f"{{path: '{extra}', weight: 0.3}}]}}}}, {{name: topics, kind: classify, data: {{source: 'builtin:pydoc-topic'}}}}]")
    common = [*small, stages, f"train.precision={low}", "parallel.zero_stage=1", "train.max_steps=6", "train.ckpt_every=0",
              "train.eval_every=0"]
    if checks.train("mixture", run, "tiny", common, 240, stage=0):
        summary = json.loads((run / "pretrain" / "summary.json").read_text())
        checks.note("mixture", consumed_by_source=summary.get("consumed_by_source"), ok=bool(summary.get("consumed_by_source")))
        if checks.train("classify", run, "tiny", common, 240, stage=1):
            summary = json.loads((run / "topics" / "summary.json").read_text())
            checks.note("classify", accuracy=summary.get("accuracy"), ok=summary.get("accuracy") is not None)


def big_check(checks: Checks, preset: str, steps: int, low: str) -> None:
    """Throughput, MFU and peak memory of a large preset against ``raylm plan``."""
    device = torch.device("cuda" if checks.gpu else "cpu")
    dtype = torch.bfloat16 if checks.gpu else torch.float32
    peak = measured_peak(device, dtype)
    overrides = ["parallel.zero_stage=1", f"train.precision={low}", "parallel.micro_batch_size=4", "train.global_batch_size=8",
                 f"train.max_steps={steps}", "train.eval_every=0", "train.eval_batches=1", "train.ckpt_every=0",
                 "train.sample_tokens=0", "data.tokenizer=byte", f"logging.mfu_peak_tflops={peak.flops / 1e12}"]
    run = checks.scratch / "big"
    if not checks.train("big", run, preset, overrides, 420):
        return
    cfg = load_config(preset, ["stages=[{name: pretrain, kind: pretrain}]", "cluster.num_workers=1", *overrides])
    records = train_records(run)
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in records if r["step"] > WARMUP_STEPS)
    per_token = flops_per_token(cfg.model, cfg.model.max_seq_len)
    measured_gib = max(r["mem_gb"] for r in records)
    planned_gib = estimate(cfg, bf16=low == "bf16").total_gib(cfg.parallel.activation_checkpointing)
    checks.note("big", preset=preset, steps=steps, seq_len=cfg.model.max_seq_len, global_batch=8, micro_batch=4,
                matmul_peak_tflops=peak.flops / 1e12, matmul_peak_size=peak.matmul_size, tokens_per_s_median_after_warmup=tokens_per_s,
                flops_per_token=per_token, mfu=per_token * tokens_per_s / peak.flops,
                peak_memory_gib=measured_gib, plan_gib=planned_gib, plan_error=planned_gib / measured_gib - 1)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="1.3b", help="the big run's preset")
    parser.add_argument("--steps", type=int, default=12, help="the big run's steps")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    low = "bf16" if gpu else "fp32"  # raylm trains in fp32 on a CPU
    scratch = Path(tempfile.mkdtemp(prefix="raylm-gpu-check-"))
    checks = Checks(args.out, scratch, gpu)
    began = time.perf_counter()
    try:
        small_checks(checks, low)
        big_check(checks, args.preset, args.steps, low)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = {"device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
              "python": sys.version.split()[0], "wall_s": round(time.perf_counter() - began, 1), "checks": checks.results}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if all(result["ok"] for result in checks.results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
