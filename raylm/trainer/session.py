"""Where a rank's checkpoints go and come from; the only seam between the
per-rank loop and whatever launched it.

``LocalSession`` serves ``torchrun`` (and any launcher with a shared run
directory); ``raylm.launcher.ray_session.RaySession`` serves Ray Train. The
per-rank loop imports neither Ray nor a launcher.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, List, Optional, Protocol

import torch.distributed as dist

from raylm.trainer.checkpoint import MANIFEST, step_dir_name, step_dirs, verify


class Session(Protocol):
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

    def checkpoint_dir(self, step: int) -> Path:
        """An empty directory this rank writes its part of checkpoint ``step`` into: the checkpoint itself where
        every rank sees the stage's storage as a disk, a private one to upload from otherwise. Called on every rank."""

    def written(self, directory: Path, rel: str) -> None:
        """File ``rel`` of the checkpoint this rank writes into ``directory`` is complete (a session that uploads
        the checkpoint may start with it while the rank writes the next)."""

    def commit(self, step: int, directory: Path, metrics: dict, group: Optional[dist.ProcessGroup]) -> None:
        """Publish the checkpoint once every rank's files are in its ``directory`` and the manifest in rank 0's.

        Called on every rank after a barrier over ``group`` (None: the default group), over which any collective
        of its own must run: an asynchronous save commits on its writer thread.
        """

    def prune(self) -> None:
        """Delete the stage's complete checkpoints beyond the newest ``keep_last``. Called on rank 0 after a commit;
        no collective, so an asynchronous save runs it on its writer thread."""

    def close(self, step: int) -> None:
        """Called on every rank once the stage's final weights and summary are written."""


def fresh_checkpoint_dir(stage_dir: Path, step: int) -> Path:
    """``<stage_dir>/step_N`` for every rank to write its files straight into (rank 0 commits the manifest last),
    emptied of an earlier attempt at the same step: one without a manifest, or one that failed verification (a
    complete one would have been resumed from). Its manifest goes first, so no partial state passes for complete.
    A collective."""
    directory = stage_dir / step_dir_name(step)
    if dist.get_rank() == 0:
        (directory / MANIFEST).unlink(missing_ok=True)
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
    dist.barrier()
    return directory


def prune_checkpoints(stage_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints of a stage on a disk. Each goes manifest first: one whose
    deletion is cut short is plainly incomplete, never complete with files missing."""
    for old in [path for path in step_dirs(stage_dir) if (path / MANIFEST).is_file()][keep_last:]:
        (old / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)


class LocalSession:
    """Checkpoints straight into ``<stage_dir>/step_N`` on a shared filesystem."""

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

    def checkpoint_dir(self, step: int) -> Path:
        return fresh_checkpoint_dir(self.stage_dir, step)

    def written(self, directory: Path, rel: str) -> None:
        pass

    def commit(self, step: int, directory: Path, metrics: dict, group: Optional[dist.ProcessGroup]) -> None:
        pass

    def prune(self) -> None:
        prune_checkpoints(self.stage_dir, self.keep_last)

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
