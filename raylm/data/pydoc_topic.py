"""The built-in classification task ``builtin:pydoc-topic``: which part of Python's reference a paragraph comes from.

Paragraphs of the help topics in ``pydoc_data.topics`` (prose only: no
headings, no interpreter sessions, at least ``MIN_CHARS`` long) are labelled by
the group of topics they belong to. Every group keeps the same number of
paragraphs (the smallest group's count), picked evenly over its paragraphs in
topic order, so the classes are balanced and chance is 1 / len(TOPIC_GROUPS).
The set is a pure function of the Python that runs it (no seed): the held-out
split is made later, like every classify source's.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

import numpy as np

from raylm.data.corpus import pydoc_topics

BUILTIN_PYDOC_TOPIC = "builtin:pydoc-topic"

TOPIC_GROUPS: Dict[str, Tuple[str, ...]] = {
    "builtin-types": ("formatstrings", "string-methods", "truth", "typesfunctions", "typesmapping", "typesmethods",
                      "typesmodules", "typesseq", "typesseq-mutable"),
    "data-model": ("attribute-access", "callable-types", "context-managers", "customization", "numeric-types", "objects",
                   "sequence-types", "specialattrs", "specialnames", "types"),
    "expressions": ("atom-identifiers", "atom-literals", "attribute-references", "await", "binary", "bitwise", "booleans",
                    "calls", "comparisons", "conversions", "dict", "exprlists", "in", "lambda", "lists", "operator-summary",
                    "power", "shifting", "slicings", "subscriptions", "unary"),
    "statements": ("assert", "assignment", "async", "augassign", "break", "class", "compound", "continue", "del", "for",
                   "function", "global", "if", "import", "nonlocal", "pass", "raise", "return", "try", "while", "with", "yield"),
}
"""Label -> the help topics whose paragraphs carry it (topics a Python lacks are skipped)."""

MIN_CHARS = 120
"""Shorter blocks are mostly headings, signatures and one-line remarks, which say little about their group."""


def _paragraphs(text: str) -> Iterator[str]:
    """The prose paragraphs of one topic, whitespace collapsed."""
    for block in text.split("\n\n"):
        paragraph = " ".join(block.split())
        # reST headings are underlined with '*' or '='; '>>>' opens an interpreter session.
        if len(paragraph) >= MIN_CHARS and not paragraph.startswith(">>>") and "***" not in paragraph and "===" not in paragraph:
            yield paragraph


def pydoc_topic_examples() -> List[Tuple[str, str]]:
    """(text, label) pairs, labels in sorted order, each label the same number of times.

    A paragraph found in the topics of two groups (the reference repeats some) is left out: it has no one answer.
    """
    texts = dict(pydoc_topics())
    labels_of: Dict[str, set] = {}
    order: Dict[str, List[str]] = {label: [] for label in TOPIC_GROUPS}
    for label, keys in TOPIC_GROUPS.items():
        for key in keys:
            for paragraph in _paragraphs(texts.get(key, "")):
                if paragraph not in labels_of:
                    order[label].append(paragraph)
                labels_of.setdefault(paragraph, set()).add(label)
    unique = {label: [p for p in paragraphs if len(labels_of[p]) == 1] for label, paragraphs in order.items()}
    per_label = min(len(paragraphs) for paragraphs in unique.values())
    examples = []
    for label in sorted(unique):
        paragraphs = unique[label]
        # Evenly spaced over the group, so every topic of it is represented, not just the first ones.
        for index in np.linspace(0, len(paragraphs) - 1, per_label).round().astype(int):
            examples.append((paragraphs[index], label))
    return examples
