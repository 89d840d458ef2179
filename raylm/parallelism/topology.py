"""The tp x pp x dp grid of ranks, its process groups, and the ``mpu`` DeepSpeed expects.

The rank layout is DeepSpeed's ``PipeModelDataParallelTopology(num_pp, num_mp,
num_dp)``: axes (pipe, data, model) with the tensor rank varying fastest, then
the data rank, then the pipeline stage::

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

so a tensor-parallel group is ``tp`` consecutive ranks, which the Ray placement
keeps on one node, and DeepSpeed's pipeline grid agrees with ours rank for rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from raylm.errors import UserError

Coords = Tuple[int, int, int]
"""(pp_rank, dp_rank, tp_rank) of one rank."""


@dataclass(frozen=True)
class Topology:
    """The degrees of the three kinds of parallelism; ``tp * pp * dp`` is the world size."""

    tp: int
    pp: int
    dp: int

    @classmethod
    def for_world(cls, tp: int, pp: int, world_size: int) -> "Topology":
        """The layout with data parallelism filling what tp x pp leaves of ``world_size``."""
        if tp < 1 or pp < 1:
            raise UserError(f"parallel.tp={tp} and parallel.pp={pp} must both be >= 1")
        model_parallel = tp * pp
        if world_size % model_parallel:
            raise UserError(
                f"world size {world_size} is not divisible by tp={tp} x pp={pp}; "
                f"choose cluster.num_workers as a multiple of {model_parallel}"
            )
        return cls(tp=tp, pp=pp, dp=world_size // model_parallel)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> Coords:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        pp_rank, rest = divmod(rank, self.dp * self.tp)
        dp_rank, tp_rank = divmod(rest, self.tp)
        return pp_rank, dp_rank, tp_rank

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def ranks_of_tp_group(self, pp_rank: int, dp_rank: int) -> List[int]:
        """Ranks holding the shards of one pipeline stage of one data-parallel replica."""
        return [self.rank_of(pp_rank, dp_rank, t) for t in range(self.tp)]

    def ranks_of_dp_group(self, pp_rank: int, tp_rank: int) -> List[int]:
        """Ranks holding the same shard of the same stage (gradients are averaged over them)."""
        return [self.rank_of(pp_rank, d, tp_rank) for d in range(self.dp)]

    def ranks_of_pp_group(self, dp_rank: int, tp_rank: int) -> List[int]:
        """The stages of one pipeline, in stage order."""
        return [self.rank_of(p, dp_rank, tp_rank) for p in range(self.pp)]

    def ranks_of_mp_group(self, dp_rank: int) -> List[int]:
        """Every tp x pp rank of one data-parallel replica: one whole copy of the model."""
        return [self.rank_of(p, dp_rank, t) for p in range(self.pp) for t in range(self.tp)]

    def all_tp_groups(self) -> List[List[int]]:
        return [self.ranks_of_tp_group(p, d) for p in range(self.pp) for d in range(self.dp)]

    def all_dp_groups(self) -> List[List[int]]:
        return [self.ranks_of_dp_group(p, t) for p in range(self.pp) for t in range(self.tp)]

    def all_pp_groups(self) -> List[List[int]]:
        return [self.ranks_of_pp_group(d, t) for d in range(self.dp) for t in range(self.tp)]

    def all_mp_groups(self) -> List[List[int]]:
        return [self.ranks_of_mp_group(d) for d in range(self.dp)]


@dataclass
class ParallelGroups:
    """This rank's process groups and the ranks in each (the ranks are global ranks)."""

    topology: Topology
    rank: int
    tp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    mp_group: dist.ProcessGroup
    tp_ranks: List[int]
    dp_ranks: List[int]
    pp_ranks: List[int]
    mp_ranks: List[int]

    @property
    def pp_rank(self) -> int:
        return self.topology.coords(self.rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.topology.coords(self.rank)[1]

    @property
    def tp_rank(self) -> int:
        return self.topology.coords(self.rank)[2]

    @property
    def mp_rank(self) -> int:
        return self.mp_ranks.index(self.rank)

    def groups(self) -> List[dist.ProcessGroup]:
        return [self.tp_group, self.dp_group, self.pp_group, self.mp_group]


def _new_groups(all_groups: List[List[int]], rank: int, timeout: timedelta, backend: Optional[str] = None) -> Tuple[dist.ProcessGroup, List[int]]:
    """Create every group of one axis (each rank must create all of them, in the same order); keep ours."""
    mine = None
    for ranks in all_groups:
        group = dist.new_group(ranks=ranks, timeout=timeout, backend=backend)
        if rank in ranks:
            mine = (group, ranks)
    assert mine is not None, f"rank {rank} is in none of {all_groups}"
    return mine


def build_groups(topology: Topology, rank: int, timeout: timedelta) -> ParallelGroups:
    """Create the tp, dp, pp and mp groups; a collective call on every rank of the default group.

    ``timeout`` is the default group's: torch gives a new group its own
    default (30 minutes), not its parent's.
    """
    if dist.get_world_size() != topology.world_size:
        raise ValueError(f"the process group has {dist.get_world_size()} ranks, the topology {topology} needs {topology.world_size}")
    tp_group, tp_ranks = _new_groups(topology.all_tp_groups(), rank, timeout)
    dp_group, dp_ranks = _new_groups(topology.all_dp_groups(), rank, timeout)
    pp_group, pp_ranks = _new_groups(topology.all_pp_groups(), rank, timeout)
    mp_group, mp_ranks = _new_groups(topology.all_mp_groups(), rank, timeout)
    return ParallelGroups(topology, rank, tp_group, dp_group, pp_group, mp_group, tp_ranks, dp_ranks, pp_ranks, mp_ranks)


@dataclass
class CheckpointGroups:
    """Gloo twins of the world and of this rank's data- and tensor-parallel groups, for an asynchronous checkpoint's
    writer thread: its collectives (the layout-free copy's gathers over host memory, the commit) never share a
    group with the training thread's, which may run at the same time."""

    world_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    tp_group: dist.ProcessGroup
    dp_ranks: List[int]


def build_checkpoint_groups(topology: Topology, rank: int, timeout: timedelta) -> CheckpointGroups:
    """Create the gloo twins of the world, dp and tp groups; a collective call on every rank of the default group."""
    world_group = dist.new_group(timeout=timeout, backend="gloo")
    tp_group, _ = _new_groups(topology.all_tp_groups(), rank, timeout, backend="gloo")
    dp_group, dp_ranks = _new_groups(topology.all_dp_groups(), rank, timeout, backend="gloo")
    return CheckpointGroups(world_group, dp_group, tp_group, dp_ranks)


def group_timeout_s(group: dist.ProcessGroup, device: torch.device) -> float:
    """How long a collective of ``group`` on ``device`` may wait, read back from its backend (torch has no public getter)."""
    return group._get_backend(device).options._timeout.total_seconds()


class Mpu:
    """The model-parallel unit ``deepspeed.initialize(mpu=...)`` queries, over our groups.

    DeepSpeed's meanings (mirrored from its own ``PipelineParallelGrid``):
    "model parallel" is every tp x pp rank of one replica; ZeRO-1/2 sums
    gradient norms over it and counts a replicated parameter only where the
    *tensor* rank is 0. "Data parallel" is where ZeRO shards and gradients are
    averaged. Nothing here answers sequence-parallel queries, so DeepSpeed
    keeps its sequence-parallel size at 1. The pipeline engine refuses an
    ``mpu`` and builds its own grid from the same layout.
    """

    def __init__(self, groups: ParallelGroups):
        self.groups = groups

    def get_model_parallel_rank(self) -> int:
        return self.groups.mp_rank

    def get_model_parallel_world_size(self) -> int:
        return len(self.groups.mp_ranks)

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.groups.mp_group

    def get_data_parallel_rank(self) -> int:
        return self.groups.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return len(self.groups.dp_ranks)

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.groups.dp_group

    def get_data_parallel_group_ranks(self) -> List[int]:
        return list(self.groups.dp_ranks)

    def get_tensor_model_parallel_rank(self) -> int:
        return self.groups.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return len(self.groups.tp_ranks)

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self.groups.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of tensor rank 0 in this rank's tp group."""
        return self.groups.tp_ranks[0]

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.groups.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return len(self.groups.pp_ranks)

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return self.groups.pp_group

    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group
