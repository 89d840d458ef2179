"""Per-GPU memory and pipeline-bubble estimates for a layout, without building anything.

Model states follow DeepSpeed's accounting (``estimate_zero2_model_states_mem_needs``
in deepspeed/runtime/zero/stage_1_and_2.py): with bf16 mixed precision every
parameter costs 2 bytes of 16-bit weights, 2 + 4 bytes of 16- and 32-bit
gradients and 4 + 8 bytes of fp32 master weights and Adam moments; in fp32,
4 + 4 + 8. ZeRO-1 shards the optimizer part over the data-parallel ranks,
ZeRO-2 the gradients too, ZeRO-3 everything; bf16 with ZeRO-0 runs as ZeRO-1
(``raylm.parallelism.zero.deepspeed_zero_stage``).

Activations are an inventory of what raylm's Llama keeps for backward, per token
(``activation_bytes``; measured with ``torch.autograd.graph.saved_tensors_hooks``
and checked against measured peaks, ``tests/test_memory_plan.py``), a = 2 bytes
in bf16, 4 in fp32, d = d_model, f = the SwiGLU width, h = n_head:

- each RMSNorm: its input in fp32 (a copy under bf16), the normalised product
  and its output, (4 + 2a) d; two per block;
- attention: q, and k and v after RoPE and the GQA repetition (so h heads wide
  each), and the output, 4 a d / tp; the kernel's fp32 log-sum-exp, 4 h / tp
  (``scaled_dot_product_attention`` keeps no T x T matrix);
- SwiGLU: gate, up, silu(gate) and their product, 4 a f / tp;
- last stage: the final norm, then the loss's fp32 buffers, 12 V / tp bytes at
  their peak (the fp32 logits, the shifted logits and their exponentials, or
  log-softmax and its gradients when tp = 1).

In backward each weight's gradient is made whole before it is added to the
one accumulated so far: the largest weight, once more, in the compute dtype.

With full recomputation a block keeps only its input (a d) and one block at a
time is recomputed whole. Korthikanti et al. 2022 (table 2) count
d (10 + 24 / tp) bytes per token and layer in 16-bit; raylm's fp32 norm
intermediates and four SwiGLU-wide tensors make it d (16 + 29 / tp) at the
Llama width f = 8/3 d.

DeepSpeed's gradient communication buffer (``reduce_bucket_size`` and
``allreduce_bucket_size``, 5e8 elements by default, which raylm keeps): ZeRO-1/2
allocate a whole fp32 bucket; ZeRO-3 a bucket in the gradients' dtype plus its
parameter prefetch bucket (5e7); ZeRO-0 and bf16's ZeRO-1 (``BF16_Optimizer``)
flatten up to a bucket of fp32 gradients while they all-reduce.

Start-up: each rank builds only its own weights, in fp32, on the host
(``raylm.parallelism.materialize``): its weights, plus the largest weight drawn
whole when tp > 1 (measured: ``benchmarks/shard_memory.py``). The same fp32
weights then sit on the GPU before ``deepspeed.initialize`` converts and
partitions them, which is the peak of a ZeRO-3 rank whose partitioned states
are small.
"""

from __future__ import annotations

from dataclasses import dataclass

from raylm.configs.schema import ModelConfig, RunConfig
from raylm.models.flops import flops_per_token, param_count
from raylm.models.shapes import ffn_hidden_size
from raylm.parallelism.zero import deepspeed_zero_stage, micro_batch_size, micro_batches

GIB = 2**30


BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's default ``reduce_bucket_size`` / ``allreduce_bucket_size`` (raylm sets neither)."""
PREFETCH_ELEMENTS = 50_000_000
"""DeepSpeed's default ``stage3_prefetch_bucket_size``."""


@dataclass
class MemoryPlan:
    params: int
    params_per_rank: int
    flops_per_token: float
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    """The blocks' saved activations of every micro-batch in flight."""
    activations_checkpointed_gib: float
    loss_gib: float
    """The last stage's final norm and the loss's fp32 buffers, one micro-batch (with pp > 1 counted on top
    of the first stage's activations: an upper bound for the busiest rank)."""
    backward_gib: float
    """The largest weight's gradient, made whole in backward before it is added to the accumulated one."""
    buckets_gib: float
    """DeepSpeed's gradient communication buffers."""
    startup_gib: float
    """This rank's fp32 weights on the GPU before ``deepspeed.initialize`` converts and partitions them."""
    host_startup_gib: float
    """Host memory a rank needs to build its part of the model."""
    bubble_fraction: float
    dp: int
    micro_batch: int
    micro_batches: int

    @property
    def model_states_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optimizer_gib

    def training_gib(self, activation_checkpointing: bool) -> float:
        act = self.activations_checkpointed_gib if activation_checkpointing else self.activations_gib
        return self.model_states_gib + act + self.loss_gib + self.backward_gib + self.buckets_gib

    def total_gib(self, activation_checkpointing: bool) -> float:
        """The peak: training, or start-up if that is higher."""
        return max(self.training_gib(activation_checkpointing), self.startup_gib)


def activation_bytes(m: ModelConfig, tp: int, act_bytes: int) -> float:
    """Bytes one block keeps for backward per token (the inventory in the module docstring)."""
    d, f = m.d_model, ffn_hidden_size(m)
    norms = 2 * ((4 + 2 * act_bytes) * d + 4)
    attention = 4 * act_bytes * d / tp + 4 * m.n_head / tp
    mlp = 4 * act_bytes * f / tp
    return norms + attention + mlp


def loss_bytes(m: ModelConfig, tp: int, act_bytes: int) -> float:
    """Bytes per token of the final norm and the loss's fp32 buffers at their peak."""
    return (4 + 2 * act_bytes) * m.d_model + 12 * m.vocab_size / tp


def bucket_bytes(zero: int, bf16: bool, params: int) -> float:
    """DeepSpeed's gradient communication buffers on one rank holding ``params`` parameters."""
    if zero == 3:
        return BUCKET_ELEMENTS * (2 if bf16 else 4) + PREFETCH_ELEMENTS * (2 if bf16 else 4)
    if zero == 0 or (bf16 and zero == 1):
        return min(BUCKET_ELEMENTS, params) * 4
    return BUCKET_ELEMENTS * 4


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


def largest_weight(m: ModelConfig) -> int:
    """Elements of the largest single weight: a vocabulary table or a SwiGLU projection."""
    return max(m.vocab_size, ffn_hidden_size(m)) * m.d_model


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
    tokens = m.max_seq_len * mb
    act_bytes = 2 if bf16 else 4
    layers_per_stage = -(-m.n_layer // p.pp)
    # 1F1B keeps up to pp micro-batches in flight on the first stage.
    in_flight = min(p.pp, count)
    per_layer = tokens * activation_bytes(m, p.tp, act_bytes)
    per_layer_ckpt = tokens * act_bytes * m.d_model
    activations = layers_per_stage * per_layer * in_flight
    checkpointed = layers_per_stage * per_layer_ckpt * in_flight + per_layer
    host = 4 * n + (4 * largest_weight(m) if p.tp > 1 else 0)
    bubble = (p.pp - 1) / (count + p.pp - 1)
    return MemoryPlan(
        params=param_count(m),
        params_per_rank=n,
        flops_per_token=flops_per_token(m, m.max_seq_len),
        weights_gib=weights / GIB,
        grads_gib=grads / GIB,
        optimizer_gib=optim / GIB,
        activations_gib=activations / GIB,
        activations_checkpointed_gib=checkpointed / GIB,
        loss_gib=tokens * loss_bytes(m, p.tp, act_bytes) / GIB,
        backward_gib=largest_weight(m) / p.tp * act_bytes / GIB,
        buckets_gib=bucket_bytes(zero, bf16, n) / GIB,
        startup_gib=4 * n / GIB,
        host_startup_gib=host / GIB,
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
