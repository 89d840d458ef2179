"""Drive a run's stages in order on a Ray cluster, then summarise."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from rich.console import Console
from rich.table import Table

from raylm import storage
from raylm.cluster.connect import ClusterInfo, check_capacity, wants_gpu
from raylm.configs.loader import resolve_stage
from raylm.configs.schema import RunConfig, StageConfig
from raylm.errors import StageFailed, Stopped, UserError
from raylm.trainer import run_dir as rundir
from raylm.launcher.plots import plot_stage_loss
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


def _forget_ray_snapshot(run_dir: Path) -> None:
    """Ray Train restores a run from its snapshot of registered checkpoints, and refuses one that names a directory
    raylm has since pruned. raylm resumes from the ``step_*`` directories and their manifests alone, so each
    fit starts Ray's record afresh."""
    store = storage.store_of(run_dir)
    if store is None:
        (run_dir / RAY_SNAPSHOT).unlink(missing_ok=True)
    elif store.is_file(RAY_SNAPSHOT):
        store.fs.delete_file(store.path(RAY_SNAPSHOT))


def fits(run: RunConfig, todo: List[int]) -> List[List[int]]:
    """The stages ``todo`` (in order) as fits: consecutive stages that place the same workers (``cluster.*``) with
    the same restart budget share one worker group, which runs them one after another."""
    groups: List[List[int]] = []
    placement = None
    for index in todo:
        cfg = resolve_stage(run, index)
        key = (asdict(cfg.cluster), cfg.fault.max_failures)
        if groups and key == placement and groups[-1][-1] == index - 1:
            groups[-1].append(index)
        else:
            groups.append([index])
        placement = key
    return groups


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


def run_fit(run_dir: Path, run: RunConfig, indices: List[int], info: ClusterInfo, console: Console) -> List[dict]:
    """Stages ``indices`` (one of ``fits``) in one Ray Train run; each stage's summary once the fit is over. A stage
    the fit finished is completed (summary, loss curve, eval tasks) even when a later one fails."""
    from raylm.cluster.relay import start_relay, stop_relay
    from raylm.launcher.record_pump import RecordPump
    from raylm.launcher.trainer import fit_trainer

    cfgs = [resolve_stage(run, index) for index in indices]
    use_gpu, workers = _placement(cfgs[0], info)
    prepare_s = []
    for index, cfg in zip(indices, cfgs):
        stage = run.stages[index]
        if stage.init_from:
            check_init_weights(cfg, Path(stage.init_from))
        prepare_began = time.time()
        data = _prepared(run_dir, run, index, console)
        prepare_s.append(time.time() - prepare_began)
        console.print(
            f"[bold]{stage.name}[/] ({stage.kind}): {data.train.num_samples:,} training sequences of {cfg.model.max_seq_len} tokens, "
            f"{workers} on {'GPU' if use_gpu else 'CPU'}"
        )
    if len(indices) > 1:
        console.print(f"one worker group runs {', '.join(run.stages[i].name for i in indices)} in turn")
    _forget_ray_snapshot(run_dir)
    relay = start_relay()
    pump = RecordPump(relay, run_dir, run.name or run_dir.name, [(run.stages[i].name, cfg) for i, cfg in zip(indices, cfgs)], console)
    fit_began = time.time()
    try:
        with pump:
            _fit(fit_trainer(run_dir, run, indices, cfgs[0], use_gpu, relay, info.embedded), run_dir, run, indices)
    except Exception:
        _complete_finished(run_dir, run, indices, pump, prepare_s, fit_began, time.time(), console)
        raise
    else:
        summaries = _complete_finished(run_dir, run, indices, pump, prepare_s, fit_began, time.time(), console)
    finally:
        stop_relay(relay)
        pump.finish_all()
        storage.push(run_dir, METRICS_FILE)
        storage.push(run_dir, WANDB_DIR)
        for index in indices:
            storage.push(run_dir, f"{run.stages[index].name}/{WANDB_ID_FILE}")
    if len(summaries) < len(indices):
        name = run.stages[indices[len(summaries)]].name
        raise StageFailed(f"stage '{name}' ended without a summary; see {run_dir / name / LOGS_DIR}")
    return summaries


def _complete_finished(run_dir: Path, run: RunConfig, indices: List[int], pump, prepare_s: List[float], fit_began: float,
                       fit_ended: float, console: Console) -> List[dict]:
    """The driver's part of each stage the fit finished, in order: its timeline, eval tasks, W&B summary, loss curve."""
    summaries: List[dict] = []
    began = fit_began
    for k, index in enumerate(indices):
        stage = run.stages[index]
        summary = rundir.stage_summary(run_dir, stage.name)
        if summary is None:
            break
        records = pump.records(stage.name)
        end = next((r["time"] for r in reversed(records) if r.get("kind") == "end"), fit_ended)
        # A stage after another starts where that one ended; only the fit's last stage has a teardown.
        ended = fit_ended if k == len(indices) - 1 else end
        summary["timeline_s"] = stage_timeline(records, prepare_s[k], fit_began, ended, began=began)
        began = end
        if stage.eval_tasks:
            summary["eval_tasks"] = _score_eval_tasks(run_dir, stage, index, summary["steps"], pump.stage(stage.name), console)
        pump.finish(stage.name, summary)
        picture = plot_stage_loss(run_dir, stage.name)
        summary["loss_png"] = f"{storage.where(run_dir)}/{picture.relative_to(run_dir)}" if picture else None
        (run_dir / stage.name / STAGE_SUMMARY).write_text(json.dumps(summary, indent=2))
        if picture:
            storage.push(run_dir, str(picture.relative_to(run_dir)))
        storage.push(run_dir, f"{stage.name}/{STAGE_SUMMARY}")
        summaries.append(summary)
    return summaries


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


def _fit(trainer, run_dir: Path, run: RunConfig, indices: List[int]) -> None:
    from ray.train import TrainingFailedError

    try:
        trainer.fit()
    except TrainingFailedError as err:
        user_message = _worker_error_message(err)
        if user_message:
            raise UserError(user_message) from None
        stage = next((run.stages[i].name for i in indices if not rundir.stage_finished(run_dir, run.stages[i].name)),
                     run.stages[indices[-1]].name)
        restarts = resolve_stage(run, indices[0]).fault.max_failures
        raise StageFailed(
            f"stage '{stage}' failed after {restarts} restarts: {str(err).strip().splitlines()[-1]}; "
            f"worker logs are in {run_dir / stage / LOGS_DIR}; continue with 'raylm resume {storage.where(run_dir)}'"
        ) from err


def run_all(run_dir: Path, run: RunConfig, info: Optional[ClusterInfo], console: Console) -> dict:
    """Run every unfinished stage on a connected cluster; a finished stage is never re-run. ``info`` is None when
    every stage has finished: no cluster is needed then."""
    started = time.time()
    if info is not None:
        console.print(f"cluster: {info.origin()}; {info.nodes} node(s), {info.cpus:g} CPUs, {info.gpus:g} GPUs")
    console.print(f"run [bold]{run.name}[/] in {storage.where(run_dir)}")
    # Every stage still to run must fit the cluster before the first one spends any time.
    for index, stage in enumerate(run.stages):
        if not rundir.stage_finished(run_dir, stage.name):
            _placement(resolve_stage(run, index), info)
    (run_dir / DRIVER_FILE).write_text(json.dumps({"pid": os.getpid(), "started": started}))
    todo: List[int] = []
    for index, stage in enumerate(run.stages):
        if rundir.stage_finished(run_dir, stage.name):
            console.print(f"[bold]{stage.name}[/]: already finished, skipping")
        else:
            todo.append(index)
    summaries: Dict[int, Dict] = {}
    try:
        for indices in fits(run, todo):
            summaries.update(zip(indices, run_fit(run_dir, run, indices, info, console)))
    except KeyboardInterrupt as err:
        raise Stopped(getattr(err, "signum", signal.SIGINT), f"continue with 'raylm resume {storage.where(run_dir)}'") from None
    stages = [summaries[index] if index in summaries else rundir.stage_summary(run_dir, stage.name) for index, stage in enumerate(run.stages)]
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
