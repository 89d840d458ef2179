"""Between the dense layout and tensor-parallel shards, driven by the plan's split dimensions.

State dicts keep the dense raylm names on every rank; only the values differ:
a split entry holds this rank's equal slice along the plan's dimension, every
other entry (norms, buffers) is the full tensor.
"""

from __future__ import annotations

from typing import Dict, List, Mapping

import torch
import torch.distributed as dist

from raylm.parallelism.plan import LLAMA_TP_PLAN, split_dim_of

StateDict = Dict[str, torch.Tensor]


def tp_shard_of(dense: torch.Tensor, dense_name: str, tp_rank: int, tp: int, plan: Mapping[str, str] = LLAMA_TP_PLAN) -> torch.Tensor:
    """Tensor rank ``tp_rank``'s slice of one dense entry (a copy, not a view); the entry itself where the plan does not split it or tp is 1."""
    dim = split_dim_of(dense_name, plan)
    if dim is None or tp == 1:
        return dense
    if dense.size(dim) % tp:
        raise ValueError(f"{dense_name} of shape {tuple(dense.shape)} does not split into {tp} equal shards along dimension {dim}")
    return dense.chunk(tp, dim=dim)[tp_rank].clone()


def shard_state_dict(full_sd: Mapping[str, torch.Tensor], tp_rank: int, tp: int, plan: Mapping[str, str] = LLAMA_TP_PLAN) -> StateDict:
    """Tensor rank ``tp_rank``'s shard of a dense state dict (split entries are copies, not views)."""
    return {name: tp_shard_of(tensor, name, tp_rank, tp, plan) for name, tensor in full_sd.items()}


def unshard_state_dicts(per_tp_rank_sds: List[Mapping[str, torch.Tensor]], tp: int, plan: Mapping[str, str] = LLAMA_TP_PLAN) -> StateDict:
    """The dense state dict from every tensor rank's shard (listed in tensor-rank order)."""
    if len(per_tp_rank_sds) != tp:
        raise ValueError(f"expected the state dicts of {tp} tensor ranks, got {len(per_tp_rank_sds)}")
    full: StateDict = {}
    for name, first in per_tp_rank_sds[0].items():
        dim = split_dim_of(name, plan)
        full[name] = first if dim is None else torch.cat([sd[name] for sd in per_tp_rank_sds], dim=dim)
    return full


def gather_tp_tensor(tensor: torch.Tensor, dense_name: str, tp_group, plan: Mapping[str, str] = LLAMA_TP_PLAN) -> torch.Tensor:
    """The dense tensor from this tp group's shards of ``dense_name``; a collective over ``tp_group``.

    Entries the plan does not split are the same on every tensor rank and come back as they are.
    """
    tp = dist.get_world_size(tp_group)
    dim = split_dim_of(dense_name, plan)
    if dim is None or tp == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(tp)]
    dist.all_gather(parts, tensor.contiguous(), group=tp_group)
    return torch.cat(parts, dim=dim)
