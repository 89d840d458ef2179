"""Per-GPU memory and pipeline-bubble estimates for a layout, without building anything.

Model states follow DeepSpeed's accounting (``estimate_zero2_model_states_mem_needs``
in deepspeed/runtime/zero/stage_1_and_2.py): with bf16 mixed precision every
parameter costs 2 bytes of 16-bit weights, 2 + 4 bytes of 16- and 32-bit
gradients and 4 + 8 bytes of fp32 master weights and Adam moments; in fp32,
4 + 4 + 8. ZeRO-1 shards the optimizer part over the data-parallel ranks,
ZeRO-2 the gradients too, ZeRO-3 everything; bf16 with ZeRO-0 runs as ZeRO-1
(``raylm.parallelism.zero.deepspeed_zero_stage``).

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation
in Large Transformer Models", table 2) with the attention-score term dropped
because attention runs through ``scaled_dot_product_attention`` (flash or
memory-efficient kernels keep no T x T matrix): per layer and micro-batch
``T * b * d * (10 + 24 / tp)`` bytes in 16-bit, ``2 * T * b * d`` with full
recomputation (only each block's input is kept). fp32 doubles both.
"""

from __future__ import annotations

from dataclasses import dataclass

from raylm.configs.schema import RunConfig
from raylm.models.flops import flops_per_token, param_count
from raylm.parallelism.zero import deepspeed_zero_stage, micro_batch_size, micro_batches

GIB = 2**30


@dataclass
class MemoryPlan:
    params: int
    params_per_rank: int
    flops_per_token: float
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    activations_checkpointed_gib: float
    bubble_fraction: float
    dp: int
    micro_batch: int
    micro_batches: int

    @property
    def model_states_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optimizer_gib

    def total_gib(self, activation_checkpointing: bool) -> float:
        act = self.activations_checkpointed_gib if activation_checkpointing else self.activations_gib
        return self.model_states_gib + act


def _embedding_params(run: RunConfig) -> int:
    m = run.model
    return m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)


def params_per_rank(run: RunConfig) -> int:
    """Parameters on the busiest rank: its share of the blocks plus a vocabulary table.

    With pp > 1 the first stage holds the embedding and the last the head (for
    tied embeddings, a synchronised copy), so both carry one V x d table. Norm
    weights are replicated across tp ranks; they are too small to matter here.
    """
    m, p = run.model, run.parallel
    tables = _embedding_params(run)
    blocks = param_count(m) - tables
    if p.pp == 1:
        return int((blocks + tables) / p.tp)
    return int((blocks / p.pp + m.vocab_size * m.d_model) / p.tp)


def estimate(run: RunConfig, bf16: bool) -> MemoryPlan:
    m, p = run.model, run.parallel
    dp = run.cluster.num_workers // (p.tp * p.pp)
    n = params_per_rank(run)
    weight_bytes, grad_bytes, optim_bytes = (2, 6, 12) if bf16 else (4, 4, 8)
    zero = deepspeed_zero_stage(p.zero_stage, bf16)
    weights = n * weight_bytes / (dp if zero >= 3 else 1)
    grads = n * grad_bytes / (dp if zero >= 2 else 1)
    optim = n * optim_bytes / (dp if zero >= 1 else 1)

    mb, count = micro_batch_size(run, dp), micro_batches(run, dp)
    seq, width = m.max_seq_len, m.d_model
    scale = 1 if bf16 else 2
    layers_per_stage = -(-m.n_layer // p.pp)
    # 1F1B keeps up to pp micro-batches in flight on the first stage.
    in_flight = min(p.pp, count)
    per_layer = seq * mb * width * (10 + 24 / p.tp) * scale
    per_layer_ckpt = 2 * seq * mb * width * scale
    logits = seq * mb * (m.vocab_size / p.tp) * 4  # fp32 logits for the loss, on the last stage
    activations = layers_per_stage * per_layer * in_flight + logits
    checkpointed = layers_per_stage * per_layer_ckpt * in_flight + per_layer + logits
    bubble = (p.pp - 1) / (count + p.pp - 1)
    return MemoryPlan(
        params=param_count(m),
        params_per_rank=n,
        flops_per_token=flops_per_token(m, seq),
        weights_gib=weights / GIB,
        grads_gib=grads / GIB,
        optimizer_gib=optim / GIB,
        activations_gib=activations / GIB,
        activations_checkpointed_gib=checkpointed / GIB,
        bubble_fraction=bubble,
        dp=dp,
        micro_batch=mb,
        micro_batches=count,
    )


def parse_size(text: str) -> float:
    """'80GB', '80GiB', '80' (GiB) -> GiB."""
    from raylm.errors import UserError

    units = {"tib": 1024, "tb": 1000**4 / GIB, "gib": 1, "gb": 1e9 / GIB, "mib": 1 / 1024, "mb": 1e6 / GIB}
    cleaned = text.strip().lower()
    for unit, factor in units.items():
        if cleaned.endswith(unit):
            cleaned, scale = cleaned[: -len(unit)], factor
            break
    else:
        scale = 1
    try:
        value = float(cleaned)
    except ValueError:
        raise UserError(f"--gpu-mem {text!r} is not a size; write e.g. 80GB or 141GiB") from None
    if value <= 0:
        raise UserError(f"--gpu-mem {text!r} must be positive")
    return value * scale
