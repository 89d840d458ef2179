"""Tokens/s of one model in six 4-worker layouts, on one embedded Ray cluster.

Every layout trains the same model (d_model 256, 4 layers, 8 heads, 4 kv
heads, seq 256, vocab 2048), global batch 16, micro-batch 4, for the same
number of steps, one pretrain stage, in one invocation. The figure is each
stage summary's ``tokens_per_s`` (training tokens / time spent in training
steps, start-up excluded) and its ratio to dp4 ZeRO-1.

    .venv/bin/python benchmarks/layouts.py [--steps 20] [--out bench-out]

On a machine with fewer than 4 cores the 4 workers are oversubscribed (each
reserves 1 Ray CPU of an embedded cluster declared with 4); the output says so.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from common import pretrain_overrides, run_on_ray, write_result

WORKERS = 4

# name, tp, pp, zero stage
LAYOUTS = [
    ("dp4 ZeRO-1", 1, 1, 1),
    ("dp4 ZeRO-2", 1, 1, 2),
    ("dp4 ZeRO-3", 1, 1, 3),
    ("tp2 x dp2 ZeRO-1", 2, 1, 1),
    ("pp2 x dp2 ZeRO-1", 1, 2, 1),
    ("tp2 x pp2 ZeRO-1", 2, 2, 1),
]
BASELINE = "dp4 ZeRO-1"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", nargs="*", default=None, help="run only these layout names (default: all)")
    args = parser.parse_args()

    from raylm.cluster.connect import start_or_connect

    cores = os.cpu_count() or 1
    oversubscribed = cores < WORKERS
    info = start_or_connect(None, local_cpus=WORKERS)
    root = Path(tempfile.mkdtemp(prefix="raylm-layouts-"))
    rows = []
    for name, tp, pp, zero in LAYOUTS:
        if args.only and name not in args.only:
            continue
        tag = name.replace(" ", "").replace("-", "").lower()
        began = time.perf_counter()
        stage = run_on_ray(root, tag, pretrain_overrides(args.steps, WORKERS, zero, tp, pp), info)["stages"][0]
        wall = time.perf_counter() - began
        train_s = stage["tokens"] / stage["tokens_per_s"] if stage["tokens_per_s"] else float("nan")
        rows.append({
            "layout": name, "tp": tp, "pp": pp, "dp": WORKERS // (tp * pp), "zero_stage": zero,
            "tokens_per_s": stage["tokens_per_s"], "final_loss": stage["final_loss"],
            "train_seconds": train_s, "stage_wall_seconds": wall, "outside_training_seconds": wall - train_s,
        })
        print(f"{name}: {stage['tokens_per_s']:.0f} tokens/s, loss {stage['final_loss']:.4f}, "
              f"{train_s:.1f} s training of {wall:.1f} s wall", flush=True)

    base = next((r["tokens_per_s"] for r in rows if r["layout"] == BASELINE), None)
    for r in rows:
        r["ratio_to_dp4_zero1"] = r["tokens_per_s"] / base if base else None

    note = (f"{WORKERS} workers on {cores} cores: oversubscribed ({WORKERS / cores:.1f} workers per core), "
            "so these figures mix parallel-layout cost with CPU contention" if oversubscribed
            else f"{WORKERS} workers on {cores} cores")
    lines = [
        f"steps {args.steps}, global batch 16 x seq 256, micro-batch 4, fp32 on CPU (gloo); {note}",
        "",
        "| layout | tp | pp | dp | ZeRO | tokens/s | vs dp4 ZeRO-1 | final loss | training s | stage wall s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = f"{r['ratio_to_dp4_zero1']:.2f}" if r["ratio_to_dp4_zero1"] is not None else "-"
        lines.append(f"| {r['layout']} | {r['tp']} | {r['pp']} | {r['dp']} | {r['zero_stage']} | {r['tokens_per_s']:,.0f} | "
                     f"{ratio} | {r['final_loss']:.4f} | {r['train_seconds']:.1f} | {r['stage_wall_seconds']:.1f} |")
    print("\n".join(lines))

    result = {
        "steps": args.steps, "workers": WORKERS, "cores": cores, "oversubscribed": oversubscribed, "note": note,
        "machine": platform.processor() or platform.machine(), "layouts": rows,
    }
    write_result(args.out, "layouts", result)


if __name__ == "__main__":
    main()
