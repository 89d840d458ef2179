"""The run directory: its name, its saved config and what each stage left.

A run lives in a local or shared directory, or in object storage
(``runs_dir=s3://...``); then every function here works on this machine's
view of it (``raylm.storage``), reading from and writing to the store.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from raylm.configs.loader import from_yaml_file, to_yaml
from raylm import storage
from raylm.configs.schema import RunConfig
from raylm.errors import UserError
from raylm.files import read_json
from raylm.trainer.checkpoint import step_dirs
from raylm.trainer.layout import CONFIG_FILE, FINAL_DIR, METRICS_FILE, STAGE_SUMMARY
from raylm.trainer.stored_checkpoints import stored_steps


def fresh_name(prefix: str, taken: Callable[[str], bool]) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, n = f"{prefix}-{stamp}", 1
    while taken(name):
        n += 1
        name = f"{prefix}-{stamp}-{n}"
    return name


def _writable_store(runs_dir: str) -> storage.Store:
    store = storage.open_store(runs_dir)
    storage.check_writable(store)
    return store


def name_taken(runs_dir: str) -> Callable[[str], bool]:
    """Whether a run name is in use under ``runs_dir`` (a directory or a store, which is probed first)."""
    if storage.is_uri(runs_dir):
        return _writable_store(runs_dir).is_dir
    return lambda name: (Path(runs_dir) / name).exists()


def reserve(run: RunConfig, prefix: str) -> Path:
    """Name the run (fresh unless given) and refuse a name already taken or a runs_dir that cannot hold it;
    the run's directory (for a run in object storage, this machine's view of it)."""
    if storage.is_uri(run.runs_dir):
        store = _writable_store(run.runs_dir)
        if run.name is None:
            run.name = fresh_name(prefix, store.is_dir)
        if store.is_dir(run.name):
            raise UserError(f"run '{run.name}' already exists in {store.display()}; continue it with "
                            f"'raylm resume {store.display(run.name)}' or pick another --name")
        return storage.view_of(store.child(run.name))
    if run.name is None:
        run.name = fresh_name(prefix, name_taken(run.runs_dir))
    runs_dir = Path(run.runs_dir)
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
    return _make(reserve(run, prefix), run)


def _make(run_dir: Path, run: RunConfig) -> Path:
    try:
        run_dir.mkdir(parents=True, exist_ok=storage.store_of(run_dir) is not None)
    except OSError as err:
        raise UserError(f"runs_dir={run.runs_dir}: cannot create {run_dir} ({err.strerror or err}); point runs_dir at a writable directory") from None
    save_config(run_dir, run)
    return run_dir


@contextmanager
def created(run: RunConfig, prefix: str) -> Iterator[Path]:
    """``create``, undone when a bad input (a UserError) stops the launch before anything
    resumable exists: a failed launch leaves nothing behind, not even an empty runs_dir."""
    run_dir = reserve(run, prefix)
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    _make(run_dir, run)
    try:
        yield run_dir
    except UserError:
        if not _resumable(run_dir, run):
            store = storage.store_of(run_dir)
            if store is not None:
                store.delete_dir("")
            shutil.rmtree(run_dir, ignore_errors=True)
            for parent in made[1:]:
                try:
                    parent.rmdir()
                except OSError:
                    break
        raise


def _resumable(run_dir: Path, run: RunConfig) -> bool:
    """Whether some stage finished or checkpointed, so that 'raylm resume' has something to continue."""
    store = storage.store_of(run_dir)
    return any(stage_finished(run_dir, s.name) or (stored_steps(store, s.name) if store else step_dirs(run_dir / s.name))
               for s in run.stages)


def locate(run: str, runs_dir: str = "runs") -> Path:
    """A run given as a path, a URI or a name under runs_dir (for a run in object storage: this machine's
    view of it, holding its config and metrics)."""
    if storage.is_uri(run) or storage.is_uri(runs_dir):
        key = "RUN" if storage.is_uri(run) else "--runs-dir"
        store = storage.open_store(run, key=key) if storage.is_uri(run) else storage.open_store(runs_dir, key=key).child(run)
        if not storage.looked_up(store, key, lambda store: store.is_file(CONFIG_FILE)):
            raise UserError(f"no run at {store.display()} (no {CONFIG_FILE} there); 'raylm status --runs-dir URI' lists runs")
        view = storage.view_of(store)
        storage.pull(view, CONFIG_FILE)
        storage.pull(view, METRICS_FILE)
        return view
    for candidate in (Path(run), Path(runs_dir) / run):
        if (candidate / CONFIG_FILE).is_file():
            return candidate.resolve()
    raise UserError(f"no run at '{run}' (looked for {run}/{CONFIG_FILE} and {runs_dir}/{run}/{CONFIG_FILE}); 'raylm status' lists runs")


def existing(run: RunConfig) -> Optional[Path]:
    """The run ``run.name`` already under ``run.runs_dir``, if there is one."""
    if not name_taken(run.runs_dir)(run.name):
        return None
    return locate(run.name, run.runs_dir) if storage.is_uri(run.runs_dir) else locate(str(Path(run.runs_dir) / run.name))


def load(run_dir: Path) -> RunConfig:
    return from_yaml_file(run_dir / CONFIG_FILE)


def save_config(run_dir: Path, run: RunConfig) -> None:
    (run_dir / CONFIG_FILE).write_text(to_yaml(run))
    storage.push(run_dir, CONFIG_FILE)


def stage_finished(run_dir: Path, stage: str) -> bool:
    return storage.exists(run_dir, f"{stage}/{STAGE_SUMMARY}") and storage.exists(run_dir, f"{stage}/{FINAL_DIR}/model.safetensors")


SUMMARY_FIELDS = {"stage": str, "kind": str, "steps": int, "final_loss": float, "eval_loss": float, "tokens_per_s": float, "mfu": float,
                  "sample": str, "final_dir": str}
"""What the end-of-run table shows of each stage."""


def stage_summary(run_dir: Path, stage: str) -> Optional[dict]:
    path = run_dir / stage / STAGE_SUMMARY
    if not storage.pull(run_dir, f"{stage}/{STAGE_SUMMARY}") or not path.is_file():
        return None
    # Without its summary a stage counts as unfinished; resuming finishes it again from the last checkpoint.
    fix = f"delete it and run 'raylm resume {storage.where(run_dir)}' to finish the stage again"
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
            storage.fetch_tree(run_dir, f"{name}/{FINAL_DIR}")
            return run_dir / name / FINAL_DIR
    raise UserError(f"run {run_dir.name} has no finished stage{f' {stage}' if stage else ''} yet; finish it with 'raylm resume {storage.where(run_dir)}'")
