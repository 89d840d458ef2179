"""Ray Train's backend for raylm's workers: GPUs shared per node, no process group.

``ray_entry`` makes the process group itself, its store on the node's address (torch's rendezvous, which
Ray's torch backend uses, listens on every interface).

Not Ray's ``TorchConfig``: Ray Train's controller unpickles the backend config, and a class from
``ray.train.torch`` (or from a raylm module that imports torch) would make the controller, which trains
nothing, import torch and raylm's per-rank code at every launch (~3 CPU-seconds). This module imports
neither; what the workers need of Ray's torch set-up is kept: every worker on a node sees all of the
node's GPUs (LOCAL_RANK picks its own, NCCL reaches its neighbours'), and the train function runs on its
CUDA device (Ray's ``TorchConfigContextManager``, resolved on the driver).
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig


class _WorkersOnly(Backend):
    share_cuda_visible_devices = True


@dataclass
class WorkersOnlyConfig(BackendConfig):
    backend: str = "gloo"  # what ray_entry's process group uses; TorchTrainer reads it

    @property
    def backend_cls(self):
        return _WorkersOnly

    @property
    def train_func_context(self):
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager
