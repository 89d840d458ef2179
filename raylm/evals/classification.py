"""A classifier's score on labelled rows: accuracy, per-class support and correct counts, the confusion matrix.

The end of a classify stage (on its consolidated weights) and ``raylm eval``
(on its final/ directory) both call ``score_classifier`` over every row of the
held-out split, in the same batches, so they report the same numbers.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from raylm.models.classifier import LlamaClassifier

BATCH_SIZE = 16


def predictions(model: LlamaClassifier, reader, pad_id: int, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """(N,) the predicted label index of every row of ``reader`` (a ``ClassifyRows``)."""
    device = next(model.parameters()).device
    predicted: List[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, reader.num_samples, batch_size):
            inputs, _ = reader.batch(range(start, min(start + batch_size, reader.num_samples)))
            logits = model.classify(torch.from_numpy(inputs).to(device), pad_id)  # (B, n_labels)
            predicted.append(logits.argmax(dim=-1).cpu().numpy())
    return np.concatenate(predicted)


def classification_report(labels: Sequence[str], truth: np.ndarray, predicted: np.ndarray) -> Dict[str, Any]:
    """Accuracy and counts of predicted label indices against the true ones.

    ``confusion[i][j]`` counts rows of label i predicted as j. ``majority_accuracy`` is what always answering the
    most frequent true label would score: the bar a classifier has to clear on this split.
    """
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    support = confusion.sum(axis=1)
    correct = np.diag(confusion)
    return {
        "examples": int(support.sum()),
        "accuracy": float(correct.sum() / support.sum()),
        "majority_accuracy": float(support.max() / support.sum()),
        "labels": list(labels),
        "per_class": {label: {"support": int(support[i]), "correct": int(correct[i])} for i, label in enumerate(labels)},
        "confusion": confusion.tolist(),
    }


def score_classifier(model: LlamaClassifier, reader, labels: Sequence[str], pad_id: int) -> Dict[str, Any]:
    """``classification_report`` of ``model`` on every row of ``reader``."""
    truth = reader.label_indices(range(reader.num_samples))
    return classification_report(labels, truth, predictions(model, reader, pad_id))


def flat_counts(report: Dict[str, Any]) -> Dict[str, float]:
    """The report's numbers as flat keys (``accuracy``, ``support/<label>``, ``correct/<label>``), as metric sinks take them."""
    counts: Dict[str, float] = {"accuracy": report["accuracy"], "majority_accuracy": report["majority_accuracy"], "examples": report["examples"]}
    for label, numbers in report["per_class"].items():
        counts[f"support/{label}"] = numbers["support"]
        counts[f"correct/{label}"] = numbers["correct"]
    return counts
