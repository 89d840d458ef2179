"""Live console progress on the driver, from the records it writes to metrics.jsonl
(``RecordPump`` hands each one over), so the bar shows exactly what is stored."""

from __future__ import annotations

import math

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StageProgress:
    def __init__(self, stage: str, max_steps: int, console: Console, enabled: bool = True):
        self.stage = stage
        self.console = console
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
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def show(self, record: dict) -> None:
        if record.get("stage") == self.stage:
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
