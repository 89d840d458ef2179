"""The driver's side of a fit's metrics: take rank 0's records from the relay, write them to
metrics.jsonl, show them on the console and log them to each stage's W&B run.

A fit runs one or more stages in order; each record names its stage. A
stage's W&B run opens with its first record and lives in the driver's
process until the driver has finished the stage, so a worker restart loses
nothing of it and only the driver's machine needs the API key. A restart of
the worker group shows as its ``start`` record; the pump writes the restart
event (from the records the stage logged before) ahead of it. A resumed rank
first sends again, marked ``replayed``, the records its checkpoint kept: the
pump writes those this run lacks (a killed driver's last ones), appended:
readers order records by step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from rich.console import Console

from raylm.cluster.relay import drain
from raylm.configs.loader import dump_nested
from raylm.configs.schema import RunConfig
from raylm.launcher.periodic import Periodic
from raylm.launcher.progress import StageProgress
from raylm.trainer.layout import METRICS_FILE
from raylm.trainer.metrics import MetricsFile, WandbRun, read_records, record_key, restart_event


class StageRecords:
    """One stage's records on the driver: into metrics.jsonl, its W&B run and its progress bar."""

    def __init__(self, metrics: MetricsFile, run_dir: Path, run_name: str, stage: str, cfg: RunConfig, progress: StageProgress):
        self.stage = stage
        self.metrics = metrics
        self.progress = progress
        self.seen: List[Dict[str, Any]] = [r for r in read_records(metrics.path) if r.get("stage") == stage] \
            if metrics.path.exists() else []
        self._keys = {record_key(record) for record in self.seen}
        self.wandb = WandbRun(cfg.logging.wandb, run_dir, run_name, stage, dump_nested(cfg))

    def take(self, record: Dict[str, Any]) -> None:
        if record.pop("replayed", False):
            # The resumed rank's copy of what the stage logged up to its checkpoint: keep what this run lacks
            # (its driver died before writing it), skip what it has.
            if record_key(record) not in self._keys:
                self._write(record, show=False)
            return
        if record.get("kind") == "start":
            event = restart_event(self.seen, self.stage, record["step"], record["world_size"])
            if event is not None:
                self._write({"time": record.get("time"), **event})
        self._write(record)

    def _write(self, record: Dict[str, Any], show: bool = True) -> None:
        self.seen.append(record)
        self._keys.add(record_key(record))
        self.metrics.write(record)
        self.wandb.log_record(record)
        if show:
            self.progress.show(record)

    def finish(self, summary: Dict[str, Any]) -> None:
        """The stage's summary into its W&B run, which then ends."""
        self.wandb.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        self.wandb.finish()


class RecordPump:
    """Follows the relay for a fit of ``stages`` ((name, resolved config), in order); one progress bar is live at a
    time: the stage whose records come now."""

    def __init__(self, relay, run_dir: Path, run_name: str, stages: List[Tuple[str, RunConfig]], console: Console):
        self.relay = relay
        self.run_dir = run_dir
        self.run_name = run_name
        self.console = console
        self.configs = dict(stages)
        self.metrics = MetricsFile(run_dir / METRICS_FILE)
        self.stages: Dict[str, StageRecords] = {}
        self._live: Optional[StageProgress] = None
        self._first = stages[0][0]
        self._following = Periodic(self.pump, 0.5, "raylm-record-pump")

    def __enter__(self) -> "RecordPump":
        self._show(self._progress(self._first))  # "starting workers" until the first record
        self._following.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._following.__exit__(*exc)
        self._show(None)

    def _progress(self, stage: str) -> StageProgress:
        cfg = self.configs[stage]
        return StageProgress(stage, cfg.train.max_steps, self.console, enabled=cfg.logging.progress)

    def _show(self, progress: Optional[StageProgress]) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
        self._live = progress.__enter__() if progress is not None else None

    def stage(self, name: str) -> StageRecords:
        """``name``'s records (opening its W&B run, and its progress bar in place of the previous stage's)."""
        if name not in self.stages:
            progress = self._live if self._live is not None and self._live.stage == name else self._progress(name)
            if progress is not self._live:
                self._show(progress)
            self.stages[name] = StageRecords(self.metrics, self.run_dir, self.run_name, name, self.configs[name], progress)
        return self.stages[name]

    def pump(self) -> None:
        for record in drain(self.relay):
            self.stage(record["stage"]).take(record)

    def records(self, name: str) -> List[Dict[str, Any]]:
        return self.stages[name].seen if name in self.stages else []

    def finish(self, name: str, summary: Dict[str, Any]) -> None:
        if name in self.stages:
            self.stages.pop(name).finish(summary)

    def finish_all(self) -> None:
        """End every W&B run still open (stages a failed fit left without a summary)."""
        for name in list(self.stages):
            self.finish(name, {})
