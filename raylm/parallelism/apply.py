"""Turn the plain model into this rank's part of the tp x pp x dp layout.

The training loop only sees a ``ParallelModel``: the module DeepSpeed wraps,
the loss to use on its outputs, the data-parallel coordinates and how to get
the full weights back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from raylm.configs.schema import RunConfig
from raylm.models.loss import cross_entropy_loss
from raylm.parallelism.plan import apply_tensor_parallel, tp_loss_fn
from raylm.parallelism.reshard import gather_full_state_dict
from raylm.parallelism.topology import Mpu, ParallelGroups, Topology, build_groups


@dataclass
class ParallelModel:
    module: nn.Module
    topology: Topology
    groups: ParallelGroups
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    mpu: Optional[Any]

    @property
    def tp(self) -> int:
        return self.topology.tp

    @property
    def pp(self) -> int:
        return self.topology.pp

    @property
    def dp_size(self) -> int:
        return self.topology.dp

    @property
    def dp_rank(self) -> int:
        return self.topology.coords(dist.get_rank())[1]

    @property
    def dp_group(self):
        return self.groups.dp_group

    def consolidated_state_dict(self, engine) -> Dict[str, torch.Tensor]:
        """Full dense weights (raylm names) on every rank; a collective call."""
        if engine.zero_optimization_stage() == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                return self._gather_tp()
        return self._gather_tp()

    def _gather_tp(self) -> Dict[str, torch.Tensor]:
        if self.tp == 1:
            return {k: v.detach().clone().cpu() for k, v in self.module.state_dict().items()}
        return {k: v.cpu() for k, v in gather_full_state_dict(self.module, self.groups).items()}


def build_parallel_model(dense: nn.Module, run: RunConfig, rank: int, world_size: int) -> ParallelModel:
    """Shard ``dense`` (identical on every rank) for this rank."""
    topology = Topology.for_world(run.parallel.tp, run.parallel.pp, world_size)
    groups = build_groups(topology, rank)
    if topology.tp == 1 and topology.pp == 1:
        return ParallelModel(dense, topology, groups, cross_entropy_loss, None)
    module = apply_tensor_parallel(dense, groups.tp_group) if topology.tp > 1 else dense
    loss_fn = tp_loss_fn(groups.tp_group) if topology.tp > 1 else cross_entropy_loss
    return ParallelModel(module, topology, groups, loss_fn, Mpu(groups))
