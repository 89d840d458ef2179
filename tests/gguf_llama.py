"""What llama.cpp computes from a GGUF Llama, in plain numpy: the checks' stand-in for a llama.cpp runtime.

Written from llama.cpp's llama graph, not from raylm's model: RMSNorm, RoPE on
adjacent pairs (2i, 2i + 1) (rope type NORM, which is why the export permutes
q/k rows), grouped-query attention where query head h reads kv head
h // (heads / kv heads), SwiGLU, and the output head (token_embd when absent).
Every tensor is dequantized with the ``gguf`` package and computed in float64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from gguf import GGUFReader, quants


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def read_gguf(path: Path) -> Tuple[GGUFReader, Dict[str, np.ndarray]]:
    """The reader and every tensor dequantized, in numpy's (rows, cols) order (GGUF lists dims reversed)."""
    reader = GGUFReader(path)
    tensors = {t.name: quants.dequantize(t.data, t.tensor_type).astype(np.float64) for t in reader.tensors}
    return reader, tensors


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def _rope(x: np.ndarray, theta: float) -> np.ndarray:
    """x (T, heads, head_dim): pair (2i, 2i + 1) at position p turns by p * theta^(-2i / head_dim)."""
    T, _, dim = x.shape
    angle = np.arange(T)[:, None] * theta ** (-np.arange(0, dim, 2) / dim)  # (T, dim/2)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def forward(reader: GGUFReader, t: Dict[str, np.ndarray], tokens: List[int]) -> np.ndarray:
    """Logits (T, vocab) of ``tokens`` at positions 0 .. T-1."""
    heads, kv = (int(field(reader, f"llama.attention.{k}")) for k in ("head_count", "head_count_kv"))
    eps, theta = field(reader, "llama.attention.layer_norm_rms_epsilon"), field(reader, "llama.rope.freq_base")
    T = len(tokens)
    x = t["token_embd.weight"][tokens]  # (T, d_model)
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(int(field(reader, "llama.block_count"))):
        w = {name.split(".")[2]: t[name] for name in t if name.startswith(f"blk.{i}.")}
        h = _rms_norm(x, w["attn_norm"], eps)
        q = _rope((h @ w["attn_q"].T).reshape(T, heads, -1), theta)  # (T, heads, head_dim)
        k = _rope((h @ w["attn_k"].T).reshape(T, kv, -1), theta)  # (T, kv, head_dim)
        v = (h @ w["attn_v"].T).reshape(T, kv, -1)
        k, v = np.repeat(k, heads // kv, axis=1), np.repeat(v, heads // kv, axis=1)  # (T, heads, head_dim)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1]) + causal  # (heads, T, T)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", probs, v).reshape(T, -1) @ w["attn_output"].T
        h = _rms_norm(x, w["ffn_norm"], eps)
        gate = h @ w["ffn_gate"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w["ffn_up"].T)) @ w["ffn_down"].T
    head = t.get("output.weight", t["token_embd.weight"])
    return _rms_norm(x, t["output_norm.weight"], eps) @ head.T


def greedy(reader: GGUFReader, t: Dict[str, np.ndarray], prompt: List[int], new_tokens: int) -> List[int]:
    """Temperature-0 continuation, recomputing the whole sequence per token (no cache)."""
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(forward(reader, t, ids)[-1].argmax()))
    return ids[len(prompt):]
