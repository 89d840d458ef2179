"""Supervised fine-tuning examples: conversations as fixed-length rows with a loss mask.

Each example fills one row of ``seq_len`` tokens (padded with ``<|pad|>``, so
attention never crosses examples). Targets are -100, which the loss ignores,
everywhere the model is not asked to produce the token: prompts and padding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from raylm.data.chat import Message, check_messages, tokenize_chat
from raylm.data.corpus import iter_jsonl, pydoc_topics
from raylm.data.meta import invalidate, write_meta
from raylm.data.indexed import token_dtype
from raylm.data.split import held_out_mask
from raylm.data.tokenizer import Tokenizer
from raylm.errors import UserError

BUILTIN_PYDOC_SFT = "builtin:pydoc-sft"
IGNORE_INDEX = -100
"""Target value torch's cross-entropy skips."""

ANSWER_CHARS = 400
"""Length of each built-in answer, cut back to the last whitespace."""

Conversation = List[Message]


def _cut_at_whitespace(text: str, limit: int) -> Tuple[str, str]:
    """(head, rest): head is at most ``limit`` characters and ends before whitespace where possible."""
    if len(text) <= limit:
        return text, ""
    cut = max(text.rfind(space, 0, limit + 1) for space in " \n\t")
    if cut <= 0:
        cut = limit
    return text[:cut].rstrip(), text[cut:].lstrip()


def _pydoc_conversations() -> Iterator[Conversation]:
    """Per help topic: "explain X" answered by its opening, then (when the topic goes on) a follow-up turn."""
    for key, text in pydoc_topics():
        first, rest = _cut_at_whitespace(text.strip(), ANSWER_CHARS)
        question = {"role": "user", "content": f"Explain the Python topic '{key}'."}
        answer = {"role": "assistant", "content": first}
        yield [question, answer]
        if rest:
            more, _ = _cut_at_whitespace(rest, ANSWER_CHARS)
            yield [question, answer, {"role": "user", "content": "Tell me more."}, {"role": "assistant", "content": more}]


def _jsonl_conversations(path: Path) -> Iterator[Conversation]:
    for line_number, record in iter_jsonl(path):
        where = f"{path}:{line_number}"
        if "messages" in record:
            messages = record["messages"]
        elif isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
            messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
        else:
            raise UserError(f"{where}: expected string fields 'prompt' and 'response', or 'messages' (a list of {{role, content}})")
        try:
            check_messages(messages)
        except ValueError as e:
            raise UserError(f"{where}: {e}") from e
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: no assistant message, so nothing to learn; add the response")
        yield [{"role": m["role"], "content": m["content"]} for m in messages]


def iter_sft_examples(source: str) -> Iterator[Conversation]:
    """Conversations from ``builtin:pydoc-sft`` or a .jsonl of prompt/response or messages records."""
    if source == BUILTIN_PYDOC_SFT:
        yield from _pydoc_conversations()
        return
    path = Path(source).expanduser()
    if path.suffix != ".jsonl":
        raise UserError(f"data.source={source!r} is not an sft source; use {BUILTIN_PYDOC_SFT} or a .jsonl of prompt/response or messages")
    if not path.is_file():
        raise UserError(f"data.source {source!r} not found; give an existing .jsonl file")
    empty = True
    for conversation in _jsonl_conversations(path):
        empty = False
        yield conversation
    if empty:
        raise UserError(f"data.source {path} has no examples; add one JSON object per line")


def _row(ids: List[int], loss_mask: List[int], seq_len: int, pad_id: int) -> Tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of one example, already cut to at most seq_len + 1 tokens."""
    inputs = np.full(seq_len, pad_id, dtype=np.int64)
    targets = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    n = len(ids) - 1
    inputs[:n] = ids[:-1]
    # Target j is token j+1: trained only where that token is.
    targets[:n] = np.where(np.asarray(loss_mask[1:], dtype=bool), ids[1:], IGNORE_INDEX)
    return inputs, targets


def _split_paths(out_dir: Path, split: str) -> Tuple[Path, Path]:
    return out_dir / f"{split}_inputs.npy", out_dir / f"{split}_targets.npy"


def save_rows(out_dir: Path, split: str, rows: Sequence[Tuple[np.ndarray, np.ndarray]], dtype: np.dtype) -> None:
    """Write one split's (inputs, targets) rows as ``SftRows`` reads them: token ids in ``dtype``, targets int32."""
    inputs_path, targets_path = _split_paths(out_dir, split)
    np.save(inputs_path, np.stack([inputs for inputs, _ in rows]).astype(dtype))
    np.save(targets_path, np.stack([targets for _, targets in rows]).astype(np.int32))


def build_sft(
    examples: Iterable[Conversation],
    tokenizer: Tokenizer,
    out_dir: Union[str, Path],
    seq_len: int,
    val_fraction: float,
    seed: int,
    recipe: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Write {train,val}_{inputs,targets}.npy and (last) meta.json; ``recipe`` (e.g. the source) is added to meta.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    invalidate(out_dir)
    rows = []
    truncated = without_target = 0
    for conversation in examples:
        ids, loss_mask = tokenize_chat(tokenizer, conversation)
        if len(ids) > seq_len + 1:
            truncated += 1
            ids, loss_mask = ids[: seq_len + 1], loss_mask[: seq_len + 1]
        if not any(loss_mask[1:]):
            # The response starts beyond the row: the example would teach nothing.
            without_target += 1
            continue
        rows.append(_row(ids, loss_mask, seq_len, tokenizer.pad_id))
    if len(rows) < 2:
        raise UserError(
            f"only {len(rows)} sft example(s) fit (another {without_target} have their response beyond "
            f"model.max_seq_len={seq_len}); a train and a val split need at least 2: add examples or raise model.max_seq_len"
        )
    held_out = held_out_mask(np.ones(len(rows)), val_fraction, seed)
    dtype = token_dtype(tokenizer.vocab_size)
    for split, mask in (("train", ~held_out), ("val", held_out)):
        save_rows(out_dir, split, [row for row, keep in zip(rows, mask) if keep], dtype)
    meta = {
        **(recipe or {}),
        "format": "sft",
        "seq_len": seq_len,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_kind": tokenizer.kind,
        "tokenizer_sha256": tokenizer.fingerprint,
        "val_fraction": val_fraction,
        "seed": seed,
        "train_examples": int((~held_out).sum()),
        "val_examples": int(held_out.sum()),
        "truncated_examples": truncated,
        "dropped_examples_without_target": without_target,
    }
    write_meta(out_dir, meta)
    return meta


class SftRows:
    """One split of an sft dataset, with the same interface as ``PackedTokens``."""

    def __init__(self, out_dir: Union[str, Path], split: str):
        inputs_path, targets_path = _split_paths(Path(out_dir), split)
        self.inputs = np.load(inputs_path, mmap_mode="r")
        self.targets = np.load(targets_path, mmap_mode="r")
        self.num_samples, self.seq_len = self.inputs.shape

    def sample(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        return self.inputs[index].astype(np.int64), self.targets[index].astype(np.int64)

    def batch(self, indices: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each int64 of shape (B, T)."""
        rows = np.asarray(indices, dtype=np.int64)
        return self.inputs[rows].astype(np.int64), self.targets[rows].astype(np.int64)

