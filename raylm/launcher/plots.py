"""The loss picture of a stage: training and eval loss against tokens, restarts marked."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from raylm.trainer.layout import METRICS_FILE
from raylm.trainer.metrics import read_records

LOSS_PNG = "loss.png"


def plot_stage_loss(run_dir: Path, stage: str) -> Optional[Path]:
    """Write ``runs/<name>/<stage>/loss.png``; None when the stage logged nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in read_records(run_dir / METRICS_FILE) if r.get("stage") == stage]
    train = [(r["tokens"], r["loss"]) for r in mine if r.get("kind") == "train"]
    evals = [(r["tokens"], r["eval_loss"]) for r in mine if r.get("kind") == "eval"]
    if not train:
        return None
    tokens_per_step = train[0][0] / max(1, next(r["step"] for r in mine if r.get("kind") == "train"))
    restarts = [r["step"] * tokens_per_step for r in mine if r.get("kind") == "start" and r.get("step", 0) > 0]

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(*zip(*train), label="train loss", lw=1.5)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.5)
    for index, at in enumerate(restarts):
        ax.axvline(at, color="red", ls="--", lw=1, label="restart" if index == 0 else None)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_title(f"{run_dir.name} / {stage}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / stage / LOSS_PNG
    fig.savefig(out)
    plt.close(fig)
    return out
