"""The driver's side of a stage's metrics: take rank 0's records from the relay, write them to
metrics.jsonl, show them on the console and log them to the stage's W&B run.

The W&B run lives in the driver's process for the whole stage, so a worker
restart loses nothing of it and only the driver's machine needs the API key.
A restart of the worker group shows as its ``start`` record; the pump writes
the restart event (from the records the stage logged before) ahead of it. A
resumed rank first sends again, marked ``replayed``, the records its
checkpoint kept: the pump writes those this run lacks (a killed driver's
last ones), appended: readers order records by step.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

from raylm.cluster.relay import drain
from raylm.configs.loader import dump_nested
from raylm.configs.schema import RunConfig
from raylm.launcher.progress import StageProgress
from raylm.trainer.layout import METRICS_FILE
from raylm.trainer.metrics import MetricsFile, WandbRun, read_records, record_key, restart_event


class RecordPump:
    def __init__(self, relay, run_dir: Path, run_name: str, stage: str, cfg: RunConfig, progress: StageProgress):
        self.relay = relay
        self.stage = stage
        self.progress = progress
        self.metrics = MetricsFile(run_dir / METRICS_FILE)
        self.seen: List[Dict[str, Any]] = [r for r in read_records(self.metrics.path) if r.get("stage") == stage] \
            if self.metrics.path.exists() else []
        self._keys = {record_key(record) for record in self.seen}
        self.wandb = WandbRun(cfg.logging.wandb, run_dir, run_name, stage, dump_nested(cfg))
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "RecordPump":
        self._thread = threading.Thread(target=self._follow, daemon=True, name="raylm-record-pump")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.pump()

    def _follow(self) -> None:
        while not self._stop.wait(0.5):
            self.pump()

    def pump(self) -> None:
        for record in drain(self.relay):
            if record.pop("replayed", False):
                # The resumed rank's copy of what the stage logged up to its checkpoint: keep what this run lacks
                # (its driver died before writing it), skip what it has.
                if record_key(record) not in self._keys:
                    self._take(record, show=False)
                continue
            if record.get("kind") == "start":
                event = restart_event(self.seen, self.stage, record["step"], record["world_size"])
                if event is not None:
                    self._take({"time": record.get("time"), **event})
            self._take(record)

    def _take(self, record: Dict[str, Any], show: bool = True) -> None:
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
