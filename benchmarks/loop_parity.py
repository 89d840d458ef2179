"""raylm's cost over the same work done plainly: issue 12's step and stage overhead rows, as ratios from one run.

1. One worker, 2 threads, fp32, d_model 768 x 4 layers, T 256, micro-batch 4 = global batch 4, ZeRO-0:
   raylm's tokens/s (under torchrun, and on Ray) over a plain PyTorch loop in this process (the same
   ``raylm.models.Llama``, ``torch.optim.AdamW`` with raylm's parameter groups and schedule, gradient clipping;
   no DeepSpeed, no Ray, no process group).
2. Two workers, one thread each, benchmarks.common's model, ZeRO-2: Ray Train over torchrun, the same per-rank code.
3. The same two-worker stage's wall time outside its training steps: ``raylm launch`` (Ray started in the
   process) over torchrun's, each measured around its own command.

Tokens/s is the median of the logged windows after the first (the first holds one-time warm-up), on every side.
On shared cores one round's ratios move by 0.1 or more between runs of the same code (other tenants, the host),
so ``--rounds N`` repeats every side N times, each round's sides back to back, and reports each ratio's
median, lowest and highest over the rounds beside the rounds themselves.

    .venv/bin/python benchmarks/loop_parity.py [--steps 25] [--rounds 1] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import torch

from common import MODEL, cpu_model, pretrain_overrides, torchrun_stage, write_result

LOG_EVERY = 5
WIDE = ["model.d_model=768", "model.n_layer=4", "model.n_head=12", "model.n_kv_head=12", "model.max_seq_len=256",
        "model.vocab_size=2048"]


def one_worker_overrides(steps: int) -> List[str]:
    base = [o for o in pretrain_overrides(steps, 1, 0, log_every=LOG_EVERY) if not o.startswith("model.")]
    return [*base, *WIDE, "train.global_batch_size=4", "parallel.micro_batch_size=4", "cluster.cpus_per_worker=2",
            "train.ckpt_every=0"]


def window_rate(records: List[dict]) -> float:
    """Median tokens/s of the logged windows after the first."""
    windows = [r["tokens_per_s"] for r in records if r.get("kind") == "train"][1:]
    return statistics.median(windows)


def plain_loop(overrides: List[str], steps: int) -> float:
    """Tokens/s of the same model and optimizer in a bare loop (2 threads, this process)."""
    from raylm.configs.loader import load_config, resolve_stage
    from raylm.models.llama import Llama
    from raylm.models.loss import cross_entropy_loss
    from raylm.trainer.schedule import lr_factor

    cfg = resolve_stage(load_config("tiny", overrides), 0)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = Llama(cfg.model, cfg.train.seed)
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, o, steps))
    batch, seq = cfg.train.global_batch_size, cfg.model.max_seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (steps, batch, seq + 1))
    records, window_time = [], 0.0
    for step in range(steps):
        began = time.perf_counter()
        loss = cross_entropy_loss(model(tokens[step, :, :-1]).float(), tokens[step, :, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        window_time += time.perf_counter() - began
        if (step + 1) % LOG_EVERY == 0:
            records.append({"kind": "train", "tokens_per_s": LOG_EVERY * batch * seq / window_time})
            window_time = 0.0
    return window_rate(records)


def ray_launch(root: Path, name: str, overrides: List[str]) -> float:
    """Wall seconds of ``raylm launch`` (an embedded Ray cluster started in the process)."""
    command = [sys.executable, "-m", "raylm.launcher.cli", "launch", "--name", name, "tiny", f"runs_dir={root}", *overrides]
    began = time.perf_counter()
    subprocess.run(command, check=True, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, capture_output=True, text=True)
    return time.perf_counter() - began


def records(run_dir: Path) -> List[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def outside_steps(wall_s: float, run_dir: Path) -> float:
    """Wall seconds not spent in training steps: the record's tokens over its window rate, summed."""
    train = [r for r in records(run_dir) if r.get("kind") == "train"]
    step_tokens = train[0]["tokens"] / train[0]["step"]
    in_steps, last = 0.0, 0
    for record in train:
        in_steps += (record["step"] - last) * step_tokens / record["tokens_per_s"]
        last = record["step"]
    return wall_s - in_steps


def one_round(root: Path, steps: int) -> dict:
    """Every side once, into ``root``: the three rows' measures and ratios."""
    root.mkdir(parents=True)
    peak = ["logging.mfu_peak_tflops=1"]  # no peak measured: the same start-up on every side

    one = [*one_worker_overrides(steps), *peak]
    plain = plain_loop(one, steps)
    torchrun_stage(root / "torchrun1", one, 1, 2)
    ray_launch(root, "ray1", one)
    one_torchrun, one_ray = window_rate(records(root / "torchrun1")), window_rate(records(root / "ray1"))

    two = [*pretrain_overrides(steps, 2, 2, log_every=LOG_EVERY), *MODEL, *peak, "train.ckpt_every=0"]
    torchrun_wall = torchrun_stage(root / "torchrun2", two, 2, 1)
    ray_wall = ray_launch(root, "ray2", two)
    two_torchrun, two_ray = window_rate(records(root / "torchrun2")), window_rate(records(root / "ray2"))
    torchrun_outside, ray_outside = outside_steps(torchrun_wall, root / "torchrun2"), outside_steps(ray_wall, root / "ray2")
    return {
        "one_worker": {"plain_loop_tokens_per_s": plain, "torchrun_tokens_per_s": one_torchrun, "ray_tokens_per_s": one_ray,
                       "torchrun_over_plain": one_torchrun / plain, "ray_over_plain": one_ray / plain},
        "two_workers": {"torchrun_tokens_per_s": two_torchrun, "ray_tokens_per_s": two_ray, "ray_over_torchrun": two_ray / two_torchrun},
        "one_stage_outside_steps_s": {"torchrun": torchrun_outside, "ray_launch": ray_outside, "ray_over_torchrun": ray_outside / torchrun_outside,
                                      "torchrun_wall": torchrun_wall, "ray_launch_wall": ray_wall},
    }


RATIOS = (("one_worker", "torchrun_over_plain"), ("one_worker", "ray_over_plain"), ("two_workers", "ray_over_torchrun"),
          ("one_stage_outside_steps_s", "ray_over_torchrun"))


def spread(rounds: List[dict]) -> dict:
    """Each ratio's median, lowest and highest over the rounds, by ``row.ratio``."""
    out = {}
    for row, ratio in RATIOS:
        values = [r[row][ratio] for r in rounds]
        out[f"{row}.{ratio}"] = {"median": statistics.median(values), "lowest": min(values), "highest": max(values)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    root = Path(tempfile.mkdtemp(prefix="raylm-parity-"))
    rounds = [one_round(root / f"round{index}", args.steps) for index in range(args.rounds)]
    write_result(args.out, "loop_parity", {"cpu": cpu_model(), "steps": args.steps, "ratios": spread(rounds), "rounds": rounds})


if __name__ == "__main__":
    main()
