"""LoRA against full fine-tuning of the same sft stage, on one embedded Ray cluster in one invocation.

A short pretraining run makes the base; then the same sft stage (init_from that base, same data, steps,
batch, layout and learning rate) runs three times: every weight trained, LoRA rank 8 on all seven
projections of each block, LoRA rank 8 on wq and wv only. For each: trainable parameters, rank 0's Adam
moments (``optimizer_state_mb`` of the stage summary), one checkpoint's size, rank 0's peak memory
(``mem_gb``: resident set size on CPU, allocated peak on GPU), tokens/s and their ratio to full fine-tuning.
The variants run in turns, ``--repeats`` rounds; a variant's tokens/s is its best round.

    .venv/bin/python benchmarks/lora.py [--steps 20] [--repeats 2] [--workers 2] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from common import pretrain_overrides, run_on_ray, write_result

ALL_PROJECTIONS = "[wq, wk, wv, wo, w1, w3, w2]"
VARIANTS = [
    ("full fine-tuning", None),
    ("LoRA r8 alpha 16, all projections", f"{{rank: 8, alpha: 16, targets: {ALL_PROJECTIONS}}}"),
    ("LoRA r8 alpha 16, wq + wv", "{rank: 8, alpha: 16, targets: [wq, wv]}"),
]
BASELINE = "full fine-tuning"


def sft_overrides(steps: int, workers: int, base: Path, lora) -> list:
    """The benchmarks' model and layout, one sft stage from ``base``, checkpointed once at its end."""
    lora_part = f", lora: {lora}" if lora else ""
    stage = f"stages=[{{name: sft, kind: sft, init_from: '{base}', data: {{source: 'builtin:pydoc-sft'}}{lora_part}}}]"
    return [*pretrain_overrides(steps, workers, zero=2), stage, "optim.lr=1e-3", "optim.warmup_steps=2", f"train.ckpt_every={steps}"]


def last_record(run_dir: Path, kind: str) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("kind") == kind][-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pretrain-steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the variants; tokens/s is each variant's best round")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from raylm.cluster.connect import start_or_connect
    from raylm.trainer.checkpoint import step_dirs

    info = start_or_connect(None, local_cpus=args.workers)
    root = Path(tempfile.mkdtemp(prefix="raylm-lora-"))
    run_on_ray(root, "base", pretrain_overrides(args.pretrain_steps, args.workers, zero=2), info)
    base = root / "base" / "pretrain" / "final"
    rows = {name: {"variant": name, "lora": lora, "tokens_per_s_runs": []} for name, lora in VARIANTS}
    # The variants take turns, so a stretch of load from elsewhere slows one round of all of them, not one variant.
    for repeat in range(args.repeats):
        for index, (name, lora) in enumerate(VARIANTS):
            tag = f"variant{index}-repeat{repeat}"
            began = time.perf_counter()
            stage = run_on_ray(root, tag, sft_overrides(args.steps, args.workers, base, lora), info)["stages"][0]
            wall = time.perf_counter() - began
            checkpoint = step_dirs(root / tag / "sft")[0]
            rows[name].update({
                "trainable_params": stage["trainable_params"], "optimizer_state_mb": stage["optimizer_state_mb"],
                "checkpoint_mb": sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()) / 2**20,
                "mem_gb": last_record(root / tag, "train")["mem_gb"], "final_loss": stage["final_loss"],
                "eval_loss": stage["eval_loss"], "stage_wall_seconds": wall,
            })
            rows[name]["tokens_per_s_runs"].append(stage["tokens_per_s"])
            print(f"{name} (round {repeat + 1}): {stage['trainable_params']:,} trainable, {stage['tokens_per_s']:.0f} tokens/s", flush=True)
    rows = list(rows.values())
    for r in rows:
        r["tokens_per_s"] = max(r["tokens_per_s_runs"])  # the least disturbed round

    full = next(r for r in rows if r["variant"] == BASELINE)
    for r in rows:
        for key in ("trainable_params", "optimizer_state_mb", "checkpoint_mb", "tokens_per_s"):
            r[f"{key}_vs_full"] = r[key] / full[key]

    cores = os.cpu_count() or 1
    lines = [
        f"sft {args.steps} steps from a {args.pretrain_steps}-step pretrained base, global batch 16 x seq 256, micro-batch 4, "
        f"{args.workers} workers, ZeRO-2, fp32 on CPU (gloo), {cores} cores; tokens/s: best of {args.repeats} rounds",
        "",
        "| variant | trainable params | vs full | Adam moments, rank 0 (MB) | vs full | checkpoint (MB) | vs full "
        "| rank 0 memory (GB) | tokens/s (rounds) | vs full | final loss | eval loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['trainable_params']:,} | {r['trainable_params_vs_full']:.4f} | {r['optimizer_state_mb']:.2f} | "
            f"{r['optimizer_state_mb_vs_full']:.4f} | {r['checkpoint_mb']:.2f} | {r['checkpoint_mb_vs_full']:.3f} | {r['mem_gb']:.2f} | "
            f"{r['tokens_per_s']:,.0f} ({', '.join(f'{t:,.0f}' for t in r['tokens_per_s_runs'])}) | {r['tokens_per_s_vs_full']:.2f} | {r['final_loss']:.4f} | {r['eval_loss']:.4f} |"
        )
    print("\n".join(lines))
    write_result(args.out, "lora", {"steps": args.steps, "pretrain_steps": args.pretrain_steps, "workers": args.workers, "repeats": args.repeats,
                                    "cores": cores, "machine": platform.processor() or platform.machine(), "variants": rows})


if __name__ == "__main__":
    main()
