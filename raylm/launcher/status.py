"""What each run is doing, read from its directory alone (no Ray needed)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from raylm import storage
from raylm.trainer import run_dir as rundir
from raylm.trainer.checkpoint import read_state, step_dirs, verify
from raylm.trainer.stored_checkpoints import stored_state, stored_steps, verify_stored
from raylm.trainer.layout import CONFIG_FILE, DRIVER_FILE, METRICS_FILE
from raylm.trainer.metrics import read_records


@dataclass
class StageStatus:
    name: str
    kind: str
    state: str  # finished | running | interrupted | pending
    step: int
    max_steps: int
    last_checkpoint: Optional[str]
    restarts: int


def _records(run_dir: Path) -> List[dict]:
    path = run_dir / METRICS_FILE
    return read_records(path) if path.exists() else []


def driver_alive(run_dir: Path) -> bool:
    path = run_dir / DRIVER_FILE
    if not path.exists():
        return False
    try:
        os.kill(json.loads(path.read_text())["pid"], 0)
    except (OSError, ValueError, KeyError):
        return False
    return True


def run_status(run_dir: Path) -> List[StageStatus]:
    from raylm.configs.loader import resolve_stage

    run = rundir.load(run_dir)
    records = _records(run_dir)
    alive = driver_alive(run_dir)
    out = []
    for index, stage in enumerate(run.stages):
        mine = [r for r in records if r.get("stage") == stage.name]
        steps = [r.get("step", 0) for r in mine if r.get("kind") in ("train", "end", "start")]
        restarts = [r for r in mine if r.get("event") == "restart"]
        complete = _last_complete_checkpoint(run_dir, stage.name)
        if rundir.stage_finished(run_dir, stage.name):
            state = "finished"
        elif not mine:
            state = "pending"
        elif alive:
            state = "running"
        else:
            # A run in object storage may have its driver on another machine, which this one cannot ask.
            state = "interrupted" if storage.store_of(run_dir) is None else "running elsewhere or interrupted"
        out.append(
            StageStatus(
                name=stage.name,
                kind=stage.kind,
                state=state,
                step=max(steps, default=0),
                max_steps=resolve_stage(run, index).train.max_steps,
                last_checkpoint=f"{complete[0]} (step {complete[1]})" if complete else None,
                restarts=len(restarts),
            )
        )
    return out


def _last_complete_checkpoint(run_dir: Path, stage: str) -> Optional[Tuple[str, int]]:
    """(directory name, step) of the stage's newest complete checkpoint, by sizes (no hashing)."""
    store = storage.store_of(run_dir)
    if store is None:
        found = next((p for p in step_dirs(run_dir / stage) if verify(p, check_hashes=False) is None), None)
        return (found.name, read_state(found).step) if found else None
    name = next((n for n in stored_steps(store, stage) if verify_stored(store, f"{stage}/{n}") is None), None)
    return (name, stored_state(store, f"{stage}/{name}").step) if name else None


def list_runs(runs_dir: str) -> List[Path]:
    """The runs under ``runs_dir`` (a directory or a store URI), oldest first."""
    if storage.is_uri(runs_dir):
        store = storage.open_store(runs_dir, key="--runs-dir")
        names = storage.looked_up(store, "--runs-dir", lambda store: sorted(store.subdirs()))
        return [rundir.locate(name, runs_dir) for name in names if store.is_file(f"{name}/{CONFIG_FILE}")]
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    return sorted((p for p in runs_dir.iterdir() if (p / CONFIG_FILE).is_file()), key=lambda p: p.stat().st_mtime)
