"""The run directory: its name, its saved config and what each stage left."""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from raylm.configs.loader import from_yaml_file, to_yaml
from raylm.configs.schema import RunConfig
from raylm.errors import UserError
from raylm.files import read_json
from raylm.trainer.checkpoint import step_dirs
from raylm.trainer.layout import CONFIG_FILE, FINAL_DIR, STAGE_SUMMARY


def fresh_name(prefix: str, runs_dir: Path) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, n = f"{prefix}-{stamp}", 1
    while (runs_dir / name).exists():
        n += 1
        name = f"{prefix}-{stamp}-{n}"
    return name


def reserve(run: RunConfig, prefix: str) -> Path:
    """Name the run (fresh unless given) and refuse a name already taken or a runs_dir that cannot hold it."""
    runs_dir = Path(run.runs_dir)
    if run.name is None:
        run.name = fresh_name(prefix, runs_dir)
    run_dir = (runs_dir / run.name).resolve()
    if run_dir.exists():
        raise UserError(f"run '{run.name}' already exists in {runs_dir}; continue it with 'raylm resume {run_dir}' or pick another --name")
    existing = next(p for p in run_dir.parents if p.exists())
    if not existing.is_dir():
        raise UserError(f"runs_dir={run.runs_dir}: {existing} is a file, not a directory; point runs_dir at a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"runs_dir={run.runs_dir}: cannot create directories in {existing} (no write permission); point runs_dir at a writable directory")
    return run_dir


def create(run: RunConfig, prefix: str) -> Path:
    """Make ``runs_dir/<name>`` and save the resolved config; never reuse a name."""
    run_dir = reserve(run, prefix)
    try:
        run_dir.mkdir(parents=True)
    except OSError as err:
        raise UserError(f"runs_dir={run.runs_dir}: cannot create {run_dir} ({err.strerror or err}); point runs_dir at a writable directory") from None
    (run_dir / CONFIG_FILE).write_text(to_yaml(run))
    return run_dir


@contextmanager
def created(run: RunConfig, prefix: str) -> Iterator[Path]:
    """``create``, undone when a bad input (a UserError) stops the launch before anything
    resumable exists: a failed launch leaves nothing behind, not even an empty runs_dir."""
    run_dir = reserve(run, prefix)
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    create(run, prefix)
    try:
        yield run_dir
    except UserError:
        if not _resumable(run_dir, run):
            shutil.rmtree(run_dir, ignore_errors=True)
            for parent in made[1:]:
                try:
                    parent.rmdir()
                except OSError:
                    break
        raise


def _resumable(run_dir: Path, run: RunConfig) -> bool:
    """Whether some stage finished or checkpointed, so that 'raylm resume' has something to continue."""
    return any(stage_finished(run_dir, s.name) or step_dirs(run_dir / s.name) for s in run.stages)


def locate(run: str, runs_dir: str = "runs") -> Path:
    """A run given as a path or as a name under runs_dir."""
    for candidate in (Path(run), Path(runs_dir) / run):
        if (candidate / CONFIG_FILE).is_file():
            return candidate.resolve()
    raise UserError(f"no run at '{run}' (looked for {run}/{CONFIG_FILE} and {runs_dir}/{run}/{CONFIG_FILE}); 'raylm status' lists runs")


def load(run_dir: Path) -> RunConfig:
    return from_yaml_file(run_dir / CONFIG_FILE)


def save_config(run_dir: Path, run: RunConfig) -> None:
    (run_dir / CONFIG_FILE).write_text(to_yaml(run))


def stage_finished(run_dir: Path, stage: str) -> bool:
    return (run_dir / stage / STAGE_SUMMARY).is_file() and (run_dir / stage / FINAL_DIR / "model.safetensors").is_file()


SUMMARY_FIELDS = {"stage": str, "kind": str, "steps": int, "final_loss": float, "eval_loss": float, "tokens_per_s": float, "mfu": float,
                  "sample": str, "final_dir": str}
"""What the end-of-run table shows of each stage."""


def stage_summary(run_dir: Path, stage: str) -> Optional[dict]:
    path = run_dir / stage / STAGE_SUMMARY
    if not path.is_file():
        return None
    # Without its summary a stage counts as unfinished; resuming finishes it again from the last checkpoint.
    fix = f"delete it and run 'raylm resume {run_dir}' to finish the stage again"
    summary = read_json(path, fix)
    for key, kind in SUMMARY_FIELDS.items():
        value = summary.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind in (int, float) else kind):
            raise UserError(f"{path} has {key}={value!r}, not {'a number' if kind in (int, float) else 'a string'}; {fix}")
    return summary


def latest_final(run_dir: Path, run: RunConfig, stage: Optional[str] = None) -> Path:
    """The final/ directory of ``stage``, or of the last finished stage."""
    names = [s.name for s in run.stages]
    if stage is not None and stage not in names:
        raise UserError(f"run {run_dir.name} has no stage '{stage}'; its stages are {', '.join(names)}")
    for name in reversed(names) if stage is None else [stage]:
        if stage_finished(run_dir, name):
            return run_dir / name / FINAL_DIR
    raise UserError(f"run {run_dir.name} has no finished stage{f' {stage}' if stage else ''} yet; finish it with 'raylm resume {run_dir}'")
