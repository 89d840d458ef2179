"""Clipping an fp32 stage without ZeRO by the whole model's gradient norm, counted once per weight, and keeping it.

DeepSpeed's ZeRO and bf16 optimizers keep the global norm they clip by (``engine.get_global_grad_norm()``). Without
them (fp32, ZeRO-0) the engine clips through ``clip_fp32_gradients``, which discards the norm (every step would
log a NaN) and, under the pipeline engine, miscounts it: its ``clip_grad_norm_`` counts a weight that is not
tensor-parallel only on the model-parallel group's rank 0, and the pipeline's grid numbers that group across the
stages, so the weights of every stage but the first were left out (tp1 x pp2, untied: a norm of 1.23 where one
worker's is 1.63); and a tied embedding, held by the first and the last stage, would count twice.

raylm counts a replicated weight on tensor rank 0 of each pipeline stage and a tied weight on the first stage
that holds it, sums the squares over the replica's tp x pp ranks, and scales every gradient it holds (both copies
of a tied weight alike) by the same factor as ``torch.nn.utils.clip_grad_norm_`` would.
"""

from __future__ import annotations

from typing import List, Set

import torch
import torch.distributed as dist

from raylm.parallelism.topology import ParallelGroups

EPS = 1e-6
"""Added to the norm before dividing, as torch's and DeepSpeed's clipping do."""


def _tied_copies(module) -> Set[int]:
    """ids of the tied weights this rank holds that another rank (the first stage that holds them) counts: a
    pipeline module's ``tied_comms`` name each tie's ranks."""
    rank = dist.get_rank()
    return {id(module._recursive_getattr(module.tied_modules[key], attr))
            for key, comm in getattr(module, "tied_comms", {}).items() if rank != min(comm["ranks"])
            for attr in comm["weight_attr"]}


def whole_grad_norm(params: List[torch.nn.Parameter], tied_elsewhere: Set[int], groups: ParallelGroups,
                    device: torch.device) -> torch.Tensor:
    """The 2-norm of every gradient of the model replica (a collective over ``groups.mp_group``, on ``device``): a
    weight split by tensor parallelism counts on every tensor rank, any other on tensor rank 0 alone, and a tied
    weight on its first stage."""
    from deepspeed.runtime.utils import is_model_parallel_parameter

    counted = [p.grad.detach().float().norm() for p in params
               if id(p) not in tied_elsewhere and (groups.tp_rank == 0 or is_model_parallel_parameter(p))]
    squares = torch.stack(counted).pow(2).sum() if counted else torch.zeros((), device=device)
    dist.all_reduce(squares, group=groups.mp_group)
    return squares.sqrt()


def keep_fp32_grad_norm(engine, groups: ParallelGroups) -> None:
    """Make ``engine`` clip by ``whole_grad_norm`` and keep it, as DeepSpeed's own optimizers do; nothing changes
    for engines whose optimizer keeps it, or that do not clip (``optim.grad_clip=0``: no norm is computed)."""
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled() or engine.gradient_clipping() <= 0:
        return
    tied_elsewhere = _tied_copies(engine.module)

    def clip_and_keep_norm() -> None:
        params = [p for p in engine.module.parameters() if p.grad is not None]
        norm = whole_grad_norm(params, tied_elsewhere, groups, engine.device)
        factor = (engine.gradient_clipping() / (norm + EPS)).clamp(max=1.0)
        for param in params:
            param.grad.detach().mul_(factor)
        engine._global_grad_norm = norm

    engine.clip_fp32_gradients = clip_and_keep_norm  # shadows the method for this engine only
