"""Saving a stage's checkpoints on one rank: every rank writes its files, then the checkpoint commits (the
ranks' file lists gathered, rank 0's manifest, a barrier, the session's commit).

With ``train.async_checkpoint`` the files are written in the background from a host snapshot
(``raylm.background_writes``) and the commit comes at the first step by which every rank's files are on disk;
the training loop does not wait for the disk in between. The training thread's collectives (DeepSpeed's save,
the poll, the commit) stay on it; those of the layout-free copy's gathers run on the writer thread over gloo
groups of its own (``raylm.parallelism.topology.CheckpointGroups``), in the same order on every rank, since
every rank queues the same saves' work in the same order. A checkpoint counts only once its manifest commits: a
rank killed before that leaves a directory without one, which a resume skips.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from raylm.background_writes import BackgroundWrittenFiles
from raylm.trainer.checkpoint import TrainerState, write_manifest
from raylm.trainer.session import Session
from raylm.written_files import WrittenFiles


@dataclass
class _Pending:
    """A checkpoint whose files are being written, with what its commit needs as it was at the snapshot."""

    directory: Path
    written: WrittenFiles
    state: TrainerState
    metrics: Dict
    began: float
    """``time.perf_counter()`` when the save began."""
    stall_s: float
    """Seconds the training thread has spent on this checkpoint so far."""


class CheckpointSaves:
    """The checkpoints of one stage on one rank; at most one is pending (written, not yet committed) at a time."""

    def __init__(self, session: Session, background: bool, device: torch.device, log: Callable[[Dict], None]):
        self.session = session
        self.background = background
        self.device = device
        self.log = log
        self._pending: Optional[_Pending] = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="raylm-checkpoint-writer") if background else None
        self._pruning: Optional[Future] = None
        """Rank 0's deletion of the checkpoints beyond keep_last, on the writer thread after an asynchronous commit."""

    def save(self, state: TrainerState, metrics: Dict, write_files: Callable[[WrittenFiles, Path], None]) -> None:
        """Checkpoint ``state`` (which the caller no longer changes): ``write_files(written, directory)`` writes
        this rank's files into the checkpoint's directory through the ledger it is given. Committed before
        returning, or in the background mode by a later ``poll`` or ``finish``. A collective."""
        self.finish()
        began = time.perf_counter()
        directory = self.session.checkpoint_dir(state.step)
        on_written = partial(self.session.written, directory)
        written = BackgroundWrittenFiles(directory, self._writer, on_written) if self.background else WrittenFiles(directory, on_written)
        write_files(written, directory)
        written.sync()
        self._pending = _Pending(directory, written, state, metrics, began, time.perf_counter() - began)
        if not self.background:
            self.finish()

    def poll(self) -> None:
        """Commit the pending checkpoint once every rank's files are written. Called at every step by every rank:
        a collective (one tiny all-reduce) while a checkpoint is pending."""
        if self._pending is None:
            return
        began = time.perf_counter()
        written_everywhere = torch.tensor([int(self._pending.written.done())], device=self.device)
        dist.all_reduce(written_everywhere, op=dist.ReduceOp.MIN)
        everywhere = bool(written_everywhere.item())
        self._pending.stall_s += time.perf_counter() - began
        if everywhere:
            self.finish()

    def finish(self) -> None:
        """Wait for the pending checkpoint's files and commit it (nothing to do without one). A collective."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        began = time.perf_counter()
        pending.written.wait()
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, pending.written.files)
        files = {rel: described for part in gathered for rel, described in part.items()}
        step = pending.state.step
        if dist.get_rank() == 0:
            write_manifest(pending.directory, pending.state, files)
        dist.barrier()
        self.session.commit(step, pending.directory, {"step": step, **pending.metrics})
        if dist.get_rank() == 0:
            # Deleting old checkpoints is I/O the training thread need not wait for (~30 ms of the benchmarks' stall).
            if self.background:
                if self._pruning is not None:
                    self._pruning.result()  # done: the writer ran it before this checkpoint's writes
                self._pruning = self._writer.submit(self.session.prune)
            else:
                self.session.prune()
        ended = time.perf_counter()
        self.log({"step": step, "kind": "event", "event": "checkpoint", "seconds": ended - pending.began,
                  "stall_s": pending.stall_s + ended - began, "async": self.background,
                  "bytes": sum(size for size, _ in files.values()), "dir": str(pending.directory)})

    def close(self) -> None:
        """At the stage's end: commit the pending checkpoint and wait for the old ones' deletion. A collective."""
        self.finish()
        if self._pruning is not None:
            self._pruning.result()

    def abandon(self) -> None:
        """After a failure: stop writing the pending checkpoint, which never commits (no collective)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.written.abandon()
