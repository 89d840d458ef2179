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

import copy
import pickle
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch


class _Discard:
    def write(self, data) -> int:
        return len(data)


class _TensorFinder(pickle.Pickler):
    """Walks an object the way ``torch.save``'s pickler does, keeping its tensors instead of serializing them."""

    def __init__(self):
        super().__init__(_Discard(), protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: List[torch.Tensor] = []

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            self.tensors.append(obj)
            return tuple, (), obj.__dict__ or None  # a tensor's attributes are saved with it, and may hold tensors too
        return NotImplemented


def tensors_in(obj: Any) -> List[torch.Tensor]:
    """Every tensor ``torch.save(obj)`` would write, wherever it sits (containers, attributes, custom objects)."""
    finder = _TensorFinder()
    finder.dump(obj)
    return finder.tensors


class HostCopies:
    """Host copies of storages, each made once for as long as its original lives; the originals must not change
    meanwhile (the snapshots of one checkpoint, taken while training waits)."""

    def __init__(self):
        self._copies: Dict[int, Tuple[weakref.ref, torch.UntypedStorage]] = {}

    def of(self, storage: torch.UntypedStorage) -> torch.UntypedStorage:
        key = storage._cdata  # what torch.save tells storages apart by
        known = self._copies.get(key)
        # torch keeps one Python object per live storage: a dead original's key may name a new storage, whose
        # object is another one.
        if known is not None and known[0]() is storage:
            return known[1]
        copied = storage.clone() if storage.device.type == "cpu" else storage.cpu()
        self._copies[key] = (weakref.ref(storage), copied)
        return copied


def host_snapshot(obj: Any, copies: Optional[HostCopies] = None) -> Any:
    """A deep copy of ``obj`` whose tensors live in new host memory, every shared storage copied once (once for
    all the snapshots taken with ``copies``)."""
    copies = copies if copies is not None else HostCopies()
    memo: Dict[int, Any] = {}
    tensors = tensors_in(obj)
    for tensor in tensors:
        if id(tensor) in memo:
            continue
        with torch.no_grad():
            twin = torch.empty(0, dtype=tensor.dtype).set_(copies.of(tensor.untyped_storage()), tensor.storage_offset(), tensor.size(), tensor.stride())
        if isinstance(tensor, torch.nn.Parameter):
            twin = torch.nn.Parameter(twin, requires_grad=tensor.requires_grad)
        else:
            twin.requires_grad_(tensor.requires_grad)
        memo[id(tensor)] = twin
    for tensor in tensors:
        if tensor.__dict__:
            memo[id(tensor)].__dict__ = copy.deepcopy(tensor.__dict__, memo)
    return copy.deepcopy(obj, memo)
