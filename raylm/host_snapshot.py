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
from dataclasses import dataclass
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


@dataclass
class _TensorCopy:
    """What a tensor's twin is made of: the host copy of its storage and how the tensor sits in it."""

    storage: torch.UntypedStorage
    dtype: torch.dtype
    offset: int
    size: torch.Size
    stride: Tuple[int, ...]
    parameter: bool
    requires_grad: bool
    attributes: Optional["HostSnapshot"]
    """A snapshot of the tensor's ``__dict__`` (saved with it, and it may hold tensors too), if it has one."""

    @classmethod
    def of(cls, tensor: torch.Tensor, copies: HostCopies) -> "_TensorCopy":
        return cls(copies.of(tensor.untyped_storage()), tensor.dtype, tensor.storage_offset(), tensor.size(), tensor.stride(),
                   isinstance(tensor, torch.nn.Parameter), tensor.requires_grad,
                   take_snapshot(tensor.__dict__, copies) if tensor.__dict__ else None)

    def twin(self) -> torch.Tensor:
        """The tensor over the host copy: same offset, shape, strides, class and attributes."""
        with torch.no_grad():
            twin = torch.empty(0, dtype=self.dtype).set_(self.storage, self.offset, self.size, self.stride)
        if self.parameter:
            twin = torch.nn.Parameter(twin, requires_grad=self.requires_grad)
        else:
            twin.requires_grad_(self.requires_grad)
        if self.attributes is not None:
            twin.__dict__ = self.attributes.restore()
        return twin


def _twin_at(index: int) -> torch.Tensor:
    """What a snapshot's pickle calls for its ``index``-th tensor; ``_Restorer`` gives it the twin instead (pickle
    names a function by module and name, so this one stands for the restorer's lookup)."""
    raise RuntimeError("a snapshot's tensors are restored by HostSnapshot.restore")


class _Snapshotter(pickle.Pickler):
    """Pickles an object's structure the way ``torch.save`` walks it, each tensor replaced by a call for its twin
    over the host copy of its storage. (Pickling is C; ``copy.deepcopy`` of DeepSpeed's state dicts and config was
    most of a snapshot. ``reducer_override`` is called only for objects of non-builtin types, where
    ``persistent_id`` would be called for every int and string: 6x slower on a state like DeepSpeed's.)"""

    def __init__(self, buffer: io.BytesIO, copies: HostCopies):
        super().__init__(buffer, protocol=pickle.HIGHEST_PROTOCOL)
        self.copies = copies
        self.tensors: List[_TensorCopy] = []

    def reducer_override(self, obj):
        # A tensor met twice is pickled once: the second time pickle's memo refers back to the first.
        if not isinstance(obj, torch.Tensor):
            return NotImplemented
        self.tensors.append(_TensorCopy.of(obj, self.copies))
        return _twin_at, (len(self.tensors) - 1,)


class _Restorer(pickle.Unpickler):
    def __init__(self, data: bytes, twins: List[torch.Tensor]):
        super().__init__(io.BytesIO(data))
        self.twins = twins

    def find_class(self, module: str, name: str):
        if (module, name) == (_twin_at.__module__, _twin_at.__name__):
            return self.twins.__getitem__
        return super().find_class(module, name)


@dataclass
class HostSnapshot:
    """An object's structure (pickled) and the host copies of its tensors' storages: all a copy of it needs, and
    all that must be taken while the original does not change. Building the copy (``restore``: a tensor per
    original, ~0.1 ms each) can wait, and be done on another thread."""

    pickled: bytes
    tensors: List[_TensorCopy]

    def restore(self) -> Any:
        """A copy of the object (new containers and objects, as unpickling rebuilds them) whose tensors live in the
        host copies, tensors that shared a storage sharing its copy. Each call makes a new copy over the same
        host memory."""
        return _Restorer(self.pickled, [tensor.twin() for tensor in self.tensors]).load()


def take_snapshot(obj: Any, copies: Optional[HostCopies] = None) -> HostSnapshot:
    """A snapshot of ``obj`` whose tensors are copied to new host memory, every shared storage once (once for all
    the snapshots taken with ``copies``)."""
    buffer = io.BytesIO()
    snapshotter = _Snapshotter(buffer, copies if copies is not None else HostCopies())
    snapshotter.dump(obj)
    return HostSnapshot(buffer.getvalue(), snapshotter.tensors)
