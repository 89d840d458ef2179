"""A copy of an object's state in host memory, taken in one go so that it can be written out later while the
original keeps changing (an asynchronous checkpoint snapshots on the training thread and writes in the background).

Tensors that share a storage (ZeRO's weights are views of one flat buffer) share its copy, so ``torch.save`` of
the snapshot writes the archive it would have written of the original, byte for byte (on a GPU, but for the
storages' recorded device: DeepSpeed and raylm load checkpoints with ``map_location="cpu"`` anyway).
"""

from __future__ import annotations

import copy
import pickle
from typing import Any, Dict, List

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


def host_snapshot(obj: Any) -> Any:
    """A deep copy of ``obj`` whose tensors live in new host memory, every shared storage copied once."""
    storages: Dict[int, torch.UntypedStorage] = {}
    memo: Dict[int, Any] = {}
    tensors = tensors_in(obj)
    for tensor in tensors:
        if id(tensor) in memo:
            continue
        storage = tensor.untyped_storage()
        key = storage._cdata  # what torch.save tells storages apart by
        if key not in storages:
            storages[key] = storage.clone() if storage.device.type == "cpu" else storage.cpu()
        with torch.no_grad():
            twin = torch.empty(0, dtype=tensor.dtype).set_(storages[key], tensor.storage_offset(), tensor.size(), tensor.stride())
        if isinstance(tensor, torch.nn.Parameter):
            twin = torch.nn.Parameter(twin, requires_grad=tensor.requires_grad)
        else:
            twin.requires_grad_(tensor.requires_grad)
        memo[id(tensor)] = twin
    for tensor in tensors:
        if tensor.__dict__:
            memo[id(tensor)].__dict__ = copy.deepcopy(tensor.__dict__, memo)
    return copy.deepcopy(obj, memo)
