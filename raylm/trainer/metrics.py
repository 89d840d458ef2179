"""Rank 0's metric sinks: ``metrics.jsonl`` in the run directory and W&B.

Every record carries ``stage`` and ``step``; the console progress bar on the
driver reads the same file, so what is shown is what is stored.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

from raylm.configs.schema import WandbConfig
from raylm.files import read_text

WANDB_ID_FILE = "wandb_id"


def parse_record(line: str) -> Optional[Dict[str, Any]]:
    """One line's record; None for a torn or foreign line, which readers skip."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_records(path: Path) -> List[Dict[str, Any]]:
    """Every complete record of a metrics file (a torn last line, or any line that is not a record, is skipped)."""
    text = read_text(path, "check the run directory's permissions", errors="replace")
    return [record for line in text.splitlines() if (record := parse_record(line)) is not None]


def restart_event(earlier: List[Dict[str, Any]], stage: str, resumed_step: int, world_size: int) -> Optional[Dict[str, Any]]:
    """The record of a restart of ``stage`` at ``resumed_step``: None unless ``earlier`` records show it started before.

    ``last_logged_step`` is the furthest step the failed attempts logged, ``steps_lost`` how many of them are redone.
    """
    mine = [r for r in earlier if r.get("stage") == stage]
    if not any(r.get("kind") == "start" for r in mine):
        return None
    reached = max((r["step"] for r in mine if r.get("kind") == "train"), default=resumed_step)
    return {"stage": stage, "step": resumed_step, "kind": "event", "event": "restart", "last_logged_step": reached,
            "steps_lost": max(0, reached - resumed_step), "world_size": world_size}


def record_key(record: Dict[str, Any]) -> tuple:
    """What makes a record the same record when it comes twice (a replay after a restart)."""
    return record.get("stage"), record.get("kind"), record.get("step"), record.get("event")


class MetricsFile:
    def __init__(self, path: Path):
        self.path = path

    def write(self, record: Dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


class WandbRun:
    """One W&B run per stage, with a stable id so restarts append to it.

    W&B drops a ``log`` whose internal step is below the run's current one,
    which a rewind to a checkpoint would cause; every metric is therefore
    plotted against our own ``trainer/step`` and the internal step is never set.
    """

    def __init__(self, cfg: WandbConfig, run_dir: Path, run_name: str, stage: str, config: dict):
        self.run = None
        if cfg.mode == "disabled":
            return
        import wandb

        mode = cfg.mode
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            mode = "offline"
        id_file = run_dir / stage / WANDB_ID_FILE
        id_file.parent.mkdir(parents=True, exist_ok=True)
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:8])
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=run_name,
            name=f"{run_name}/{stage}",
            job_type=stage,
            id=id_file.read_text().strip(),
            resume="allow",
            reinit="create_new",  # the driver keeps every stage of a fit open until it has finished the stage
            dir=str(run_dir),
            mode=mode,
            config=config,
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        self.run.define_metric("trainer/step")
        self.run.define_metric("*", step_metric="trainer/step")

    def log(self, step: int, values: Dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log({"trainer/step": step, **values})

    def log_record(self, record: Dict[str, Any]) -> None:
        """A metrics record's numbers, under its kind (``train/loss``, ``eval/eval_loss``, ``event/...``)."""
        prefix = record.get("kind", "train")
        skip = ("step", "kind", "time")
        self.log(record["step"], {f"{prefix}/{k}": v for k, v in record.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip})

    def summary(self, values: Dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> Optional[str]:
        if self.run is None:
            return None
        directory = self.run.dir
        self.run.finish()
        return str(Path(directory).parent)
