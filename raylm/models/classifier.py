"""The Llama as a sequence classifier: a class head instead of the language-model head.

The head (``score``, a bias-free Linear d_model -> n_labels) reads the final
hidden state at every position; a sequence's prediction is its logits at the
last token that is not padding. That is Hugging Face's
``LlamaForSequenceClassification`` (same weight names, same pooling), so an
export is a plain copy. Causal attention means padding after a text never
changes the hidden state of its last token, so the padded batch scores each
text as if it were alone.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from raylm.configs.schema import ModelConfig
from raylm.models.llama import Llama

SCORE_WEIGHT = "score.weight"


class LlamaClassifier(Llama):
    """The decoder with ``score`` (n_labels x d_model) as its only head; no ``output`` weight exists.

    ``score`` starts from the seed like every other weight (``init_weight_`` of its name).
    """

    def __init__(self, cfg: ModelConfig, n_labels: int, seed: Optional[int] = None):
        self.n_labels = n_labels  # read by add_head, which Llama.__init__ calls
        super().__init__(cfg, seed)

    def add_head(self, cfg: ModelConfig) -> None:
        self.score = nn.Linear(cfg.d_model, self.n_labels, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> class logits at every position (B, T, n_labels); training's targets mark the position that counts."""
        return self.score(self.final_hidden(tokens))

    def classify(self, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
        """tokens (B, T), right-padded with ``pad_id`` -> the logits (B, n_labels) of each sequence, as if it were alone."""
        return pooled_logits(self(tokens), tokens, pad_id)


def last_token_index(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B,) the position of each row's last token that is not ``pad_id`` (0 for a row of padding only).

    Hugging Face's rule: the largest index among the non-pad positions.
    """
    positions = torch.arange(tokens.size(1), device=tokens.device)  # (T,)
    return (positions * (tokens != pad_id)).argmax(dim=-1)


def pooled_logits(logits: torch.Tensor, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """logits (B, T, C) at every position -> (B, C) at each row's last non-pad token."""
    rows = torch.arange(logits.size(0), device=logits.device)
    return logits[rows, last_token_index(tokens, pad_id).to(logits.device)]
