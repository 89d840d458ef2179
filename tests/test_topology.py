"""The rank grid matches DeepSpeed's, errors name every degree, groups have the right members."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from gloo_spawn import run_on_gloo
from raylm.errors import UserError
from raylm.parallelism.topology import Mpu, Topology, build_groups, group_timeout_s

LAYOUTS = [(2, 2, 2), (1, 1, 4), (4, 1, 2), (2, 3, 1), (1, 2, 3), (3, 2, 2)]


@pytest.mark.parametrize("tp,pp,dp", LAYOUTS)
def test_rank_layout_is_deepspeeds(tp, pp, dp):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    ours = Topology.for_world(tp, pp, tp * pp * dp)
    theirs = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    assert (ours.tp, ours.pp, ours.dp) == (tp, pp, dp)
    for rank in range(ours.world_size):
        coord = theirs.get_coord(rank)
        assert ours.coords(rank) == (coord.pipe, coord.data, coord.model)
        assert ours.rank_of(*ours.coords(rank)) == rank
    assert sorted(ours.all_tp_groups()) == sorted(theirs.get_axis_comm_lists("model") or [[r] for r in range(ours.world_size)])
    assert sorted(ours.all_dp_groups()) == sorted(theirs.get_axis_comm_lists("data") or [[r] for r in range(ours.world_size)])
    assert sorted(ours.all_pp_groups()) == sorted(theirs.get_axis_comm_lists("pipe") or [[r] for r in range(ours.world_size)])


def test_tensor_groups_are_consecutive_ranks():
    topology = Topology.for_world(4, 2, 16)
    assert topology.all_tp_groups()[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert topology.ranks_of_mp_group(dp_rank=1) == [4, 5, 6, 7, 12, 13, 14, 15]


@pytest.mark.parametrize(
    "tp,pp,world,expected",
    [
        (4, 1, 6, ["world size 6", "tp=4", "pp=1", "cluster.num_workers", "multiple of 4"]),
        (2, 3, 8, ["world size 8", "tp=2", "pp=3", "cluster.num_workers", "multiple of 6"]),
        (0, 2, 8, ["parallel.tp=0", "parallel.pp=2"]),
    ],
)
def test_errors_name_every_degree(tp, pp, world, expected):
    with pytest.raises(UserError) as err:
        Topology.for_world(tp, pp, world)
    message = str(err.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def _check_groups(rank: int, world_size: int) -> None:
    topology = Topology.for_world(2, 2, world_size)
    groups = build_groups(topology, rank, timedelta(seconds=77))
    pp_rank, dp_rank, tp_rank = topology.coords(rank)
    assert (groups.pp_rank, groups.dp_rank, groups.tp_rank) == (pp_rank, dp_rank, tp_rank)
    assert groups.tp_ranks == [r for r in range(8) if r // 2 == rank // 2]
    assert groups.dp_ranks == [r for r in range(8) if r // 4 == rank // 4 and r % 2 == rank % 2]
    assert groups.pp_ranks == [r for r in range(8) if r % 4 == rank % 4]
    assert groups.mp_ranks == [r for r in range(8) if (r // 2) % 2 == (rank // 2) % 2]
    # The groups really connect those ranks: a sum over each is the sum of its members.
    for group, members in [(groups.tp_group, groups.tp_ranks), (groups.dp_group, groups.dp_ranks),
                           (groups.pp_group, groups.pp_ranks), (groups.mp_group, groups.mp_ranks)]:
        total = torch.tensor([float(rank)])
        dist.all_reduce(total, group=group)
        assert total.item() == sum(members)
        # A collective waits as long as in the default group (fault.hang_timeout_s), not torch's 30-minute default.
        assert group_timeout_s(group, torch.device("cpu")) == 77

    mpu = Mpu(groups)
    assert (mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()) == (2, tp_rank)
    assert mpu.get_tensor_model_parallel_src_rank() == rank - tp_rank
    assert (mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()) == (2, dp_rank)
    assert mpu.get_data_parallel_group_ranks() == groups.dp_ranks
    assert (mpu.get_pipeline_model_parallel_world_size(), mpu.get_pipe_parallel_rank()) == (2, pp_rank)
    assert (mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank()) == (4, groups.mp_ranks.index(rank))
    assert dist.get_world_size(mpu.get_model_parallel_group()) == 4


@pytest.mark.slow
def test_groups_built_on_eight_ranks_have_the_right_members():
    run_on_gloo(_check_groups, 8)
