"""A Llama's sizes from its config, without torch: config validation and FLOP counts read them too, and
neither should pay torch's import (~2 s on 2 cores) before it can answer."""

from __future__ import annotations

import math

from raylm.configs.schema import ModelConfig


def head_dim(cfg: ModelConfig) -> int:
    return cfg.d_model // cfg.n_head


def kv_heads(cfg: ModelConfig) -> int:
    return cfg.n_kv_head or cfg.n_head


def ffn_hidden_size(cfg: ModelConfig) -> int:
    """The SwiGLU width: ``cfg.ffn_hidden``, else 8/3 * d_model rounded up to ``multiple_of`` (Meta's rule)."""
    if cfg.ffn_hidden is not None:
        return cfg.ffn_hidden
    hidden = 8 * cfg.d_model // 3
    return cfg.multiple_of * math.ceil(hidden / cfg.multiple_of)
