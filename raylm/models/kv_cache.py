"""A preallocated key/value cache per layer, for incremental decoding."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn


class KVCache:
    """Keys and values of one layer: two (B, max_len, n_kv_head, head_dim) buffers filled left to right."""

    def __init__(self, batch_size: int, max_len: int, n_kv_head: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (batch_size, max_len, n_kv_head, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.size(1)

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, T, n_kv_head, head_dim) at start_pos; return every key and value so far (B, start_pos + T, ...)."""
        end = start_pos + k.size(1)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot write up to {end}")
        self.k[:, start_pos:end] = k
        self.v[:, start_pos:end] = v
        return self.k[:, :end], self.v[:, :end]


def make_kv_caches(model: nn.Module, batch_size: int, max_len: Optional[int] = None) -> List[KVCache]:
    """One cache per block of a Llama, sized from each block's actual key projection.

    Reading the head count from ``wk``'s weight (not the config) gives a
    tensor-parallel shard a cache of its local heads only.
    """
    max_len = max_len or model.cfg.max_seq_len
    caches = []
    for block in model.layers:
        attention = block.attention
        weight = attention.wk.weight  # (n_kv_head_local * head_dim, d_model)
        n_kv_head = weight.size(0) // attention.head_dim
        caches.append(KVCache(batch_size, max_len, n_kv_head, attention.head_dim, weight.dtype, weight.device))
    return caches
