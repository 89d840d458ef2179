"""A ``WrittenFiles`` ledger that writes in the background: each writer takes a host snapshot of what it is given
on the calling thread and leaves the writing, hashing and syncing (and a ``write_with`` job's work, collectives
included) to one writer thread, so the caller (the training loop) goes on while the bytes go out.

The ledger's ``files`` and its ``on_written`` calls come from the writer thread; read ``files`` only once
``wait`` returned.
"""

from __future__ import annotations

from concurrent import futures
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch

from raylm.host_snapshot import HostBuffers, HostCopies, take_snapshot
from raylm.written_files import WrittenFiles


class BackgroundWrittenFiles(WrittenFiles):
    """Writes queue snapshots; ``sync`` queues the fsync after them; ``done``, ``wait`` and ``abandon`` end it."""

    def __init__(self, root: Path, writer: Executor, on_written: Callable[[str], None] = lambda rel: None,
                 buffers: Optional[HostBuffers] = None):
        """``writer`` runs the writes in the order they are queued: one thread (a rank's checkpoints share it, so
        a save starts no thread). The snapshots are copied into ``buffers`` when given (no other snapshot may use
        them until this ledger's writes are done)."""
        super().__init__(root, on_written)
        self._writer = writer
        self._queued: List[Future] = []
        # What the writer thread writes through: it fills this ledger's ``files``.
        self._inline = WrittenFiles(root, on_written)
        self.files = self._inline.files
        # The ledger's snapshots share their copies of a storage (taken while training waits for them).
        self._copies = HostCopies(buffers)

    def _queue(self, write: Callable, *args) -> None:
        self._queued.append(self._writer.submit(write, *args))

    def _queue_restored(self, write: Callable, obj: Any, *args) -> None:
        """Queue ``write(copy, *args)`` of a host copy of ``obj``: its snapshot taken here, the copy built from it on
        the writer thread."""
        snapshot = take_snapshot(obj, self._copies)
        self._queue(lambda: write(snapshot.restore(), *args))

    def write_bytes(self, path: Union[str, Path], data: bytes) -> None:
        self._queue(self._inline.write_bytes, path, bytes(data))

    def torch_save(self, obj, path: Union[str, Path]) -> None:
        self._queue_restored(self._inline.torch_save, obj, path)

    def save_safetensors(self, tensors: Mapping[str, torch.Tensor], path: Union[str, Path],
                         metadata: Optional[Dict[str, str]] = None) -> None:
        self._queue_restored(self._inline.save_safetensors, dict(tensors), path, dict(metadata) if metadata else None)

    def write_with(self, job: Callable[[WrittenFiles, Any], None], state: Any) -> None:
        """Queue ``job`` with a host snapshot of ``state``; what it writes is written at once, on the writer thread."""
        self._queue_restored(lambda restored: job(self._inline, restored), state)

    def sync(self) -> None:
        """Queue the fsync of every file after their writes (the last call of a save: training goes on after it);
        ``wait`` returns once it is done."""
        self._queue(self._inline.sync)
        self._copies = HostCopies(self._copies.buffers)  # the queued writes hold what they need of it

    def done(self) -> bool:
        return all(job.done() for job in self._queued)

    def wait(self) -> None:
        """Return once every queued write (and the sync) is done; the first failure raises."""
        for job in self._queued:
            job.result()

    def abandon(self) -> None:
        """Drop the writes not yet begun and wait for the one under way (none writes after this returns)."""
        for job in self._queued:
            job.cancel()
        futures.wait(self._queued)
