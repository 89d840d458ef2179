"""Translate raylm's parallel/optim/train sections into a DeepSpeed config."""

from __future__ import annotations

from raylm.configs.schema import RunConfig


def grad_accum_steps(run: RunConfig, dp_size: int) -> int:
    """Micro-batches each data-parallel rank runs per optimizer step."""
    return run.train.global_batch_size // (dp_size * run.parallel.micro_batch_size)


def deepspeed_config(run: RunConfig, dp_size: int, bf16: bool) -> dict:
    """The DeepSpeed config dict; the optimizer and scheduler are passed as objects.

    The global batch stays fixed when the data-parallel size changes (elastic
    restarts): gradient accumulation absorbs the difference.
    """
    p = run.parallel
    accum = grad_accum_steps(run, dp_size)
    zero: dict = {"stage": p.zero_stage}
    if p.zero_stage == 3:
        # Gather whole layers at once on tiny models instead of prefetch-tuning per parameter.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": False})
    return {
        "train_batch_size": run.train.global_batch_size,
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": run.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
