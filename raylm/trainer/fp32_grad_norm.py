"""The gradient norm of an fp32 stage without ZeRO: the one DeepSpeed clips by, counted right, and kept.

DeepSpeed's ZeRO and bf16 optimizers keep the global norm they clip by (``engine.get_global_grad_norm()``). Without
them (fp32, ZeRO-0) the engine clips through ``clip_fp32_gradients``, which discards the norm (every step would
log a NaN), and, under the pipeline engine, miscounts it: its ``clip_grad_norm_`` sums over the model-parallel
group but counts a weight that is not tensor-parallel only on that group's rank 0, and the pipeline's grid (its
own ``mpu``) numbers that group across the pipeline stages, so the weights of every stage but the first were
left out (tp1 x pp2, untied: a norm of 1.23 where one worker's is 1.63).

raylm counts a replicated weight on tensor rank 0 of each pipeline stage instead, over the same tp x pp group.
"""

from __future__ import annotations

import torch.distributed as dist

from raylm.parallelism.topology import ParallelGroups


class _NormGroups:
    """What ``deepspeed.runtime.utils.clip_grad_norm_`` asks of an mpu: where a replicated weight counts (tensor
    rank 0) and the group its squares are summed over (every tp x pp rank of the replica)."""

    def __init__(self, groups: ParallelGroups):
        self.groups = groups

    def get_model_parallel_rank(self) -> int:
        return self.groups.tp_rank

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.groups.mp_group


def keep_fp32_grad_norm(engine, groups: ParallelGroups) -> None:
    """Make ``engine`` clip by the norm of every weight over ``groups`` and keep it, as DeepSpeed's own optimizers
    do; nothing changes for engines whose optimizer keeps it, or that do not clip (``optim.grad_clip=0``: no norm
    is computed)."""
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled() or engine.gradient_clipping() <= 0:
        return
    from deepspeed.runtime.utils import clip_grad_norm_

    counted = _NormGroups(groups)

    def clip_and_keep_norm() -> None:
        # DeepSpeed's clip_fp32_gradients, over raylm's groups, its result kept where get_global_grad_norm reads.
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                                                   mpu=counted)

    engine.clip_fp32_gradients = clip_and_keep_norm  # shadows the method for this engine only
