"""The tensor-parallel plan of the Llama model, as data, and applying it to the plain model.

A plan maps submodule-name patterns (``*`` stands for one name component, e.g.
a layer index) to a style. Applying it replaces each matching dense module in
place by its tensor-parallel counterpart holding this rank's shard; the model
code never learns about parallelism. Attention reads its local head counts
from the projections' output sizes, so column-parallel q/k/v just work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from raylm.errors import UserError
from raylm.models.loss import cross_entropy_loss
from raylm.parallelism.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)


@dataclass(frozen=True)
class Style:
    """How one kind of module is sharded: its builder and the weight dimension it splits."""

    build: Callable[[nn.Module, dist.ProcessGroup], nn.Module]
    weight_split_dim: int


STYLES: Dict[str, Style] = {
    # q/k/v, SwiGLU gate and up: output features (heads, hidden units) split, output stays split
    "colwise": Style(ColumnParallelLinear.from_dense, 0),
    # attention out, SwiGLU down: input features split, outputs summed over the group
    "rowwise": Style(RowParallelLinear.from_dense, 1),
    # token embedding: vocabulary rows split
    "vocab_embedding": Style(VocabParallelEmbedding.from_dense, 0),
    # output head: vocabulary split, logits stay (B, T, V/tp) for the vocab-parallel loss
    "colwise_vocab": Style(ColumnParallelLinear.from_dense, 0),
}

LLAMA_TP_PLAN: Dict[str, str] = {
    "tok_embeddings": "vocab_embedding",
    "layers.*.attention.wq": "colwise",
    "layers.*.attention.wk": "colwise",
    "layers.*.attention.wv": "colwise",
    "layers.*.attention.wo": "rowwise",
    "layers.*.feed_forward.w1": "colwise",
    "layers.*.feed_forward.w3": "colwise",
    "layers.*.feed_forward.w2": "rowwise",
    "output": "colwise_vocab",
}
"""Submodule name pattern -> style (a key of ``STYLES``); unlisted modules (norms) stay replicated."""


def _pattern(name_pattern: str) -> "re.Pattern[str]":
    return re.compile(re.escape(name_pattern).replace(r"\*", r"[^.]+"))


def style_of(module_name: str, plan: Mapping[str, str] = LLAMA_TP_PLAN) -> Optional[str]:
    """The plan's style for a submodule name, or None if it stays replicated."""
    for name_pattern, style in plan.items():
        if _pattern(name_pattern).fullmatch(module_name):
            return style
    return None


def split_dim_of(tensor_name: str, plan: Mapping[str, str] = LLAMA_TP_PLAN) -> Optional[int]:
    """The dimension a state-dict entry is split along (``layers.0.attention.wq.weight`` -> 0), or None."""
    module_name, _, attr = tensor_name.rpartition(".")
    style = style_of(module_name, plan)
    return STYLES[style].weight_split_dim if style is not None and attr == "weight" else None


def check_tp_divides(model: nn.Module, tp: int) -> None:
    """Every dimension the Llama plan splits must split evenly; names the config key to change."""
    cfg = model.cfg
    kv_heads = cfg.n_kv_head or cfg.n_head
    if cfg.n_head % tp or kv_heads % tp:
        raise UserError(f"parallel.tp={tp} must divide model.n_head={cfg.n_head} and model.n_kv_head={kv_heads}; choose a tp that divides both")
    ffn_hidden = model.layers[0].feed_forward.w1.out_features
    if ffn_hidden % tp:
        raise UserError(f"parallel.tp={tp} must divide the SwiGLU width {ffn_hidden}; set model.ffn_hidden (or model.multiple_of) to a multiple of {tp}")
    if cfg.vocab_size % tp:
        raise UserError(f"parallel.tp={tp} must divide model.vocab_size={cfg.vocab_size}; round the vocabulary up to a multiple of {tp}")


def apply_tensor_parallel(model: nn.Module, tp_group: dist.ProcessGroup, plan: Mapping[str, str] = LLAMA_TP_PLAN) -> nn.Module:
    """Replace the plan's submodules of ``model`` by this rank's shards, in place; returns ``model``.

    A weight shared between planned modules (tied embedding and head) stays
    shared: the head's shard IS the embedding's shard parameter.
    """
    tp = dist.get_world_size(tp_group)
    if tp == 1:
        return model
    check_tp_divides(model, tp)
    sharded_by_dense_weight: Dict[int, nn.Parameter] = {}
    for name, dense in list(model.named_modules()):
        style = style_of(name, plan)
        if style is None:
            continue
        parallel = STYLES[style].build(dense, tp_group)
        shared = sharded_by_dense_weight.get(id(dense.weight))
        if shared is not None:
            if shared.shape != parallel.weight.shape:
                raise ValueError(f"{name} shares its weight with a module sharded differently ({tuple(shared.shape)} vs {tuple(parallel.weight.shape)})")
            parallel.weight = shared
        sharded_by_dense_weight[id(dense.weight)] = parallel.weight
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, parallel)
    return model


def tp_loss_fn(tp_group: dist.ProcessGroup) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss on vocab-split logits (B, T, V/tp), same signature and value as ``cross_entropy_loss``."""
    if dist.get_world_size(tp_group) == 1:
        return cross_entropy_loss

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, targets, tp_group)

    return loss
