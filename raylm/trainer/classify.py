"""What a classify stage does differently on a rank: where its new head's weights come from, and how it ends.

The rest of the stage is the training loop every kind runs: the classifier's
forward gives class logits at every position (B, T, n_labels), the rows'
targets mark the one position that counts, and the usual cross-entropy trains
the head and every weight beneath it.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import torch

from raylm.configs.schema import ModelConfig
from raylm.evals.classification import classification_report, predictions
from raylm.models.classifier import SCORE_WEIGHT, LlamaClassifier
from raylm.models.llama import init_weight_
from raylm.parallelism.materialize import WeightSource

SAMPLE_CHARS = 60
"""Characters of the held-out text shown with its prediction in the summary."""


def with_score_head(weights: WeightSource, cfg: ModelConfig, n_labels: int, seed: int) -> WeightSource:
    """``weights`` (the language model the stage starts from) plus the new head, drawn from ``seed`` as every fresh weight is."""

    def part(name: str, tp_rank: int, tp: int) -> torch.Tensor:
        if name == SCORE_WEIGHT:
            return init_weight_(cfg, name, torch.empty(n_labels, cfg.d_model), seed)  # (n_labels, d_model), never split
        return weights(name, tp_rank, tp)

    return part


def held_out_score(state: Dict[str, torch.Tensor], cfg: ModelConfig, labels: Sequence[str], val, tokenizer,
                   device: torch.device) -> Tuple[Dict[str, Any], str]:
    """(report, sample) of the trained weights ``state`` on the whole held-out split ``val``, in fp32 as
    ``raylm eval`` scores them; the sample is the first held-out text with its predicted and true label."""
    with torch.device(device):
        model = LlamaClassifier(cfg, len(labels))
    model.load_state_dict(state)
    model.eval()
    truth, predicted = val.label_indices(range(val.num_samples)), predictions(model, val, tokenizer.pad_id)
    first, _ = val.batch([0])
    text = tokenizer.decode([token for token in first[0].tolist() if token != tokenizer.pad_id])[:SAMPLE_CHARS]
    sample = f"{text!r}... -> {labels[predicted[0]]} (true: {labels[truth[0]]})"
    return classification_report(labels, truth, predicted), sample
