"""The plain model as a DeepSpeed ``PipelineModule``: embedding, blocks, norm + head.

The pipeline layers wrap the dense model's own submodules (already
tensor-parallel where tp > 1), so a pipelined model starts from exactly the
weights of the single-device one and every parameter keeps its dense name.
The model is laid out on ``meta``: a stage's weights get values
(``raylm.parallelism.materialize``) before ``build_pipeline``, other stages'
stay on ``meta``, so any code that would touch them (say, hand them to a
collective) fails instead of reading stale values.
"""

from __future__ import annotations

from typing import Callable, List, Set

import torch
from torch import nn

from raylm.parallelism.topology import Topology


class EmbeddingPipe(nn.Module):
    """tokens (B, T) -> hidden (B, T, D)."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens)


class BlockPipe(nn.Module):
    """hidden (B, T, D) -> hidden (B, T, D); carries its own RoPE tables."""

    def __init__(self, block: nn.Module, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        self.block = block
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        seq_len = hidden.size(1)
        return self.block(hidden, self.cos[:seq_len], self.sin[:seq_len])


class NormPipe(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)


class HeadPipe(nn.Module):
    """hidden (B, T, D) -> logits (B, T, V or V/tp)."""

    def __init__(self, output: nn.Module):
        super().__init__()
        self.output = output

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(hidden)


class TiedEmbeddingHead(nn.Module):
    """The embedding and the head that shares its weight, for ``TiedLayerSpec``: called, it embeds,
    tokens (B, T) -> hidden (B, T, D); the head runs it through ``_head``."""

    def __init__(self, embedding: nn.Module, output: nn.Module):
        super().__init__()
        self.embedding = embedding
        self.output = output

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens)


def _head(module: TiedEmbeddingHead, hidden: torch.Tensor) -> torch.Tensor:
    return module.output(hidden)


def pipeline_specs(model: nn.Module, tied: bool) -> List:
    """Layer specs of the model: [embedding, block_0 .. block_{L-1}, norm, head]."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    cos, sin = model.rope(0, model.cfg.max_seq_len)
    blocks = [LayerSpec(BlockPipe, block, cos, sin) for block in model.layers]
    if tied:
        # DeepSpeed's checkpoint holds a tied module only where it runs as a module (no forward_fn): a function
        # is not saved. So the first stage saves the embedding (layer 0, its own forward), and after loading,
        # the last stage's copy comes from it (DeepSpeed broadcasts the tied weight from the first stage).
        return [
            TiedLayerSpec("embed", TiedEmbeddingHead, model.tok_embeddings, model.output, tied_weight_attr="embedding.weight"),
            *blocks,
            LayerSpec(NormPipe, model.norm),
            TiedLayerSpec("embed", TiedEmbeddingHead, model.tok_embeddings, model.output, forward_fn=_head, tied_weight_attr="embedding.weight"),
        ]
    return [LayerSpec(EmbeddingPipe, model.tok_embeddings), *blocks, LayerSpec(NormPipe, model.norm), LayerSpec(HeadPipe, model.output)]


def build_pipeline(
    model: nn.Module,
    topology: Topology,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tied: bool,
    activation_checkpointing: bool,
):
    """A ``PipelineModule`` holding this rank's stage of ``model``."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipelineModule(
        layers=pipeline_specs(model, tied),
        topology=PipeModelDataParallelTopology(num_pp=topology.pp, num_mp=topology.tp, num_dp=topology.dp),
        loss_fn=loss_fn,
        partition_method="parameters",
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        # Only blocks recompute, as on the pp=1 path. DeepSpeed's checkpoint is
        # reentrant: wrapped around the embedding, whose input is integer tokens,
        # its output would not require grad and cut the embedding off from autograd.
        checkpointable_layers=[BlockPipe.__name__],
    )


def _names_held(dense: nn.Module, modules: List[nn.Module]) -> Set[str]:
    held = {id(p) for module in modules for p in module.parameters()}
    return {name for name, tensor in dense.state_dict(keep_vars=True).items() if id(tensor) in held}


def planned_stage_names(model: nn.Module, tied: bool, pp: int, stage: int) -> Set[str]:
    """Dense names of the weights pipeline stage ``stage`` will hold, before anything is built.

    The same split as ``build_pipeline``'s ``partition_method="parameters"``: DeepSpeed's
    ``partition_balanced`` over each layer's trainable parameter count (its ``_count_layer_params``).
    The layers only wrap ``model``'s submodules, so this works on ``meta`` and costs nothing.
    """
    from deepspeed.runtime.utils import partition_balanced

    layers = [spec.build() for spec in pipeline_specs(model, tied)]
    counts = [sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in layers]
    parts = partition_balanced(weights=counts, num_parts=pp)
    return _names_held(model, layers[parts[stage] : parts[stage + 1]])


def stage_names(dense: nn.Module, stage: nn.Module) -> Set[str]:
    """Dense state-dict names of the weights held by this pipeline stage (tied names included)."""
    return _names_held(dense, [stage])
