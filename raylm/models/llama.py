"""A Llama-style decoder on one device: RMSNorm, RoPE, SwiGLU, optional GQA and tied embeddings.

The model knows nothing of parallelism. Attention and the MLP read their
(local) head counts and widths from their projections' outputs, so replacing a
projection by a tensor-parallel shard with fewer output features just works.

Submodule names follow Meta's reference implementation (``tok_embeddings``,
``layers.{i}.attention.wq``, ``feed_forward.w1`` ...): the tensor-parallel plan,
the pipeline stages and the Hugging Face adapter depend on them.
"""

from __future__ import annotations

import hashlib
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from raylm.configs.schema import ModelConfig
from raylm.models.kv_cache import KVCache
from raylm.models.shapes import ffn_hidden_size, head_dim, kv_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for bf16 stability, as Hugging Face's LlamaRMSNorm does.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def rope_tables(head_dim: int, max_len: int, theta: float, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_len, head_dim) in Hugging Face's rotate_half layout (frequencies repeated, not interleaved)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))  # (head_dim/2,)
    positions = torch.arange(max_len, dtype=torch.int64, device=device).float()
    freqs = torch.outer(positions, inv_freq)  # (max_len, head_dim/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (max_len, head_dim)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, head_dim) by the tables (T, head_dim) of its positions."""
    cos = cos[None, :, None, :].to(x.dtype)  # (1, T, 1, head_dim)
    sin = sin[None, :, None, :].to(x.dtype)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = head_dim(cfg)
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, kv_heads(cfg) * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, kv_heads(cfg) * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * self.head_dim, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: Optional[KVCache] = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        # Head counts come from the projections so that tensor-parallel shards (fewer heads) work unchanged.
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, n_head, head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, n_kv_head, head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)  # (B, T, n_kv_head, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if kv_cache is None:
            mask, is_causal = None, True
        else:
            k, v = kv_cache.update(k, v, start_pos)  # (B, start_pos + T, n_kv_head, head_dim)
            mask, is_causal = chunk_causal_mask(start_pos, T, x.device), False

        groups = q.size(2) // k.size(2)  # query heads sharing one key/value head (GQA)
        k = k.repeat_interleave(groups, dim=2)  # (B, S, n_head, head_dim)
        v = v.repeat_interleave(groups, dim=2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=is_causal
        )  # (B, n_head, T, head_dim)
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, n_head * head_dim)
        return self.wo(out)


def chunk_causal_mask(start_pos: int, chunk_len: int, device: torch.device) -> torch.Tensor:
    """(chunk_len, start_pos + chunk_len) bool mask: the query at position start_pos + i sees keys 0 .. start_pos + i."""
    query_pos = torch.arange(start_pos, start_pos + chunk_len, device=device)[:, None]
    key_pos = torch.arange(start_pos + chunk_len, device=device)[None, :]
    return key_pos <= query_pos


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden_size(cfg)
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.d_model, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, hidden) -> (B, T, d_model)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: Optional[KVCache] = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, kv_cache, start_pos)  # (B, T, d_model)
        return h + self.feed_forward(self.ffn_norm(h))


def _weight_seed(seed: int, name: str) -> int:
    """A 64-bit generator seed for weight ``name`` of a model initialised from ``seed`` (stable across processes)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "little")


def init_weight_(cfg: ModelConfig, name: str, weight: torch.Tensor, seed: int) -> torch.Tensor:
    """Fill ``weight`` (the full tensor named ``name``) with its initial value; returns it.

    Norms start at one; everything else is normal(0, init_std), the residual output projections
    (``attention.wo``, ``feed_forward.w2``) with init_std / sqrt(2 n_layer) (GPT-2). Every weight
    draws from its own generator seeded from (``seed``, ``name``), so any subset of the model can be
    made alone with the values it has in the whole model. Training makes them on the CPU; a model
    built on another device (to load weights into) draws from that device's generator, other values.
    A tensor on ``meta`` is left as it is.
    """
    if weight.is_meta:
        return weight
    if name.endswith("norm.weight"):
        return weight.fill_(1.0)
    residual = name.endswith(("attention.wo.weight", "feed_forward.w2.weight"))
    std = cfg.init_std / math.sqrt(2 * cfg.n_layer) if residual else cfg.init_std
    generator = torch.Generator(device=weight.device).manual_seed(_weight_seed(seed, name))
    return weight.normal_(0.0, std, generator=generator)


class Llama(nn.Module):
    """The decoder; ``seed`` picks the initial weights (``init_weight_``), drawn from torch's global generator when None.

    Built under ``torch.device("meta")`` it has the weights' shapes only (the RoPE tables are
    still real, on the CPU): parallel training gives each rank's weights their values later.
    """

    def __init__(self, cfg: ModelConfig, seed: Optional[int] = None):
        super().__init__()
        if seed is None:
            seed = int(torch.randint(2**62, (), device="cpu"))
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.add_head(cfg)
        # Non-persistent: derived from the config, so never part of a checkpoint.
        device = self.norm.weight.device
        cos, sin = rope_tables(head_dim(cfg), cfg.max_seq_len, cfg.rope_theta, torch.device("cpu") if device.type == "meta" else device)
        self.register_buffer("cos", cos, persistent=False)  # (max_seq_len, head_dim)
        self.register_buffer("sin", sin, persistent=False)
        self.reset_parameters(seed)

    def add_head(self, cfg: ModelConfig) -> None:
        """The language-model head (the embedding's weight when tied); a subclass puts another head here."""
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def reset_parameters(self, seed: int) -> None:
        """Every weight (a tied one once, under the embedding's name) to its ``init_weight_`` value."""
        with torch.no_grad():
            for name, weight in self.named_parameters():
                init_weight_(self.cfg, name, weight, seed)

    def rope(self, start_pos: int, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (seq_len, head_dim) for positions start_pos .. start_pos + seq_len - 1."""
        if start_pos + seq_len > self.cos.size(0):
            raise ValueError(f"positions up to {start_pos + seq_len} exceed model.max_seq_len={self.cos.size(0)}")
        return self.cos[start_pos : start_pos + seq_len], self.sin[start_pos : start_pos + seq_len]

    def forward(
        self,
        tokens: torch.Tensor,
        kv_caches: Optional[List[KVCache]] = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """tokens (B, T) at positions start_pos .. start_pos + T - 1 -> logits (B, T, vocab_size).

        With ``kv_caches`` (one per layer) the keys and values of earlier
        positions come from the caches and this chunk's are written into them.
        """
        return self.output(self.final_hidden(tokens, kv_caches, start_pos))  # (B, T, vocab_size)

    def final_hidden(
        self,
        tokens: torch.Tensor,
        kv_caches: Optional[List[KVCache]] = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """tokens (B, T) -> the normalised hidden states (B, T, d_model) that a head reads."""
        _, T = tokens.shape
        cos, sin = self.rope(start_pos, T)
        x = self.tok_embeddings(tokens)  # (B, T, d_model)
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_caches[index] if kv_caches is not None else None, start_pos)
        return self.norm(x)


def num_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Parameters of the model, a tied weight counted once.

    ``non_embedding=True`` leaves out the vocabulary tables: the token
    embedding and, when untied, the output head.
    """
    total = sum(p.numel() for p in model.parameters())
    if non_embedding:
        tables = {id(model.tok_embeddings.weight): model.tok_embeddings.weight, id(model.output.weight): model.output.weight}
        total -= sum(t.numel() for t in tables.values())
    return total
