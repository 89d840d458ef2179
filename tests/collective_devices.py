"""See every tensor a collective is handed; fail any off the process group's device.

NCCL refuses CPU tensors, so on GPUs every collective's tensors must live on
the rank's device; gloo takes anything, so a CPU test would never notice. In
a test process, ``watching(see)`` wraps every torch.distributed collective
(the public names, which DeepSpeed calls too, and the same names inside
``distributed_c10d``, which object collectives use) and shows ``see`` each
tensor first; ``tensors_on(device)`` raises on a tensor anywhere else, naming
the collective, its group and the device. On CPU that check has teeth
wherever a weight was released to ``meta``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_coalesced",
    "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "reduce", "all_to_all",
    "all_to_all_single", "gather", "scatter", "send", "recv", "isend", "irecv",
)


class OffDeviceTensor(AssertionError):
    pass


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _watched(name: str, collective, see: Callable[[str, torch.Tensor, Optional[dist.ProcessGroup]], None]):
    @functools.wraps(collective)
    def call(*args, **kwargs):
        for tensor in _tensors([*args, *kwargs.values()]):
            see(name, tensor, kwargs.get("group"))
        return collective(*args, **kwargs)

    return call


@contextlib.contextmanager
def watching(see: Callable[[str, torch.Tensor, Optional[dist.ProcessGroup]], None]):
    """Within the block, every collective first calls ``see(name, tensor, group)`` on each tensor it is handed
    (``group`` None: the default group). DeepSpeed keeps references to some collectives from its
    ``init_distributed`` on: enter the block before it runs, or those calls go unseen."""
    originals = []
    for module in (dist, c10d):
        for name in COLLECTIVES:
            if hasattr(module, name):
                originals.append((module, name, getattr(module, name)))
                setattr(module, name, _watched(name, getattr(module, name), see))
    try:
        yield
    finally:
        for module, name, collective in originals:
            setattr(module, name, collective)


def tensors_on(device: torch.device):
    """Within the block, every collective's tensors must be on ``device``."""

    def check(name: str, tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> None:
        if tensor.device != device:
            ranks = dist.get_process_group_ranks(group) if group is not None else "default"
            raise OffDeviceTensor(f"{name} over group {ranks} got a {tuple(tensor.shape)} tensor on {tensor.device}; "
                                  f"the group's device is {device}")

    return watching(check)
