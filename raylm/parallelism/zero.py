"""Translate raylm's parallel/optim/train sections into a DeepSpeed config."""

from __future__ import annotations

from typing import Tuple

from raylm.configs.schema import RunConfig


def micro_batches(run: RunConfig, dp_size: int) -> int:
    """Micro-batches each data-parallel rank runs per optimizer step.

    With pp > 1 and ``parallel.pipeline_microbatches`` set, that count is
    fixed and the micro-batch size follows from it; otherwise the micro-batch
    size is fixed and gradient accumulation fills the global batch.
    """
    p = run.parallel
    if p.pp > 1 and p.pipeline_microbatches:
        return p.pipeline_microbatches
    return run.train.global_batch_size // (dp_size * p.micro_batch_size)


def batch_unit(run: RunConfig) -> Tuple[str, int]:
    """The setting (key, value) a replica's share of the global batch must be a multiple of.

    With pp > 1 and ``parallel.pipeline_microbatches`` set, that count is
    fixed; otherwise the micro-batch size is.
    """
    p = run.parallel
    if p.pp > 1 and p.pipeline_microbatches:
        return "parallel.pipeline_microbatches", p.pipeline_microbatches
    return "parallel.micro_batch_size", p.micro_batch_size


def batch_splits(run: RunConfig, dp_size: int) -> bool:
    """Whether the global batch divides evenly over ``dp_size`` replicas."""
    return run.train.global_batch_size % (dp_size * batch_unit(run)[1]) == 0


def usable_world_size(run: RunConfig, workers: int) -> int:
    """How many of ``workers`` ranks train: the most whole tp x pp replicas that split the global batch (0 if none fits).

    An elastic restart may come back with any worker count; the ranks beyond
    this wait out the stage (see ``raylm.launcher.ray_entry``).
    """
    replica = run.parallel.tp * run.parallel.pp
    for dp_size in range(workers // replica, 0, -1):
        if batch_splits(run, dp_size):
            return dp_size * replica
    return 0


def micro_batch_size(run: RunConfig, dp_size: int) -> int:
    """Sequences per rank per forward pass."""
    return run.train.global_batch_size // (dp_size * micro_batches(run, dp_size))


def deepspeed_zero_stage(zero_stage: int, bf16: bool) -> int:
    """The ZeRO stage DeepSpeed runs for ``parallel.zero_stage``.

    bf16 with ZeRO-0 runs as ZeRO-1: DeepSpeed 0.19.8 accumulates gradients in
    fp32 under bf16 only with ZeRO >= 1 (ZeRO-0 refuses the mix), and its
    ZeRO-0 bf16 optimizer keeps fp32 masters that the fragment API cannot
    reach. ZeRO-1 under bf16 is DeepSpeed's BF16_Optimizer: fp32 masters and
    gradients, the masters and Adam state split over the data-parallel ranks.
    """
    return max(zero_stage, 1) if bf16 else zero_stage


def deepspeed_config(run: RunConfig, dp_size: int, bf16: bool) -> dict:
    """The DeepSpeed config dict; the optimizer and scheduler are passed as objects.

    The global batch stays fixed when the data-parallel size changes (elastic
    restarts): gradient accumulation absorbs the difference.
    """
    p = run.parallel
    stage = deepspeed_zero_stage(p.zero_stage, bf16)
    zero: dict = {"stage": stage}
    if stage == 3:
        # Gather whole layers at once on tiny models instead of prefetch-tuning per parameter.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": False})
    config = {
        "train_batch_size": run.train.global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(run, dp_size),
        "gradient_accumulation_steps": micro_batches(run, dp_size),
        "gradient_clipping": run.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if bf16:
        # Megatron's practice: bf16 compute, fp32 gradient accumulation and
        # reduction (DeepSpeed's default reduces bf16 gradients in bf16, which
        # lost accuracy on 2+ ranks in DeepSpeed issue 3979).
        config.update({"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"})
    return config


def skip_single_replica_allreduce(engine, dp_size: int, stage: int) -> None:
    """Turn off DeepSpeed's gradient all-reduce where there is one data-parallel replica and no ZeRO optimizer.

    DeepSpeed 0.19.8's ZeRO-0 engine reduces every step even over a group of one: it flattens all gradients
    into one buffer, all-reduces it, divides by 1 and copies it back (~4% of a one-worker step here). Over one
    rank that is the identity, bit for bit. ZeRO >= 1 keeps it: its optimizer's reduce also fills the buffers
    its step reads. The pipeline engine's tied-weight reduction is another path and is kept.
    """
    if dp_size == 1 and stage == 0:
        engine.enable_backward_allreduce = False
        engine.pipeline_enable_backward_allreduce = False
