"""Keep every tensor-parallel group on one node.

Ray Train numbers workers node by node (consecutive ranks share a node) and the
PACK strategy fills nodes before spilling; with the tensor-parallel rank the
fastest-moving coordinate, a TP group is then one node's consecutive ranks as
long as each node holds a multiple of tp workers. This check turns the rare
layout where that fails into a clear error before any step runs.
"""

from __future__ import annotations

from typing import List, Sequence

from raylm.errors import UserError


def tp_groups_split_across_nodes(node_of_rank: Sequence[str], tp_groups: List[List[int]]) -> List[List[int]]:
    """The tensor-parallel groups whose ranks are not all on one node."""
    return [group for group in tp_groups if len({node_of_rank[rank] for rank in group}) > 1]


def check_tp_placement(node_of_rank: Sequence[str], tp_groups: List[List[int]]) -> None:
    split = tp_groups_split_across_nodes(node_of_rank, tp_groups)
    if split:
        tp = len(tp_groups[0])
        raise UserError(
            f"tensor-parallel group(s) {split} span several nodes; give each node a multiple of parallel.tp={tp} workers "
            "(its CPUs or GPUs per cluster.cpus_per_worker) or lower parallel.tp"
        )
