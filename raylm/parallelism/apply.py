"""Turn the plain model, laid out on ``meta``, into this rank's part of the tp x pp x dp layout.

Nothing but this rank's own weights is ever made (``raylm.parallelism.materialize``).

The training loop only sees a ``ParallelModel``: the module DeepSpeed wraps,
the loss to use on its outputs and the data-parallel coordinates
(``raylm.parallelism.masters`` gets the full dense weights back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Set

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from raylm.configs.schema import RunConfig
from raylm.models.loss import cross_entropy_loss
from raylm.parallelism.materialize import WeightSource, materialize
from raylm.parallelism.pipeline import build_pipeline, planned_stage_names, stage_names
from raylm.parallelism.plan import apply_tensor_parallel, tp_loss_fn
from raylm.parallelism.topology import Mpu, ParallelGroups, Topology, build_groups


@dataclass
class ParallelModel:
    module: nn.Module
    """What DeepSpeed wraps: the (TP-sharded) model, or this rank's PipelineModule."""
    topology: Topology
    groups: ParallelGroups
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    mpu: Optional[Any]
    """DeepSpeed's model-parallel unit; None where DeepSpeed builds its own (pp > 1) or none is needed."""
    dense: Optional[nn.Module] = None
    """The (TP-sharded) dense model whose submodules the pipeline stage wraps; other stages' weights stay on ``meta``."""
    stage_names: Optional[Set[str]] = None
    """Dense names of the weights this pipeline stage trains."""

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
        return self.groups.dp_rank

    @property
    def dp_group(self):
        return self.groups.dp_group


def _checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations in backward (state-dict names are kept)."""
    for index, block in enumerate(model.layers):
        model.layers[index] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def build_parallel_model(model: nn.Module, run: RunConfig, rank: int, world_size: int, weights: WeightSource) -> ParallelModel:
    """This rank's part of ``model`` (laid out on ``meta``), its weights given their values from ``weights``; a collective call."""
    topology = Topology.for_world(run.parallel.tp, run.parallel.pp, world_size)
    groups = build_groups(topology, rank, run.fault.collective_timeout())
    module = apply_tensor_parallel(model, groups.tp_group) if topology.tp > 1 else model
    loss_fn = tp_loss_fn(groups.tp_group) if topology.tp > 1 else cross_entropy_loss
    if topology.pp > 1:
        names = planned_stage_names(module, run.model.tie_embeddings, topology.pp, groups.pp_rank)
        materialize(module, names, weights, groups.tp_rank, topology.tp)
        pipe = build_pipeline(module, topology, loss_fn, run.model.tie_embeddings, run.parallel.activation_checkpointing)
        if stage_names(module, pipe) != names:
            raise RuntimeError(f"pipeline stage {groups.pp_rank} holds {sorted(stage_names(module, pipe) ^ names)} other than planned")
        return ParallelModel(pipe, topology, groups, loss_fn, None, module, names)
    materialize(module, {name for name, _ in module.named_parameters()}, weights, groups.tp_rank, topology.tp)
    if run.parallel.activation_checkpointing:
        _checkpoint_blocks(module)
    return ParallelModel(module, topology, groups, loss_fn, Mpu(groups) if topology.tp > 1 else None)
