"""A copy of an object's state in host memory, taken in one go so that it can be written out later while the
original keeps changing (an asynchronous checkpoint snapshots on the training thread and writes in the background).

Tensors that share a storage (ZeRO's weights are views of one flat buffer) share its copy, so ``torch.save`` of
the snapshot writes the archive it would have written of the original, byte for byte (on a GPU, but for the
storages' recorded device: DeepSpeed and raylm load checkpoints with ``map_location="cpu"`` anyway). Snapshots
taken with one ``HostCopies`` share copies too: a checkpoint's files hold the same optimizer state twice
(DeepSpeed's and the layout-free copy's), and copying it once halves both the training thread's time and the
host memory.
"""

from __future__ import annotations

import io
import pickle
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch


class HostBuffers:
    """Host memory for snapshots, kept from one checkpoint to the next: a copy into memory touched before spares the
    page faults of fresh memory, which took as long as the copy itself (70 MB: ~60 ms against ~10 ms)."""

    def __init__(self):
        self._free: Dict[int, List[torch.UntypedStorage]] = {}
        self._lent: List[torch.UntypedStorage] = []

    def take(self, nbytes: int) -> torch.UntypedStorage:
        free = self._free.get(nbytes)
        buffer = free.pop() if free else torch.UntypedStorage(nbytes)
        self._lent.append(buffer)
        return buffer

    def reclaim(self) -> None:
        """Every buffer lent so far may be taken again (the snapshots that held them are written); those not taken
        since the last call are let go."""
        self._free = {}
        for buffer in self._lent:
            self._free.setdefault(buffer.nbytes(), []).append(buffer)
        self._lent = []


class HostCopies:
    """Host copies of storages, each made once for as long as its original lives; the originals must not change
    meanwhile (the snapshots of one checkpoint, taken while training waits). The copies go into ``buffers`` when
    given, else into new memory."""

    def __init__(self, buffers: Optional[HostBuffers] = None):
        self.buffers = buffers
        self._copies: Dict[int, Tuple[weakref.ref, torch.UntypedStorage]] = {}

    def of(self, storage: torch.UntypedStorage) -> torch.UntypedStorage:
        key = storage._cdata  # what torch.save tells storages apart by
        known = self._copies.get(key)
        # torch keeps one Python object per live storage: a dead original's key may name a new storage, whose
        # object is another one.
        if known is not None and known[0]() is storage:
            return known[1]
        if self.buffers is not None:
            copied = self.buffers.take(storage.nbytes())
            copied.copy_(storage)
        else:
            copied = storage.clone() if storage.device.type == "cpu" else storage.cpu()
        self._copies[key] = (weakref.ref(storage), copied)
        return copied


def _twin(tensor: torch.Tensor, copies: HostCopies) -> torch.Tensor:
    """``tensor`` over the host copy of its storage: same offset, shape, strides, class and attributes."""
    with torch.no_grad():
        twin = torch.empty(0, dtype=tensor.dtype).set_(copies.of(tensor.untyped_storage()), tensor.storage_offset(), tensor.size(), tensor.stride())
    if isinstance(tensor, torch.nn.Parameter):
        twin = torch.nn.Parameter(twin, requires_grad=tensor.requires_grad)
    else:
        twin.requires_grad_(tensor.requires_grad)
    if tensor.__dict__:  # a tensor's attributes are saved with it, and may hold tensors too
        twin.__dict__ = host_snapshot(tensor.__dict__, copies)
    return twin


class _Snapshotter(pickle.Pickler):
    """Pickles an object's structure the way ``torch.save`` walks it, each tensor replaced by a reference to its
    host twin. (Pickling is C; ``copy.deepcopy`` of DeepSpeed's state dicts and config was most of a snapshot.)"""

    def __init__(self, buffer: io.BytesIO, copies: HostCopies):
        super().__init__(buffer, protocol=pickle.HIGHEST_PROTOCOL)
        self.copies = copies
        self.twins: List[torch.Tensor] = []
        self._index: Dict[int, int] = {}
        """Twin index by ``id`` of the original, alive while ``dump`` runs: a tensor met twice has one twin."""

    def persistent_id(self, obj):
        if not isinstance(obj, torch.Tensor):
            return None
        index = self._index.get(id(obj))
        if index is None:
            index = self._index[id(obj)] = len(self.twins)
            self.twins.append(_twin(obj, self.copies))
        return index


class _Restorer(pickle.Unpickler):
    def __init__(self, data: bytes, twins: List[torch.Tensor]):
        super().__init__(io.BytesIO(data))
        self.twins = twins

    def persistent_load(self, index: int) -> torch.Tensor:
        return self.twins[index]


def host_snapshot(obj: Any, copies: Optional[HostCopies] = None) -> Any:
    """A copy of ``obj`` (new containers and objects, as pickling rebuilds them) whose tensors live in new host
    memory, every shared storage copied once (once for all the snapshots taken with ``copies``)."""
    copies = copies if copies is not None else HostCopies()
    buffer = io.BytesIO()
    snapshotter = _Snapshotter(buffer, copies)
    snapshotter.dump(obj)
    return _Restorer(buffer.getvalue(), snapshotter.twins).load()
