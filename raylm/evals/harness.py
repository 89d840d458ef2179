"""``raylm eval RUN --tasks ...``: EleutherAI's lm-evaluation-harness on a finished stage, offline.

The stage is exported to a scratch Hugging Face directory and scored through
lm-eval's own ``HFLM`` wrapper, so the numbers are what ``lm_eval --model hf``
reports for the exported model. Only raylm's built-in tasks and task YAMLs in
directories the user names are indexed (lm-eval's own catalogue fetches its
data from the Hugging Face hub). Scores go to the stage's ``summary.json``,
``metrics.jsonl`` and the stage's W&B run, if it has one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

from raylm.errors import UserError, first_line
from raylm.evals.builtin import BUILTIN_TASKS, held_out_topics, write_builtin_tasks
from raylm.launcher.inference import FinishedStage

BATCH_SIZE = 8
BOOTSTRAP_ITERS = 1000
"""Resamples for the standard error of the perplexities (lm-eval's default of 100000 takes minutes on a CPU)."""
HOW_TO_NAME = f"name built-in tasks ({', '.join(BUILTIN_TASKS)}) or directories of lm-eval task YAMLs, comma-separated"


def split_spec(spec: str, key: str = "--tasks") -> Tuple[List[str], List[Path]]:
    """(task names, task directories) of a ``--tasks`` value (``key`` names the setting in errors)."""
    names, directories = [], []
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        path = Path(entry).expanduser()
        if path.is_dir():
            directories.append(path)
        elif path.exists() or os.sep in entry or entry.endswith((".yaml", ".yml")):
            raise UserError(f"{key} {entry}: not a directory; give a directory of lm-eval task YAMLs")
        else:
            names.append(entry)
    if not names and not directories:
        raise UserError(f"{key} {spec!r} names no task; {HOW_TO_NAME}")
    return names, directories


def _task_manager(directories: List[Path]):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(d) for d in directories], include_defaults=False)


def _tasks_to_run(names: List[str], directories: List[Path], builtin_dir: Path, key: str) -> Tuple[List[str], object]:
    """Every task named or defined in a named directory, and the TaskManager that indexes them."""
    chosen = list(names)
    for directory in directories:
        defined = _task_manager([directory]).all_subtasks
        if not defined:
            raise UserError(f"{key} {directory}: no lm-eval task YAML found there (a .yaml with a 'task:' key); {HOW_TO_NAME}")
        chosen += [task for task in defined if task not in chosen]
    manager = _task_manager([builtin_dir, *directories])
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise UserError(f"{key} {unknown[0]}: no such task; {HOW_TO_NAME}")
    return chosen, manager


def _scores(results: dict) -> Dict[str, Dict[str, float]]:
    """Task -> {lm-eval's metric name (e.g. 'acc,none', 'acc_stderr,none'): value}, numbers only."""
    return {
        task: {metric: value for metric, value in values.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
        for task, values in results["results"].items()
    }


def run_tasks(stage: FinishedStage, spec: str, key: str = "--tasks") -> Dict[str, Dict[str, float]]:
    """Score the stage on the tasks of ``spec`` (the value of ``key``) with lm-eval; deterministic for the same run and tasks."""
    names, directories = split_spec(spec, key)
    # Read when datasets and huggingface_hub are imported: nothing may be fetched.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise UserError(f"{key} needs EleutherAI's lm-eval ({first_line(err)}); install it with: pip install 'raylm[hf]'") from None

    from raylm.launcher.export import save_stage_hf

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    # It warns once per request whose context it cuts to the model's length, as it should cut it.
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="raylm-lm-eval-") as scratch:
        builtin_dir = Path(scratch) / "tasks"
        if any(name in BUILTIN_TASKS for name in names):
            write_builtin_tasks(builtin_dir, held_out_topics(stage.run, stage.index, stage.tokenizer))
        tasks, manager = _tasks_to_run(names, directories, builtin_dir, key)
        try:
            manager.load(tasks)  # reads every task's data: a broken task is named before any scoring
        except Exception as err:  # lm-eval and datasets raise many kinds for a bad YAML or data file
            raise UserError(f"{key}: lm-eval cannot load {', '.join(tasks)} ({first_line(err)}); fix the task YAML or its data files") from None
        export = save_stage_hf(stage, Path(scratch) / "hf")
        model = HFLM(pretrained=str(export), device="cuda" if torch.cuda.is_available() else "cpu", batch_size=BATCH_SIZE)
        results = simple_evaluate(model=model, tasks=tasks, task_manager=manager, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False)
    return _scores(results)


def record(run_dir: Path, stage: FinishedStage, scores: Dict[str, Dict[str, float]]) -> None:
    """Add the scores to ``<stage>/summary.json`` (under "eval_tasks"), ``metrics.jsonl`` and the stage's W&B run."""
    from raylm.configs.loader import dump_nested, resolve_stage
    from raylm.trainer import run_dir as rundir
    from raylm import storage
    from raylm.trainer.layout import METRICS_FILE, STAGE_SUMMARY, WANDB_DIR
    from raylm.trainer.metrics import WANDB_ID_FILE, MetricsFile, WandbRun

    summary = rundir.stage_summary(run_dir, stage.name)
    storage.pull(run_dir, f"{stage.name}/{WANDB_ID_FILE}")
    summary["eval_tasks"] = {**summary.get("eval_tasks", {}), **scores}
    (run_dir / stage.name / STAGE_SUMMARY).write_text(json.dumps(summary, indent=2))
    step = summary["steps"]
    MetricsFile(run_dir / METRICS_FILE).write(scores_record(stage.name, step, scores))
    storage.push(run_dir, f"{stage.name}/{STAGE_SUMMARY}")
    storage.push(run_dir, METRICS_FILE)
    cfg = resolve_stage(stage.run, stage.index)
    if cfg.logging.wandb.mode == "disabled" or not (run_dir / stage.name / WANDB_ID_FILE).is_file():
        return  # the stage logged no W&B run to add to
    wandb_run = WandbRun(cfg.logging.wandb, run_dir, stage.run.name or run_dir.name, stage.name, dump_nested(cfg))
    values = wandb_values(scores)
    wandb_run.log(step, values)
    wandb_run.summary(values)
    wandb_run.finish()
    storage.push(run_dir, WANDB_DIR)


def scores_record(stage: str, step: int, scores: Dict[str, Dict[str, float]]) -> Dict:
    """The metrics.jsonl record of a stage's lm-eval scores."""
    return {"stage": stage, "step": step, "kind": "eval_tasks", "tasks": scores}


def wandb_values(scores: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    return {f"eval_tasks/{task}/{metric}": value for task, metrics in scores.items() for metric, value in metrics.items()}


def check_spec(spec: str, key: str) -> None:
    """A stage's ``eval_tasks`` checked before it trains: directories exist, and without any every name is built in."""
    names, directories = split_spec(spec, key)
    unknown = [name for name in names if name not in BUILTIN_TASKS]
    if unknown and not directories:
        raise UserError(f"{key}: {unknown[0]} is no built-in task; {HOW_TO_NAME}")
