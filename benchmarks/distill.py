"""Distillation: a student half the teacher's size, distilled, against the same student trained without a teacher.

On one embedded Ray cluster in one invocation:

1. ``raylm data prepare builtin:pydoc`` once: every run below reads these shards, so all share one tokenizer
   and one held-out split (a function of the shards, data.val_fraction and the seed);
2. the teacher: the tiny preset's model (d_model 128, 4 layers, GQA 4/2 heads, vocab 2048, context 128),
   pretrained --teacher-steps;
3. the student (d_model 96, 3 layers, GQA 4/2 heads: half the teacher's parameters) as a first-stage
   ``kind: distill`` with ``teacher:`` the teacher's final/ directory, --steps from fresh weights;
4. the baseline: the same student, same seed (so the same initial weights and data order), same steps,
   learning rate and layout, as a plain ``kind: pretrain`` stage.

Each is then scored as ``raylm eval RUN`` does, on the whole held-out split (every held-out sequence, fp32):
perplexity of teacher, distilled student and baseline, and the share of the baseline's gap to the teacher
that distillation closes, (ppl_baseline - ppl_distilled) / (ppl_baseline - ppl_teacher).

    .venv/bin/python benchmarks/distill.py [--teacher-steps 300] [--steps 150] [--temperature 2] [--alpha 0.5] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import cpu_model, run_on_ray, write_result

COMMON = [
    "train.global_batch_size=16", "parallel.micro_batch_size=4", "parallel.zero_stage=2", "cluster.num_workers=2",
    "train.eval_every=0", "train.ckpt_every=0", "train.log_every=10", "train.sample_tokens=0", "train.precision=fp32",
    "cluster.use_gpu=false", "logging.wandb.mode=disabled", "logging.progress=false",
]
TEACHER = ["model.d_model=128", "model.n_layer=4", "model.n_head=4", "model.n_kv_head=2"]
STUDENT = ["model.d_model=96", "model.n_layer=3", "model.n_head=4", "model.n_kv_head=2"]


def held_out(run_dir: Path) -> dict:
    """``raylm eval RUN`` of the run's one stage over every held-out sequence."""
    from raylm.launcher.inference import evaluate, load_stage
    from raylm.models.flops import param_count

    stage = load_stage(run_dir)
    result = evaluate(stage, run_dir, None, max_batches=10**6)
    return {"params": param_count(stage.model_cfg), "held_out_sequences": result["sequences"], "held_out_loss": result["loss"],
            "perplexity": result["perplexity"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150, help="steps of the distilled student and of the baseline")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from raylm.cluster.connect import start_or_connect
    from raylm.launcher.cli import main as raylm

    began = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="raylm-distill-"))
    data = root / "pydoc"
    assert raylm(["data", "prepare", "builtin:pydoc", "--out", str(data), "--vocab-size", "2048", "--workers", "1"]) == 0
    info = start_or_connect(None, local_cpus=2)
    source = [f"data.source={data}"]

    def pretrain(name: str, model: list, steps: int) -> dict:
        stage = "stages=[{name: pretrain, kind: pretrain}]"
        return run_on_ray(root, name, [*COMMON, *model, *source, stage, f"train.max_steps={steps}"], info)["stages"][0]

    teacher_summary = pretrain("teacher", TEACHER, args.teacher_steps)
    teacher_dir = root / "teacher" / "pretrain" / "final"
    distill_stage = (f"stages=[{{name: distill, kind: distill, teacher: '{teacher_dir}', "
                     f"distill: {{temperature: {args.temperature}, alpha: {args.alpha}}}}}]")
    distilled_summary = run_on_ray(root, "distilled", [*COMMON, *STUDENT, *source, distill_stage, f"train.max_steps={args.steps}"],
                                   info)["stages"][0]
    baseline_summary = pretrain("baseline", STUDENT, args.steps)

    teacher, distilled, baseline = (held_out(root / name) for name in ("teacher", "distilled", "baseline"))
    sequences = {row["held_out_sequences"] for row in (teacher, distilled, baseline)}
    assert len(sequences) == 1, f"the runs scored different held-out splits: {sequences}"
    gap = baseline["perplexity"] - teacher["perplexity"]
    closed = (baseline["perplexity"] - distilled["perplexity"]) / gap
    for row, summary in ((teacher, teacher_summary), (distilled, distilled_summary), (baseline, baseline_summary)):
        row.update(steps=summary["steps"], tokens_per_s=summary["tokens_per_s"], final_loss=summary["final_loss"])
    distilled.update(kl=distilled_summary["distill"]["kl"], ce=distilled_summary["distill"]["ce"])
    result = {
        "teacher": teacher, "distilled": distilled, "baseline": baseline, "gap_closed": closed,
        "temperature": args.temperature, "alpha": args.alpha, "teacher_steps": args.teacher_steps, "steps": args.steps,
        "cpu": cpu_model(), "cores": os.cpu_count(), "seconds": round(time.perf_counter() - began, 1),
    }
    print(f"held-out perplexity: teacher {teacher['perplexity']:.2f} ({teacher['params']:,} params, {args.teacher_steps} steps), "
          f"distilled student {distilled['perplexity']:.2f}, student without teacher {baseline['perplexity']:.2f} "
          f"({distilled['params']:,} params, {args.steps} steps each); gap closed {100 * closed:.1f}%")
    write_result(args.out, "distill", result)


if __name__ == "__main__":
    main()
