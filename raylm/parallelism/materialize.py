"""Each rank makes only its own weights, never the whole model.

The model is laid out on ``meta`` (shapes, no storage), sharded over the tensor group and cut into
pipeline stages there; then ``materialize`` gives every weight this rank holds its values, its
tensor-parallel slice only. A rank's host memory peaks at its own weights plus one full tensor
(a fresh init) or plus nothing (stored weights, of which only the slice is read).

Where values come from (``WeightSource``):

- ``fresh_weights``: the seeded initialisation; each weight has its own generator
  (``raylm.models.llama.init_weight_``), so a rank draws the full tensor of one weight at a time and
  keeps its slice, and every layout starts from the values the plain ``Llama(cfg, seed)`` has (drawing
  only the slice would need a generator per slice, and values that change with tp);
- ``stored_weights``: safetensors (a raylm final/, a Hugging Face directory, a layout-free
  checkpoint's ``param/`` entries), read through ``raylm.models.weights.read_part``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Set

import torch
from torch import nn

from raylm.configs.schema import ModelConfig
from raylm.models.llama import Llama, init_weight_
from raylm.models.weights import Location, read_part
from raylm.parallelism.plan import split_dim_of
from raylm.parallelism.reshard import tp_shard_of

WeightSource = Callable[[str, int, int], torch.Tensor]
"""(dense name, tensor rank, tensor-parallel size) -> that rank's part of the weight (the whole weight if the plan does not split it)."""


def fresh_weights(cfg: ModelConfig, seed: int) -> WeightSource:
    """The initial weights of ``Llama(cfg, seed)``.

    A weight that is split is drawn whole into one scratch buffer, reused for every weight, and its
    slice copied out: a rank never holds more than its weights plus the largest one, and does not
    leave freed full tensors behind in the C allocator's heap, which counts in its resident memory.
    """
    with torch.device("meta"):
        shapes = {name: weight.shape for name, weight in Llama(cfg, seed).named_parameters()}
    scratch: List[torch.Tensor] = []

    def part(name: str, tp_rank: int, tp: int) -> torch.Tensor:
        shape = shapes[name]
        if tp == 1 or split_dim_of(name) is None:
            return init_weight_(cfg, name, torch.empty(shape), seed)
        if not scratch:
            scratch.append(torch.empty(max(shape.numel() for shape in shapes.values())))
        whole = init_weight_(cfg, name, scratch[0][: shape.numel()].view(shape), seed)
        return tp_shard_of(whole, name, tp_rank, tp)

    return part


def stored_weights(locations: Mapping[str, Location], source: str) -> WeightSource:
    """Weights stored in safetensors (dense names -> ``locations``); only a rank's slice is read."""

    def part(name: str, tp_rank: int, tp: int) -> torch.Tensor:
        if name not in locations:
            raise ValueError(f"{source} lacks {name}")
        return read_part(locations[name], split_dim_of(name), tp_rank, tp)

    return part


def materialize(model: nn.Module, names: Set[str], weights: WeightSource, tp_rank: int, tp: int) -> None:
    """Give the weights ``names`` of ``model`` that are on ``meta`` (tensor-parallel shards where the plan
    splits) their values, in place; weights shared by several modules stay shared. Other weights stay as
    they are (on ``meta``, or already made: a LoRA stage's whole model)."""
    replacements: Dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters():  # a tied weight once, under the embedding's name
        if name not in names or not param.is_meta:
            continue
        value = weights(name, tp_rank, tp).to(param.dtype)
        if value.shape != param.shape:
            raise ValueError(f"{name} is {tuple(value.shape)} for tensor rank {tp_rank} of {tp}, the model needs {tuple(param.shape)}")
        replacement = nn.Parameter(value, requires_grad=param.requires_grad)
        replacement.__dict__.update(param.__dict__)  # what tensor-parallel layers mark on their shards
        replacements[id(param)] = replacement
    for module in model.modules():
        for attr, param in list(module.named_parameters(recurse=False, remove_duplicate=False)):
            if id(param) in replacements:
                setattr(module, attr, replacements[id(param)])
