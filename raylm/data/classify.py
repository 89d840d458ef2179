"""Classification examples: a text and a string label, as fixed-length rows whose one target is the label.

A row is the text's tokens (its first ``seq_len - 1``) and <|endoftext|>,
padded with <|pad|>; its targets are -100 (ignored) everywhere but at that
<|endoftext|>, which holds the label's index. That is the position whose logits
``LlamaClassifier`` reads (its last non-pad token), so the loss is the sft one
over these targets, and the rows are stored and read as sft rows are
(``SftRows``). The same token at the end of every text gives the head one fixed
query to gather the text through (GPT's recipe for classification): on the
built-in task the tiny model, from scratch at lr 3e-3, reached 0.43 held-out
accuracy after 100 steps this way, 0.33 reading each text's own last token.

The label set is the sorted set of the training split's labels, kept in the
dataset's meta.json and, after training, with the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from raylm.data.corpus import JSONL_SUFFIXES, iter_jsonl, suffix_of
from raylm.data.indexed import token_dtype
from raylm.data.meta import invalidate, read_meta, write_meta
from raylm.data.pydoc_topic import BUILTIN_PYDOC_TOPIC, pydoc_topic_examples
from raylm.data.sft import IGNORE_INDEX, SftRows, save_rows
from raylm.data.split import held_out_mask
from raylm.data.tokenizer import EOS, Tokenizer
from raylm.errors import UserError

LABELS_KEY = "labels"
"""Where meta.json (and a classifier's config.json) keeps the label names, index order."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    where: str
    """What an error about this example names: ``file:line``, or the built-in task and its index."""


def _jsonl_examples(path: Path, text_field: str, label_field: str) -> Iterator[Example]:
    for line_number, record in iter_jsonl(path):
        where = f"{path}:{line_number}"
        text, label = record.get(text_field), record.get(label_field)
        if not isinstance(text, str) or not isinstance(label, str):
            raise UserError(f"{where}: expected string fields '{text_field}' (set data.text_field) and '{label_field}' "
                            f"(set data.label_field), found {', '.join(record) or 'no fields'}; write labels as strings")
        if not text.strip() or not label.strip():
            raise UserError(f"{where}: empty '{text_field if not text.strip() else label_field}'; give every example a text and a label")
        yield Example(text, label, where)


def iter_classify_examples(source: str, text_field: str, label_field: str) -> Iterator[Example]:
    """Examples of ``builtin:pydoc-topic`` or a .jsonl / .jsonl.gz of {text, label} objects."""
    if source == BUILTIN_PYDOC_TOPIC:
        for index, (text, label) in enumerate(pydoc_topic_examples()):
            yield Example(text, label, f"{BUILTIN_PYDOC_TOPIC} example {index}")
        return
    path = Path(source).expanduser()
    if suffix_of(path) not in JSONL_SUFFIXES:
        raise UserError(f"data.source={source!r} is not a classify source; use {BUILTIN_PYDOC_TOPIC} or a .jsonl of "
                        "{\"text\": ..., \"label\": ...} objects")
    if not path.is_file():
        raise UserError(f"data.source {source!r} not found; give an existing .jsonl file")
    empty = True
    for example in _jsonl_examples(path, text_field, label_field):
        empty = False
        yield example
    if empty:
        raise UserError(f"data.source {path} has no examples; add one JSON object per line")


def classifier_input(tokenizer: Tokenizer, text: str, seq_len: int) -> List[int]:
    """The ids a classifier reads for ``text``: its first ``seq_len - 1`` tokens and <|endoftext|>."""
    return tokenizer.encode(text)[: seq_len - 1] + [tokenizer.eos_id]


def end_token_on_encode(tokenizer_json: Path) -> None:
    """Make a tokenizer.json append <|endoftext|> whenever special tokens are added (Hugging Face's default when
    encoding), so that an exported classifier sees a text as it was trained to. raylm's own encoding adds none."""
    from tokenizers import Tokenizer as HFTokenizer, processors

    hf = HFTokenizer.from_file(str(tokenizer_json))
    hf.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, hf.token_to_id(EOS))])
    hf.save(str(tokenizer_json))


def encode_examples(examples: Sequence[Example], labels: Sequence[str], tokenizer: Tokenizer, seq_len: int,
                    unknown_label_fix: str) -> List[Tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) rows (each int64 (seq_len,)); an example whose label is not in ``labels`` is refused with
    ``unknown_label_fix``."""
    index_of = {label: index for index, label in enumerate(labels)}
    rows = []
    for example in examples:
        if example.label not in index_of:
            raise UserError(f"{example.where}: label {example.label!r} is not one of the classifier's labels "
                            f"({', '.join(labels)}); {unknown_label_fix}")
        ids = classifier_input(tokenizer, example.text, seq_len)
        inputs = np.full(seq_len, tokenizer.pad_id, dtype=np.int64)
        inputs[: len(ids)] = ids
        targets = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
        targets[len(ids) - 1] = index_of[example.label]  # the closing <|endoftext|>: the position the classifier reads
        rows.append((inputs, targets))
    return rows


def training_labels(examples: Iterable[Example], source: str) -> List[str]:
    """The sorted label set of the training examples; a classifier needs two labels at least."""
    labels = sorted({example.label for example in examples})
    if len(labels) < 2:
        raise UserError(f"data.source {source} has only the label {labels[0]!r} in its training split; "
                        "a classifier needs at least two labels: add examples of another")
    return labels


def build_classify(
    examples: Iterable[Example],
    tokenizer: Tokenizer,
    out_dir: Union[str, Path],
    seq_len: int,
    val_fraction: float,
    seed: int,
    recipe: Mapping[str, Any],
) -> Mapping[str, Any]:
    """Write the train and val rows and (last) meta.json with the labels; the split is the sft one (seeded, per example)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    invalidate(out_dir)
    examples = list(examples)
    if len(examples) < 2:
        raise UserError(f"data.source {recipe['source']} has {len(examples)} example(s); a train and a val split need at least 2")
    held_out = held_out_mask(np.ones(len(examples)), val_fraction, seed)
    splits = {"train": [e for e, held in zip(examples, held_out) if not held], "val": [e for e, held in zip(examples, held_out) if held]}
    labels = training_labels(splits["train"], recipe["source"])
    dtype = token_dtype(tokenizer.vocab_size)
    fix = "only the held-out split has it (data.val_fraction of the examples, chosen by train.seed): add training examples of it"
    for split, chosen in splits.items():
        save_rows(out_dir, split, encode_examples(chosen, labels, tokenizer, seq_len, fix), dtype)
    meta = {**recipe, "format": "classify", LABELS_KEY: labels, "train_examples": len(splits["train"]), "val_examples": len(splits["val"])}
    write_meta(out_dir, meta)
    return meta


class ClassifyRows(SftRows):
    """One split of a classify dataset: sft rows whose ``labels`` name the target indices."""

    def __init__(self, out_dir: Union[str, Path], split: str, labels: Optional[Sequence[str]] = None):
        super().__init__(out_dir, split)
        meta = read_meta(Path(out_dir)) if labels is None else {LABELS_KEY: list(labels)}
        if meta is None or LABELS_KEY not in meta:
            raise ValueError(f"{out_dir} has no meta.json with the labels")
        self.labels: List[str] = list(meta[LABELS_KEY])

    def label_indices(self, indices: Sequence[int]) -> np.ndarray:
        """(B,) each row's label index: its one target that is not -100."""
        return self.targets[np.asarray(indices, dtype=np.int64)].max(axis=1).astype(np.int64)
