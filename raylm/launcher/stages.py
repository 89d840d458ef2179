"""Drive a run's stages in order on a Ray cluster, then summarise."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, List, Tuple

from rich.console import Console
from rich.table import Table

from raylm import storage
from raylm.cluster.connect import ClusterInfo, check_capacity, wants_gpu
from raylm.configs.loader import resolve_stage
from raylm.configs.schema import RunConfig, StageConfig
from raylm.errors import StageFailed, UserError
from raylm.trainer import run_dir as rundir
from raylm.launcher.plots import plot_stage_loss
from raylm.launcher.progress import StageProgress
from raylm.launcher.timeline import stage_timeline
from raylm.data.prepare import is_prepared
from raylm.trainer.distill import check_teacher
from raylm.trainer.run_inputs import outside_teacher, stage_inputs
from raylm.trainer.stage_data import StageData, prepare_stage_data
from raylm.trainer.worker import check_init_weights
from raylm.trainer.checkpoint import RAY_SNAPSHOT
from raylm.trainer.metrics import WANDB_ID_FILE
from raylm.trainer.layout import DRIVER_FILE, LOGS_DIR, METRICS_FILE, STAGE_SUMMARY, SUMMARY_FILE, WANDB_DIR


def _worker_error_message(err: BaseException) -> str:
    text = str(err)
    for marker in ("raylm.errors.UserError: ", "UserError: "):
        if marker in text:
            return text.split(marker, 1)[1].splitlines()[0]
    return ""


def _forget_ray_snapshot(stage_dir: Path) -> None:
    """Ray Train restores a run from its snapshot of registered checkpoints, and refuses one that names a directory
    raylm has since pruned. raylm resumes from the ``step_*`` directories and their manifests alone, so each
    fit starts Ray's record afresh."""
    store = storage.store_of(stage_dir.parent)
    if store is None:
        (stage_dir / RAY_SNAPSHOT).unlink(missing_ok=True)
    elif store.is_file(f"{stage_dir.name}/{RAY_SNAPSHOT}"):
        store.fs.delete_file(store.path(f"{stage_dir.name}/{RAY_SNAPSHOT}"))


def _placement(cfg: RunConfig, info: ClusterInfo) -> Tuple[bool, str]:
    """(whether the stage uses GPUs, its workers in words); refuses a stage the cluster can never place."""
    use_gpu = wants_gpu(cfg.cluster.use_gpu, info)
    c = cfg.cluster
    if c.min_workers is None:
        check_capacity(c.num_workers, c.cpus_per_worker, use_gpu, info)
        return use_gpu, f"{c.num_workers} workers"
    check_capacity(c.min_workers, c.cpus_per_worker, use_gpu, info, key="cluster.min_workers")
    return use_gpu, f"{c.min_workers}-{c.num_workers} workers (elastic)"


def check_init_from(run: RunConfig) -> None:
    """Every ``stages.N.init_from`` holds weights of this config's shape, and every teacher from outside the run
    whole weights of the run's vocabulary (their config.json and safetensors headers only), before anything is created."""
    for index, stage in enumerate(run.stages):
        if stage.init_from:
            try:
                check_init_weights(resolve_stage(run, index), Path(stage.init_from))
            except UserError as err:
                raise UserError(f"stages.{index}.init_from: {err}") from None
        teacher = outside_teacher(run, index)
        if teacher is not None:
            check_teacher(teacher, run.model, f"stages.{index}.teacher")


def _prepared(run_dir: Path, run: RunConfig, index: int, console: Console) -> StageData:
    name, data_cfg = run.stages[index].name, resolve_stage(run, index).data
    with console.status(f"[{name}] preparing tokenizer and data from {', '.join(data_cfg.corpora())}"):
        data = prepare_stage_data(run_dir, run, index)
    if storage.store_of(run_dir) is not None:
        with console.status(f"[{name}] uploading what the stage reads to {storage.where(run_dir)}"):
            single = data_cfg.source if data_cfg.sources is None else None
            stage_inputs(run_dir, run, index, Path(single).expanduser() if single and is_prepared(single) else None)
    return data


def prepare_data(run_dir: Path, run: RunConfig, console: Console) -> None:
    """Tokenizer and datasets of every stage, before Ray starts: a bad corpus costs seconds, not a
    cluster start (each stage finds them ready later)."""
    for index in range(len(run.stages)):
        _prepared(run_dir, run, index, console)


def run_stage(run_dir: Path, run: RunConfig, index: int, info: ClusterInfo, console: Console) -> dict:
    from raylm.cluster.relay import start_relay, stop_relay
    from raylm.launcher.record_pump import RecordPump
    from raylm.launcher.trainer import stage_trainer

    stage = run.stages[index]
    cfg = resolve_stage(run, index)
    use_gpu, workers = _placement(cfg, info)
    if stage.init_from:
        # Weights from outside the run (the previous stage's fit by construction: stages share model.*).
        check_init_weights(cfg, Path(stage.init_from))
    prepare_began = time.time()
    data = _prepared(run_dir, run, index, console)
    prepare_s = time.time() - prepare_began
    console.print(
        f"[bold]{stage.name}[/] ({stage.kind}): {data.train.num_samples:,} training sequences of {cfg.model.max_seq_len} tokens, "
        f"{workers} on {'GPU' if use_gpu else 'CPU'}"
    )
    _forget_ray_snapshot(run_dir / stage.name)
    relay = start_relay()
    progress = StageProgress(stage.name, cfg.train.max_steps, console, enabled=cfg.logging.progress)
    pump = RecordPump(relay, run_dir, run.name or run_dir.name, stage.name, cfg, progress)
    summary = None
    try:
        fit_began = time.time()
        with progress, pump:
            _fit(stage_trainer(run_dir, run, index, cfg, use_gpu, relay), run_dir, stage.name, cfg)
        fit_ended = time.time()
        summary = rundir.stage_summary(run_dir, stage.name)
        if summary is None:
            raise StageFailed(f"stage '{stage.name}' ended without a summary; see {run_dir / stage.name / LOGS_DIR}")
        summary["timeline_s"] = stage_timeline(pump.seen, prepare_s, fit_began, fit_ended)
        if stage.eval_tasks:
            summary["eval_tasks"] = _score_eval_tasks(run_dir, stage, index, summary["steps"], pump, console)
    finally:
        stop_relay(relay)
        pump.finish(summary or {})
        storage.push(run_dir, METRICS_FILE)
        storage.push(run_dir, WANDB_DIR)
        storage.push(run_dir, f"{stage.name}/{WANDB_ID_FILE}")
    picture = plot_stage_loss(run_dir, stage.name)
    summary["loss_png"] = f"{storage.where(run_dir)}/{picture.relative_to(run_dir)}" if picture else None
    (run_dir / stage.name / STAGE_SUMMARY).write_text(json.dumps(summary, indent=2))
    if picture:
        storage.push(run_dir, str(picture.relative_to(run_dir)))
    storage.push(run_dir, f"{stage.name}/{STAGE_SUMMARY}")
    return summary


def _score_eval_tasks(run_dir: Path, stage: StageConfig, index: int, step: int, pump, console: Console) -> dict:
    """The stage's ``eval_tasks`` scored on its final weights, into metrics.jsonl and its W&B run."""
    from raylm.evals.harness import run_tasks, scores_record, wandb_values
    from raylm.launcher.inference import load_stage

    with console.status(f"[{stage.name}] scoring lm-eval tasks {stage.eval_tasks}"):
        scores = run_tasks(load_stage(run_dir, stage.name), stage.eval_tasks, key=f"stages.{index}.eval_tasks")
    pump.metrics.write(scores_record(stage.name, step, scores))
    values = wandb_values(scores)
    pump.wandb.log(step, values)
    pump.wandb.summary(values)
    for task, metrics in scores.items():
        console.print(f"  [{stage.name}] {task}: " + ", ".join(f"{name} {value:.4g}" for name, value in metrics.items()))
    return scores


def _fit(trainer, run_dir: Path, stage: str, cfg: RunConfig) -> None:
    from ray.train import TrainingFailedError

    try:
        trainer.fit()
    except TrainingFailedError as err:
        user_message = _worker_error_message(err)
        if user_message:
            raise UserError(user_message) from None
        raise StageFailed(
            f"stage '{stage}' failed after {cfg.fault.max_failures} restarts: {str(err).strip().splitlines()[-1]}; "
            f"worker logs are in {run_dir / stage / LOGS_DIR}; continue with 'raylm resume {storage.where(run_dir)}'"
        ) from err


def run_all(run_dir: Path, run: RunConfig, info: ClusterInfo, console: Console) -> dict:
    """Run every unfinished stage on a connected cluster; a finished stage is never re-run."""
    started = time.time()
    console.print(f"cluster: {info.origin()}; {info.nodes} node(s), {info.cpus:g} CPUs, {info.gpus:g} GPUs")
    console.print(f"run [bold]{run.name}[/] in {storage.where(run_dir)}")
    # Every stage still to run must fit the cluster before the first one spends any time.
    for index, stage in enumerate(run.stages):
        if not rundir.stage_finished(run_dir, stage.name):
            _placement(resolve_stage(run, index), info)
    (run_dir / DRIVER_FILE).write_text(json.dumps({"pid": os.getpid(), "started": started}))
    stages: List[Dict] = []
    for index, stage in enumerate(run.stages):
        if rundir.stage_finished(run_dir, stage.name):
            console.print(f"[bold]{stage.name}[/]: already finished, skipping")
            stages.append(rundir.stage_summary(run_dir, stage.name))
            continue
        stages.append(run_stage(run_dir, run, index, info, console))
    summary = {"run": run.name, "run_dir": storage.where(run_dir), "seconds": round(time.time() - started, 1), "stages": stages}
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    storage.push(run_dir, SUMMARY_FILE)
    (run_dir / DRIVER_FILE).unlink(missing_ok=True)
    print_summary(summary, console)
    return summary


def print_summary(summary: dict, console: Console) -> None:
    table = Table(title=f"run {summary['run']} ({summary['seconds']:.0f} s)")
    for column in ("stage", "steps", "final loss", "eval loss", "perplexity", "tokens/s", "MFU"):
        table.add_column(column, justify="right" if column != "stage" else "left")
    for s in summary["stages"]:
        table.add_row(
            f"{s['stage']} ({s['kind']})", str(s["steps"]), f"{s['final_loss']:.4f}", f"{s['eval_loss']:.4f}",
            f"{s['perplexity']:.2f}" if s.get("perplexity") else "-", f"{s['tokens_per_s']:,.0f}", f"{100 * s['mfu']:.2f}%",
        )
    console.print(table)
    for s in summary["stages"]:
        console.print(f"[bold]{s['stage']} sample[/]: {s['sample']!r}")
        if "classification" in s:
            report = s["classification"]
            console.print(f"[bold]{s['stage']} accuracy[/]: {report['accuracy']:.3f} on {report['examples']} held-out examples "
                          f"(the most frequent label alone: {report['majority_accuracy']:.3f})")
        console.print(f"[bold]{s['stage']} weights[/]: {s['final_dir']}")
        if s.get("loss_png"):
            console.print(f"[bold]{s['stage']} loss curve[/]: {s['loss_png']}")
    console.print(f"run directory: {summary['run_dir']}")
