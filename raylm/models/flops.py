"""Parameter and FLOP counts of a Llama from its config alone (no model is built)."""

from __future__ import annotations

from dataclasses import replace

from raylm.configs.schema import ModelConfig
from raylm.models.shapes import ffn_hidden_size, head_dim, kv_heads


def block_matmul_params(cfg: ModelConfig) -> int:
    """Weights of one block's projections: wq, wk, wv, wo and the SwiGLU w1, w3, w2."""
    q_width = cfg.n_head * head_dim(cfg)
    kv_width = kv_heads(cfg) * head_dim(cfg)
    attention = cfg.d_model * q_width + 2 * cfg.d_model * kv_width + q_width * cfg.d_model
    feed_forward = 3 * cfg.d_model * ffn_hidden_size(cfg)
    return attention + feed_forward


def param_count(cfg: ModelConfig) -> int:
    """Every parameter of ``Llama(cfg)``, a tied embedding/head counted once."""
    norms = (2 * cfg.n_layer + 1) * cfg.d_model
    tables = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return cfg.n_layer * block_matmul_params(cfg) + norms + tables


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token, the PaLM / nanoGPT estimate ``6 N + 12 L d T``.

    N counts every matmul weight: the projections of all blocks plus the
    output head (vocab_size x d_model, counted even when tied to the
    embedding, because the head's matmul runs either way). It leaves out the
    embedding lookup and the norms, which do no matmul. ``12 L d T`` is the
    attention score and value products (QK^T and AV) over a context of T =
    ``seq_len`` tokens, with L = n_layer and d = d_model.
    """
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layer * cfg.d_model * seq_len


def matmul_params(cfg: ModelConfig) -> int:
    """The weights that take part in a matmul per token: every block's projections and the output head."""
    return cfg.n_layer * block_matmul_params(cfg) + cfg.vocab_size * cfg.d_model


def lora_flops_per_token(cfg: ModelConfig, seq_len: int, adapter_params: int) -> float:
    """``flops_per_token`` of a LoRA stage: the frozen weights still carry the gradient back to the adapters
    below them (2 FLOPs per weight besides the forward's 2) but compute no gradient of their own (the other 2);
    the adapters train in full (6 per weight)."""
    return flops_per_token(cfg, seq_len) - 2.0 * matmul_params(cfg) + 6.0 * adapter_params


def classifier_flops_per_token(cfg: ModelConfig, seq_len: int, n_labels: int) -> float:
    """``flops_per_token`` of a classify stage: its head maps d_model to n_labels, not to the vocabulary."""
    return flops_per_token(replace(cfg, vocab_size=n_labels), seq_len)


def distill_flops_per_token(student: ModelConfig, teacher: ModelConfig, seq_len: int) -> float:
    """``flops_per_token`` of a distill stage: the student trains (forward + backward) and the teacher runs its
    forward alone, a third of its training FLOPs (``2 N + 4 L d T``)."""
    return flops_per_token(student, seq_len) + flops_per_token(teacher, seq_len) / 3.0
