"""Where a rank's checkpoints go and come from; the only seam between the
per-rank loop and whatever launched it.

``LocalSession`` serves ``torchrun`` (and any launcher with a shared run
directory); ``raylm.launcher.ray_session.RaySession`` serves Ray Train. The
per-rank loop imports neither Ray nor a launcher.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, List, Optional, Protocol

import torch.distributed as dist

from raylm.trainer.checkpoint import MANIFEST, step_dir_name, step_dirs, verify


class Session(Protocol):
    shared_staging: bool
    """True when every rank writes into one staging directory."""

    owns_metrics: bool
    """True when rank 0 itself writes metrics.jsonl and the W&B run; else ``record`` hands every record to the launcher."""

    def record(self, record: dict) -> None:
        """Rank 0's metrics record, for a launcher that logs them (``owns_metrics`` False)."""

    def resume_candidates(self) -> List[Path]:
        """Checkpoint directories to try, newest first (on a run's store: where they will be fetched to)."""

    def verify(self, checkpoint: Path) -> Optional[str]:
        """None when ``checkpoint`` is complete, else why not (``checkpoint.verify``'s answer)."""

    def fetch(self, checkpoint: Path, wanted: Callable[[str], bool]) -> None:
        """Make the files of ``checkpoint`` that ``wanted`` picks (relative paths) readable on this rank."""

    def publish(self, run_dir: Path, rel: str) -> None:
        """Make ``run_dir/rel``, written by this rank, part of the run wherever it is stored."""

    def staging_dir(self, step: int) -> Path:
        """An empty directory this rank writes its part of checkpoint ``step`` into."""

    def commit(self, step: int, staging: Path, metrics: dict) -> None:
        """Publish the checkpoint once every rank's files and the manifest are in ``staging``.

        Called on every rank after a barrier.
        """

    def close(self, step: int) -> None:
        """Called on every rank once the stage's final weights and summary are written."""


def prune_checkpoints(stage_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints of a stage on a disk (older incomplete ones go with them)."""
    for old in [path for path in step_dirs(stage_dir) if (path / MANIFEST).is_file()][keep_last:]:
        shutil.rmtree(old, ignore_errors=True)


class LocalSession:
    """Checkpoints straight into ``<stage_dir>/step_N`` on a shared filesystem."""

    shared_staging = True
    owns_metrics = True

    def __init__(self, stage_dir: Path, keep_last: int):
        self.stage_dir = stage_dir
        self.keep_last = keep_last

    def record(self, record: dict) -> None:
        pass

    def resume_candidates(self) -> List[Path]:
        return step_dirs(self.stage_dir)

    def verify(self, checkpoint: Path) -> Optional[str]:
        return verify(checkpoint)

    def fetch(self, checkpoint: Path, wanted: Callable[[str], bool]) -> None:
        pass

    def publish(self, run_dir: Path, rel: str) -> None:
        pass

    def staging_dir(self, step: int) -> Path:
        staging = self.stage_dir / f".staging-{step_dir_name(step)}"
        if dist.get_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        dist.barrier()
        return staging

    def commit(self, step: int, staging: Path, metrics: dict) -> None:
        if dist.get_rank() == 0:
            final = self.stage_dir / step_dir_name(step)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            prune_checkpoints(self.stage_dir, self.keep_last)
        dist.barrier()

    def close(self, step: int) -> None:
        pass


def newest_first_unique(paths: List[Optional[Path]]) -> List[Path]:
    """``paths`` without Nones and repeats, in the given (newest-first) order."""
    seen, out = set(), []
    for path in paths:
        if path is not None and path.resolve() not in seen:
            seen.add(path.resolve())
            out.append(path)
    return out
