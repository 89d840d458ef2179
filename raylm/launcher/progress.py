"""Live console progress on the driver, read from the run's metrics.jsonl.

Workers only append to the metrics file; the driver follows it, so the bar
shows exactly what is stored, whichever node rank 0 runs on.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from raylm.trainer.metrics import parse_record


class StageProgress:
    def __init__(self, metrics_path: Path, stage: str, max_steps: int, console: Console, enabled: bool = True):
        self.metrics_path = metrics_path
        self.stage = stage
        self.console = console
        self.enabled = enabled
        self._stop = threading.Event()
        self._offset = metrics_path.stat().st_size if metrics_path.exists() else 0
        self._thread: Optional[threading.Thread] = None
        self._progress = Progress(
            TextColumn("[bold]{task.fields[stage]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=not enabled,
        )
        self._task = self._progress.add_task(stage, total=max_steps, stage=stage, status="starting workers")

    def __enter__(self) -> "StageProgress":
        self._progress.start()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._poll()
        self._progress.stop()

    def _follow(self) -> None:
        while not self._stop.wait(0.5):
            self._poll()

    def _poll(self) -> None:
        try:
            with open(self.metrics_path) as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except OSError:
            return  # not written yet, or the run directory's storage hiccups: show it at the next poll
        complete = chunk[: chunk.rfind("\n") + 1]
        self._offset += len(complete.encode())
        for line in complete.splitlines():
            record = parse_record(line)
            if record is not None and record.get("stage") == self.stage:
                self._show(record)

    def _show(self, record: dict) -> None:
        kind = record.get("kind")
        step = record.get("step", 0)
        if kind == "start":
            status = f"tp{record['tp']} pp{record['pp']} dp{record['dp']} ZeRO-{record['zero_stage']}"
            if step:
                status += f", resumed at step {step}"
            self._progress.update(self._task, completed=step, status=status)
        elif kind == "train":
            status = f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s  MFU {100 * record['mfu']:.1f}%"
            self._progress.update(self._task, completed=step, status=status)
        elif kind == "eval":
            self.console.print(f"  [{self.stage}] step {step}: eval loss {record['eval_loss']:.4f}, perplexity {record['eval_ppl']:.2f}")
        elif kind == "event" and record.get("event") == "restart":
            self.console.print(
                f"  [yellow]restart[/]: {self.stage} resumes at step {step} on {record['world_size']} worker(s) "
                f"({record['steps_lost']} logged step(s) to redo)"
            )
        elif kind == "event" and record.get("event") == "skipped_checkpoint":
            self.console.print(f"  [yellow]warning[/]: skipped incomplete checkpoint {record['path']} ({record['reason']})")
        elif kind == "end":
            self._progress.update(self._task, completed=step, status=f"done, loss {record.get('final_loss', math.nan):.4f}")
