"""The gradient norm of an fp32 stage without ZeRO, which DeepSpeed computes to clip and then drops.

DeepSpeed's ZeRO and bf16 optimizers keep the global norm they clip by (``engine.get_global_grad_norm()``). Without
them (fp32, ZeRO-0) the engine clips through ``clip_fp32_gradients``, which computes the same global norm (over
the model-parallel groups through the mpu) and discards it: every step would log a NaN norm.
"""

from __future__ import annotations


def keep_fp32_grad_norm(engine) -> None:
    """Make ``engine`` keep the norm its fp32 clipping computes, as DeepSpeed's own optimizers do; nothing changes
    for engines whose optimizer keeps it, or that do not clip (``optim.grad_clip=0``: no norm is computed)."""
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled() or engine.gradient_clipping() <= 0:
        return
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_keep_norm() -> None:
        # What DeepSpeed's clip_fp32_gradients does, its result kept where get_global_grad_norm reads.
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                                                   mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_and_keep_norm  # shadows the method for this engine only
