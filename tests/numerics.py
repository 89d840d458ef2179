"""Tolerances that follow from the dtype and the length of the reductions, never from one CPU's rounding.

Two correct computations of the same floating-point result differ only in the order in which they add
products up: a tensor-parallel all-reduce instead of one matmul, another GEMM blocking, AMX instead of
AVX-512 kernels, a KV cache instead of a full forward. Adding n terms in floating point has a worst-case
error of about n * u * sum|terms| (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed.,
section 4.2; u = eps / 2 is the unit round-off), and independent roundings grow like sqrt(n) * u in
practice. Expressed against the largest magnitude m of the result compared:

- ``worst_case(n)`` = n * eps: one layer, one loss, one gradient, compared element by element.
- ``typical(n, depth)`` = depth * sqrt(n) * eps: a chain of ``depth`` such reductions (a whole model's
  forward and backward, several optimizer steps), whose roundings are independent.

A wrong shard, a missing all-reduce or a swapped weight is off by a sizeable fraction of m: both bounds
stay orders of magnitude below that, which ``test_numerics`` checks.
"""

from __future__ import annotations

import math

import torch

from raylm.configs.schema import ModelConfig
from raylm.models.shapes import ffn_hidden_size


def eps(dtype: torch.dtype = torch.float32) -> float:
    return torch.finfo(dtype).eps


def worst_case(terms: int, dtype: torch.dtype = torch.float32) -> float:
    """Relative error bound of one sum of ``terms`` products."""
    return terms * eps(dtype)


def typical(terms: int, depth: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """Relative error of ``depth`` chained sums of ``terms`` products each, rounded independently."""
    return depth * math.sqrt(terms) * eps(dtype)


def longest_reduction(cfg: ModelConfig, tokens: int) -> int:
    """The longest sum in a Llama step: a projection's input width, the vocabulary's softmax, or a weight
    gradient over every token of the batch."""
    return max(cfg.d_model, ffn_hidden_size(cfg), cfg.vocab_size, tokens)


def model_depth(cfg: ModelConfig) -> int:
    """Chained reductions through the model: each block's attention and MLP, then the head and the loss."""
    return 2 * cfg.n_layer + 2


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float) -> None:
    """Max abs difference within ``rel`` times the largest magnitude of ``expected``."""
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    scale = max(expected.abs().max().item(), torch.finfo(expected.dtype).tiny) if expected.numel() else 0.0
    error = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    assert error <= rel * scale, f"{what}: max abs error {error:.3g} > {rel:.3g} x max |expected| {scale:.3g}"


def training_rel(cfg: ModelConfig, tokens_per_step: int, steps: int) -> float:
    """Relative difference two correct layouts may show after ``steps`` optimizer steps: each step's forward
    and backward is a chain of ``model_depth`` reductions, and a step starts from the previous one's weights."""
    return typical(longest_reduction(cfg, tokens_per_step), model_depth(cfg) * steps)


def bf16_training_rel(cfg: ModelConfig, tokens_per_step: int) -> float:
    """Relative difference a bf16 run may show at any step against another correct run of the same model on the
    same batches: fp32, or bf16 in another layout.

    bf16 matmuls (AMX, AVX-512 BF16, GPU tensor cores) multiply inputs with an 8-bit mantissa and add the
    products in fp32. So each reduction's result carries the rounding of its inputs and of itself to bf16, about
    eps(bf16) = 2^-7 relative whatever its length n, plus its fp32 sum's sqrt(n) * eps(fp32) (5e-6 at n = 2048:
    the reduction sizes of a small model hardly matter next to the mantissa). Chained through the model as
    ``typical`` chains them: one forward and backward's worth.

    Unlike ``training_rel``, steps do not multiply it. Every step rounds the fp32 master weights to bf16 afresh,
    so no rounding is carried into the next step's arithmetic; what carries over is the masters' drift, which
    Adam's normalised updates keep within a learning rate per element per step, on the same batches. A bf16
    run that drifts further (updates lost to bf16 rounding, gradients accumulated or reduced in bf16) shows up
    as a difference growing beyond one step's rounding. Two bf16 layouts round the same values at the same
    places except where a layout splits a reduction (a tensor-parallel partial sum rounded before the
    all-reduce), so they differ by less than either differs from fp32.
    """
    return model_depth(cfg) * (eps(torch.bfloat16) + math.sqrt(longest_reduction(cfg, tokens_per_step)) * eps())
