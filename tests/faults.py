"""Helpers that inject real failures into running stages."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple


def _latest_headers(stage_dir: Path) -> List[Tuple[int, str]]:
    """(pid, node id) of each rank at the stage's latest (re)start, from the ``[raylm] rank N pid P node X`` log headers."""
    headers = []
    for log in sorted((stage_dir / "logs").glob("rank_*.log")):
        found = re.findall(r"\[raylm\] rank \d+ pid (\d+) node (\w+)", log.read_text(errors="replace"))
        if found:
            headers.append((int(found[-1][0]), found[-1][1]))
    return headers


def worker_pids(stage_dir: Path) -> List[int]:
    """Pids of the stage's current workers."""
    return [pid for pid, _ in _latest_headers(stage_dir)]


def worker_nodes(stage_dir: Path) -> List[str]:
    """Ray node ids of the stage's current workers, by rank."""
    return [node for _, node in _latest_headers(stage_dir)]


def latest_step(run_dir: Path, stage: str = "pretrain") -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("stage") == stage and record.get("kind") == "train":
            steps.append(record["step"])
    return max(steps, default=0)


def committed_step(run_dir: Path, stage: str = "pretrain") -> int:
    """The newest checkpoint step whose manifest the ranks have committed: their own progress, which the driver's
    records (relayed through Ray) can trail by several steps on a loaded machine."""
    from raylm.trainer.checkpoint import MANIFEST, STEP_DIR, step_dirs

    committed = (p for p in step_dirs(run_dir / stage) if (p / MANIFEST).exists())
    return next((int(STEP_DIR.match(p.name).group(1)) for p in committed), 0)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 300, poll_s: float = 0.05) -> None:
    """Poll ``condition`` until it holds; a test fails loudly, naming ``what``, once ``timeout`` has passed."""
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(poll_s)


class StepTrigger(threading.Thread):
    """Runs ``action`` once the stage has logged ``step``; ``error`` holds what went wrong (a timeout included)."""

    def __init__(self, run_dir: Path, step: int, action: Callable[[], None], timeout: float):
        super().__init__(daemon=True)
        self.run_dir, self.step, self.action, self.timeout = run_dir, step, action, timeout
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            deadline = time.time() + self.timeout
            while latest_step(self.run_dir) < self.step:
                if time.time() > deadline:
                    raise TimeoutError(f"step {self.step} was not logged within {self.timeout:.0f} s")
                time.sleep(0.05)
            self.action()
        except BaseException as err:  # reported to the test through .error
            self.error = err


def when_step_reached(run_dir: Path, step: int, action: Callable[[], None], timeout: float = 600) -> StepTrigger:
    """Run ``action`` once the stage has logged ``step`` (in a background thread)."""
    trigger = StepTrigger(run_dir, step, action, timeout)
    trigger.start()
    return trigger


def signal_worker(stage_dir: Path, sig: int, rank: int = 1) -> Optional[int]:
    pids = worker_pids(stage_dir)
    if len(pids) <= rank:
        return None
    os.kill(pids[rank], sig)
    return pids[rank]

