"""Autoregressive sampling from a Llama: greedy, temperature, top-k and top-p, with or without a KV cache."""

from __future__ import annotations

from typing import Collection, Iterator, Optional, Union

import torch
from torch import nn

from raylm.models.kv_cache import make_kv_caches


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next token ids (B,) from the last position's logits (B, V); temperature 0 is greedy."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None:
        logits = _nucleus(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (the most likely always stays)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the more likely tokens
    drop_sorted = mass_before >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


@torch.no_grad()
def stream(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    use_cache: bool = True,
    eos_id: Union[int, Collection[int], None] = None,
    seed: Optional[int] = None,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` ids continuing ``prompt_ids`` (1, T), one at a time; stops after ``eos_id``
    (one id, or several: a chat answer ends at end-of-turn or end-of-text).

    Runs where the model is (the prompt moves there); ``seed`` seeds a
    generator on that device, else the device's global one is used.
    A prompt longer than ``max_seq_len`` keeps its last ``max_seq_len`` tokens.
    Without the cache every step reruns the last ``max_seq_len`` tokens (a
    sliding window, unbounded); with it the context cannot slide, so generation
    stops once the context fills ``max_seq_len`` (after the token predicted
    from the full context).
    """
    if prompt_ids.dim() != 2 or prompt_ids.size(0) != 1 or prompt_ids.size(1) == 0:
        raise ValueError(f"prompt_ids must be a non-empty (1, T) tensor, got shape {tuple(prompt_ids.shape)}")
    if max_new_tokens <= 0:
        return
    max_len = model.cfg.max_seq_len
    device = next(model.parameters()).device
    ids = prompt_ids[:, -max_len:].to(device)
    stops = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    def pick(logits: torch.Tensor) -> torch.Tensor:
        return sample_next(logits, temperature, top_k, top_p, generator)  # (1,)

    if use_cache:
        caches = make_kv_caches(model, batch_size=1, max_len=max_len)
        logits = model(ids, caches, 0)[:, -1]  # (1, V)
        position = ids.size(1)
        for step in range(max_new_tokens):
            token = pick(logits)
            yield int(token)
            if int(token) in stops or position == max_len or step == max_new_tokens - 1:
                return
            logits = model(token.view(1, 1), caches, position)[:, -1]
            position += 1
    else:
        for _ in range(max_new_tokens):
            token = pick(model(ids)[:, -1])
            yield int(token)
            if int(token) in stops:
                return
            ids = torch.cat((ids, token.view(1, 1)), dim=1)[:, -max_len:]


def generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    use_cache: bool = True,
    eos_id: Union[int, Collection[int], None] = None,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """The prompt (1, T) followed by the ids ``stream`` yields: (1, T + n)."""
    new = list(stream(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, use_cache, eos_id, seed))
    continuation = torch.tensor(new, dtype=prompt_ids.dtype, device=prompt_ids.device).view(1, len(new))
    return torch.cat((prompt_ids, continuation), dim=1)
