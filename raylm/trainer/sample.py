"""The generated sample shown at the end of a stage."""

from __future__ import annotations

from typing import Dict, List

import torch

from raylm.configs.schema import ModelConfig
from raylm.data.chat import format_chat
from raylm.data.tokenizer import END, EOS, Tokenizer
from raylm.models.generate import generate
from raylm.models.llama import Llama
from raylm.models.weights import with_tied_head

PRETRAIN_PROMPT = "The "
SFT_QUESTION = "Explain the Python topic 'lambda'."


def prompt_for(kind: str, question: str = SFT_QUESTION) -> str:
    if kind == "sft":
        return format_chat([{"role": "user", "content": question}], add_generation_prompt=True)
    return PRETRAIN_PROMPT


def stop_tokens(kind: str) -> List[str]:
    """The tokens a generation ends at, the first being the one the stage learnt to end with.

    A chat answer ends with <|end|>; an sft model also learnt <|endoftext|> in
    pretraining, and whatever follows it is no longer the answer.
    """
    return [END, EOS] if kind == "sft" else [EOS]


def sample_text(
    state: Dict[str, torch.Tensor], cfg: ModelConfig, tokenizer: Tokenizer, kind: str, max_new_tokens: int,
    device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0,
) -> str:
    """A short, reproducible continuation (top-k sampling with a fixed seed) from weights ``state``, computed on ``device`` in ``dtype``."""
    if max_new_tokens == 0:
        return ""
    with torch.device(device):
        model = Llama(cfg)
    model.load_state_dict(with_tied_head(state, cfg))
    model.to(dtype).eval()
    prompt = prompt_for(kind)
    ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    with torch.no_grad():
        out = generate(model, ids, max_new_tokens, temperature=0.8, top_k=40, eos_id=tokenizer.ids_of(stop_tokens(kind)), seed=seed)
    return prompt + tokenizer.decode(out[0, ids.size(1):].tolist())
