"""Megatron-style tensor-parallel layers over an explicitly passed process group.

A column-parallel linear holds rows ``[r*O/tp, (r+1)*O/tp)`` of the dense
weight (O, I) and produces that slice of the output features; a row-parallel
linear holds columns ``[r*I/tp, (r+1)*I/tp)`` and sums its partial products
over the group. Attention and the SwiGLU MLP are column then row, so each block
costs one all-reduce in the forward and one in the backward.

Every layer is built from a dense module (``from_dense``) by slicing its
weight, so a tensor-parallel model started from the dense init computes the
same function as the dense model.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _size(group: dist.ProcessGroup) -> int:
    return dist.get_world_size(group)


def _rank(group: dist.ProcessGroup) -> int:
    return dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Out-of-place all-reduce: the input may be saved by autograd or still in use."""
    out = x.clone()
    dist.all_reduce(out, op=op, group=group)
    return out


def _all_gather_last_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(..., n) on each rank -> (..., n * tp), the ranks' slices in rank order."""
    parts: List[torch.Tensor] = [torch.empty_like(x) for _ in range(_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _local_slice_last_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(..., n * tp) -> this rank's (..., n)."""
    return x.chunk(_size(group), dim=-1)[_rank(group)].contiguous()


class _CopyToTensorParallelRegion(torch.autograd.Function):
    """Identity forward; the backward sums the input gradient each rank computed from its shard."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    """Sum of the ranks' partial results; every rank's share has the full gradient."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTensorParallelRegion(torch.autograd.Function):
    """(..., n) per rank -> (..., n * tp); the backward keeps this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _local_slice_last_dim(grad, ctx.group), None


class _ScatterToTensorParallelRegion(torch.autograd.Function):
    """(..., n * tp) replicated -> this rank's (..., n); the backward gathers the slices' gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _local_slice_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last_dim(grad, ctx.group), None


def copy_to_tensor_parallel_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _CopyToTensorParallelRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _ReduceFromTensorParallelRegion.apply(x, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _GatherFromTensorParallelRegion.apply(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _ScatterToTensorParallelRegion.apply(x, group)


def shard_of(weight: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's equal slice of ``weight`` along ``dim`` (a copy, not a view)."""
    tp = _size(group)
    if weight.size(dim) % tp:
        raise ValueError(f"dimension {dim} of a {tuple(weight.shape)} weight does not split into {tp} equal shards")
    return weight.detach().chunk(tp, dim=dim)[_rank(group)].clone()


def _sharded_parameter(shard: torch.Tensor) -> nn.Parameter:
    param = nn.Parameter(shard)
    # DeepSpeed's gradient-norm code (clipping, ZeRO-1/2) sums norms over the
    # model-parallel group and counts a parameter on every tensor rank only if
    # ``deepspeed.utils.is_model_parallel_parameter`` sees this attribute;
    # otherwise it counts it once, as a replica. Nothing in raylm reads it.
    param.tensor_model_parallel = True
    return param


def _no_bias(dense: nn.Module) -> None:
    if getattr(dense, "bias", None) is not None:
        raise ValueError(f"tensor-parallel layers here carry no bias; got {dense}")


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by output features: x (..., I) -> y (..., O/tp), or (..., O) if gathered."""

    def __init__(self, weight: nn.Parameter, group: dist.ProcessGroup, gather_output: bool = False):
        super().__init__()
        self.weight = weight  # (O/tp, I)
        self.group = group
        self.gather_output = gather_output

    @classmethod
    def from_dense(cls, linear: nn.Linear, group: dist.ProcessGroup, gather_output: bool = False) -> "ColumnParallelLinear":
        _no_bias(linear)
        return cls(_sharded_parameter(shard_of(linear.weight, 0, group)), group, gather_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tensor_parallel_region(x, self.group)  # (..., I), gradient summed over ranks
        y = F.linear(x, self.weight)  # (..., O/tp)
        return gather_from_tensor_parallel_region(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        out_local, in_features = self.weight.shape
        return f"in_features={in_features}, out_features={out_local}x{_size(self.group)}, gather_output={self.gather_output}"


class RowParallelLinear(nn.Module):
    """y = x W^T with W split by input features: x (..., I/tp) [or (..., I)] -> y (..., O) summed over ranks."""

    def __init__(self, weight: nn.Parameter, group: dist.ProcessGroup, input_is_parallel: bool = True):
        super().__init__()
        self.weight = weight  # (O, I/tp)
        self.group = group
        self.input_is_parallel = input_is_parallel

    @classmethod
    def from_dense(cls, linear: nn.Linear, group: dist.ProcessGroup, input_is_parallel: bool = True) -> "RowParallelLinear":
        _no_bias(linear)
        return cls(_sharded_parameter(shard_of(linear.weight, 1, group)), group, input_is_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.group)  # (..., I) -> (..., I/tp)
        partial = F.linear(x, self.weight)  # (..., O), this rank's share of the sum
        return reduce_from_tensor_parallel_region(partial, self.group)

    def extra_repr(self) -> str:
        out_features, in_local = self.weight.shape
        return f"in_features={in_local}x{_size(self.group)}, out_features={out_features}, input_is_parallel={self.input_is_parallel}"


class VocabParallelEmbedding(nn.Module):
    """tokens (B, T) -> (B, T, D); rank r holds rows [r*V/tp, (r+1)*V/tp) of the table."""

    def __init__(self, weight: nn.Parameter, group: dist.ProcessGroup):
        super().__init__()
        self.weight = weight  # (V/tp, D)
        self.group = group

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, group: dist.ProcessGroup) -> "VocabParallelEmbedding":
        if embedding.padding_idx is not None or embedding.max_norm is not None:
            raise ValueError(f"vocab-parallel embedding supports neither padding_idx nor max_norm; got {embedding}")
        return cls(_sharded_parameter(shard_of(embedding.weight, 0, group)), group)

    @property
    def vocab_start(self) -> int:
        return _rank(self.group) * self.weight.size(0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        elsewhere = (local < 0) | (local >= self.weight.size(0))  # (B, T): rows another rank holds
        rows = F.embedding(local.masked_fill(elsewhere, 0), self.weight)  # (B, T, D)
        rows = rows.masked_fill(elsewhere.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(rows, self.group)  # exactly one rank contributes each row

    def extra_repr(self) -> str:
        vocab_local, dim = self.weight.shape
        return f"{vocab_local}x{_size(self.group)}, {dim}"


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss from logits split over the vocabulary, without gathering them.

    logsumexp over the full vocabulary is assembled from one MAX all-reduce (for
    stability) and one SUM all-reduce of the local sums of exp; the target's
    logit lives on exactly one rank and reaches the others by a SUM all-reduce.
    """

    @staticmethod
    def forward(ctx, local_logits, targets, group, ignore_index):
        # local_logits (N, V/tp) fp32, targets (N,) global vocabulary ids
        vocab_local = local_logits.size(-1)
        vocab_start = _rank(group) * vocab_local

        logits_max = _all_reduce(local_logits.max(dim=-1).values, group, op=dist.ReduceOp.MAX)  # (N,)
        shifted = local_logits - logits_max.unsqueeze(-1)  # (N, V/tp)

        local_targets = targets - vocab_start
        here = (local_targets >= 0) & (local_targets < vocab_local)  # (N,): target in this shard (never for ignore_index)
        local_targets = local_targets.masked_fill(~here, 0)
        target_logit = shifted.gather(-1, local_targets.unsqueeze(-1)).squeeze(-1) * here  # (N,)
        target_logit = _all_reduce(target_logit, group)

        exp = shifted.exp()  # (N, V/tp)
        sum_exp = _all_reduce(exp.sum(dim=-1), group)  # (N,)
        valid = targets != ignore_index
        loss = (sum_exp.log() - target_logit) * valid  # (N,)

        softmax = exp.div_(sum_exp.unsqueeze(-1))  # (N, V/tp), this rank's columns of the full softmax
        ctx.save_for_backward(softmax, local_targets, here, valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # d loss_i / d logit_ij = softmax_ij - [j == target_i], zero for ignored tokens
        softmax, local_targets, here, valid = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local_targets.unsqueeze(-1), -here.to(grad.dtype).unsqueeze(-1))
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor, targets: torch.Tensor, tp_group: dist.ProcessGroup, ignore_index: int = -100
) -> torch.Tensor:
    """Mean next-token loss over targets != ignore_index, from logits (B, T, V/tp) split over ``tp_group``.

    Equals ``F.cross_entropy`` of the gathered (B, T, V) logits, as does its
    gradient, while only (B, T)-sized tensors cross the group.
    """
    per_token = _VocabParallelCrossEntropy.apply(
        local_logits.float().flatten(0, -2), targets.flatten(), tp_group, ignore_index
    )  # (B*T,)
    return per_token.sum() / (targets != ignore_index).sum()
