"""Tokens/s of one worker in bf16 against fp32 on this CPU, and the matmul peaks ``train.precision=auto`` compares.

    .venv/bin/python benchmarks/bf16_cpu.py [--steps 20] [--rows issue12:1 issue12:2 tiny:1] [--out bench-out]

One Ray Train worker trains each shape twice on one embedded cluster, fp32 then bf16 (which DeepSpeed runs as its
BF16_Optimizer: fp32 masters, gradients accumulated in fp32), ZeRO-0:

- ``issue12``: issue 12's single-worker shape, d_model 768, 4 layers, 12 heads, context 256, 4 sequences per
  step, vocab 2048, with 1 thread (``cluster.cpus_per_worker``'s default) and with 2: the row whose goal is
  bf16 >= 1.5x fp32 where the bf16 matmul peak is >= 2x fp32's;
- ``tiny``: the ``tiny`` preset's model and batch (d_model 128), what ``raylm launch`` trains by default.

The figure of merit is the ratio of the stage summaries' ``tokens_per_s`` (training steps only, start-up
excluded). For each row the bf16 and fp32 matmul peaks at the shape's width are measured here with the
worker's threads, by the very function rank 0 calls under 'auto', and printed with the decision it takes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common import cpu_model, pretrain_overrides, run_on_ray, write_result

WIDTHS = {"issue12": 768, "tiny": 128}
SHAPES = {
    "issue12": [f"model.d_model={WIDTHS['issue12']}", "model.n_layer=4", "model.n_head=12", "model.n_kv_head=12", "model.max_seq_len=256",
                "model.vocab_size=2048", "train.global_batch_size=4", "parallel.micro_batch_size=4"],
    "tiny": [f"model.d_model={WIDTHS['tiny']}", "model.n_layer=4", "model.n_head=4", "model.n_kv_head=2", "model.max_seq_len=128",
             "model.vocab_size=2048"],
}
ROWS = ["issue12:1", "issue12:2", "tiny:1"]  # shape:threads of the one worker


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS, help="which rows (default: all; one at a time fits a short quiet spell)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = [(shape, int(threads)) for shape, threads in (row.split(":") for row in args.rows)]

    from raylm.cluster.connect import start_or_connect
    from raylm.trainer.precision import decide

    info = start_or_connect(None, local_cpus=max(threads for _, threads in rows))
    root = Path(tempfile.mkdtemp(prefix="raylm-bf16-"))
    result: dict = {"cpu": cpu_model(), "steps": args.steps, "rows": []}
    for shape, threads in rows:
        torch.set_num_threads(threads)
        auto = decide("auto", torch.device("cpu"), WIDTHS[shape]).record()
        stages = {}
        for precision in ("fp32", "bf16"):
            run = [*pretrain_overrides(args.steps, 1, 0), *SHAPES[shape], f"cluster.cpus_per_worker={threads}", f"train.precision={precision}"]
            stages[precision] = run_on_ray(root, f"{shape}-{threads}-{precision}", run, info)["stages"][0]
        result["rows"].append({
            "shape": shape, "threads": threads, "auto": auto,
            **{f"{precision}_tokens_per_s": stage["tokens_per_s"] for precision, stage in stages.items()},
            "bf16_over_fp32": stages["bf16"]["tokens_per_s"] / stages["fp32"]["tokens_per_s"],
            **{f"{precision}_final_loss": stage["final_loss"] for precision, stage in stages.items()},
            **{f"{precision}_mfu": stage["mfu"] for precision, stage in stages.items()},
        })
    write_result(args.out, "bf16_cpu", result)


if __name__ == "__main__":
    main()
