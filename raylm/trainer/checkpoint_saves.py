"""Saving a stage's checkpoints on one rank: every rank writes its files, then the checkpoint commits (the
ranks' file lists gathered, rank 0's manifest, a barrier, the session's commit, rank 0's deletion of the
checkpoints beyond ``keep_last``).

With ``train.async_checkpoint`` the training thread only takes a host snapshot of the state
(``raylm.background_writes``); the rank's writer thread writes the files and then commits, its collectives over
gloo groups of its own (``raylm.parallelism.topology.CheckpointGroups``), so the training loop waits neither for
the disk nor for the slowest rank's writes. Every rank queues the same saves' work in the same order, so the
writer threads' collectives match. A checkpoint counts only once its manifest commits: a rank killed before
that leaves a directory without one, which a resume skips.
"""

from __future__ import annotations

import time
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch.distributed as dist

from raylm.background_writes import BackgroundWrittenFiles
from raylm.host_snapshot import HostBuffers
from raylm.trainer.checkpoint import TrainerState, write_manifest
from raylm.trainer.session import Session
from raylm.written_files import WrittenFiles


@dataclass
class _Pending:
    """A checkpoint being written and committed on the writer thread, with what its commit needs as it was at the
    snapshot."""

    directory: Path
    written: WrittenFiles
    state: TrainerState
    metrics: Dict
    began: float
    """``time.perf_counter()`` when the save began."""
    stall_s: float
    """Seconds the training thread has spent on this checkpoint so far."""
    commit: Optional[Future] = None
    """The writer thread's commit; its result is the checkpoint's bytes and when it committed."""


class CheckpointSaves:
    """The checkpoints of one stage on one rank; at most one is pending (not yet committed) at a time."""

    def __init__(self, session: Session, log: Callable[[Dict], None], writer_group: Optional[dist.ProcessGroup] = None):
        """``writer_group`` (a gloo group of every rank, used by no other thread) makes the saves asynchronous: the
        writer thread commits over it. Without it every save writes and commits before returning."""
        self.session = session
        self.log = log
        self.writer_group = writer_group
        self.background = writer_group is not None
        self._pending: Optional[_Pending] = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="raylm-checkpoint-writer") if self.background else None
        self._buffers = HostBuffers() if self.background else None
        """The snapshots' host memory, reused by every save once the previous one is committed."""

    def save(self, state: TrainerState, metrics: Dict, write_files: Callable[[WrittenFiles, Path], None]) -> None:
        """Checkpoint ``state`` (which the caller no longer changes): ``write_files(written, directory)`` writes
        this rank's files into the checkpoint's directory through the ledger it is given. Committed before
        returning, or in the background mode on the writer thread. A collective."""
        self.finish()
        began = time.perf_counter()
        directory = self.session.checkpoint_dir(state.step)
        on_written = partial(self.session.written, directory)
        if self.background:
            self._buffers.reclaim()  # the previous save's writes are done: finished above
            written = BackgroundWrittenFiles(directory, self._writer, on_written, self._buffers)
        else:
            written = WrittenFiles(directory, on_written)
        write_files(written, directory)
        written.sync()
        pending = _Pending(directory, written, state, metrics, began, time.perf_counter() - began)
        if self.background:
            pending.commit = self._writer.submit(self._commit, pending)  # after the writes: one thread
            self._pending = pending
        else:
            size, ended = self._commit(pending)
            self._log(pending, size, ended, ended - began)

    def _commit(self, pending: _Pending) -> Tuple[int, float]:
        """Every rank's files written, gathered into rank 0's manifest, the checkpoint published, then rank 0
        deletes the old ones; returns the checkpoint's bytes and when this ended. A collective over the writer's
        group (the default group when saving synchronously)."""
        group = self.writer_group
        pending.written.wait()
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, pending.written.files, group=group)
        files = {rel: described for part in gathered for rel, described in part.items()}
        step = pending.state.step
        if dist.get_rank() == 0:
            write_manifest(pending.directory, pending.state, files)
        dist.barrier(group=group)
        self.session.commit(step, pending.directory, {"step": step, **pending.metrics}, group)
        if dist.get_rank() == 0:
            self.session.prune()
        return sum(size for size, _ in files.values()), time.perf_counter()

    def poll(self) -> None:
        """Log the pending checkpoint once the writer thread has committed it; a failure of its writes or commit
        raises here. Called at every step; no collective."""
        if self._pending is not None and self._pending.commit.done():
            self.finish()

    def finish(self) -> None:
        """Wait for the pending checkpoint's commit (and the old ones' deletion) and log it (nothing to do without
        one); no collective. The stage's end calls it last."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        waited = time.perf_counter()
        size, ended = pending.commit.result()
        self._log(pending, size, ended, pending.stall_s + max(0.0, ended - waited))  # waited until it committed

    def _log(self, pending: _Pending, size: int, ended: float, stall_s: float) -> None:
        self.log({"step": pending.state.step, "kind": "event", "event": "checkpoint", "seconds": ended - pending.began,
                  "stall_s": stall_s, "async": self.background, "bytes": size, "dir": str(pending.directory)})

    def abandon(self) -> None:
        """After a failure: stop writing the pending checkpoint, which never commits unless its commit was under
        way (no collective; a commit under way ends with its peers)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.commit.cancel()
            pending.written.abandon()
            futures.wait([pending.commit])
