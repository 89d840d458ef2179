"""Pretraining tokens packed end to end in numpy memmaps (train.bin, val.bin).

Documents are tokenized once, each followed by ``<|endoftext|>``, and held
out whole. A sample is a window of ``seq_len + 1`` tokens; windows do not
overlap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from raylm.data.meta import invalidate, write_meta
from raylm.data.split import held_out_mask
from raylm.data.tokenizer import Tokenizer
from raylm.errors import UserError

SPLITS = ("train", "val")
ENCODE_BATCH_DOCUMENTS = 512
"""Documents handed to the tokenizer at once: big enough to use every core, small enough to stream."""

ALL_TOKENS_FILE = "all.tmp"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _batches(documents: Iterable[str], size: int) -> Iterable[list]:
    batch = []
    for document in documents:
        batch.append(document)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _tokenize_to_file(documents: Iterable[str], tokenizer: Tokenizer, path: Path, dtype: np.dtype) -> np.ndarray:
    """Stream every document's tokens (plus eos) into ``path``; return each document's length."""
    lengths = []
    with open(path, "wb") as f:
        for batch in _batches(documents, ENCODE_BATCH_DOCUMENTS):
            for ids in tokenizer.encode_batch(batch):
                ids.append(tokenizer.eos_id)
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                lengths.append(len(ids))
    return np.asarray(lengths, dtype=np.int64)


def build_packed(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    out_dir: Union[str, Path],
    val_fraction: float,
    seed: int,
    recipe: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Write train.bin, val.bin and (last) meta.json; ``recipe`` (e.g. the source) is added to meta.json for reuse checks."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    invalidate(out_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    all_path = out_dir / ALL_TOKENS_FILE
    lengths = _tokenize_to_file(documents, tokenizer, all_path, dtype)
    if len(lengths) == 0:
        raise UserError("the corpus has no documents; point data.source at text")
    tokens = np.memmap(all_path, dtype=dtype, mode="r")
    ends = np.cumsum(lengths)
    if len(lengths) == 1:
        # One document: hold out its tail instead of a whole document.
        n_val = max(1, int(round(val_fraction * len(tokens))))
        bounds = {"train": [(0, len(tokens) - n_val)], "val": [(len(tokens) - n_val, len(tokens))]}
        documents_per_split = {"train": 1, "val": 1}
    else:
        held_out = held_out_mask(lengths, val_fraction, seed)
        starts = ends - lengths
        bounds = {split: list(zip(starts[mask], ends[mask])) for split, mask in (("train", ~held_out), ("val", held_out))}
        documents_per_split = {"train": int((~held_out).sum()), "val": int(held_out.sum())}
    for split in SPLITS:
        with open(out_dir / f"{split}.bin", "wb") as f:
            for start, end in bounds[split]:
                f.write(tokens[start:end].tobytes())
    del tokens
    all_path.unlink()
    meta = {
        **(recipe or {}),
        "format": "packed",
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_kind": tokenizer.kind,
        "tokenizer_sha256": tokenizer.fingerprint,
        "val_fraction": val_fraction,
        "seed": seed,
        **{f"{split}_tokens": int(sum(end - start for start, end in bounds[split])) for split in SPLITS},
        **{f"{split}_documents": documents_per_split[split] for split in SPLITS},
    }
    write_meta(out_dir, meta)
    return meta


class PackedTokens:
    """Non-overlapping ``seq_len + 1`` token windows of one split, read from its memmap."""

    def __init__(self, path_bin: Union[str, Path], dtype: Union[str, np.dtype], seq_len: int):
        self.path = Path(path_bin)
        self.dtype = np.dtype(dtype)
        self.seq_len = seq_len
        n_tokens = self.path.stat().st_size // self.dtype.itemsize
        self.num_samples = (n_tokens - 1) // seq_len if n_tokens else 0
        if self.num_samples < 1:
            split = self.path.stem
            raise UserError(
                f"the {split} split ({self.path}) has {n_tokens} tokens, fewer than one sequence of {seq_len}+1; "
                f"lower model.max_seq_len, use a bigger data.source{' or raise data.val_fraction' if split == 'val' else ' or lower data.val_fraction'}"
            )
        # np.memmap cannot map an empty file; num_samples >= 1 guarantees it is not.
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r")

    def sample(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """(input_ids, targets) of window ``index``: targets are the inputs shifted by one."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range [0, {self.num_samples})")
        start = index * self.seq_len
        window = self.tokens[start : start + self.seq_len + 1].astype(np.int64)
        return window[:-1], window[1:]

    def batch(self, indices: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each int64 of shape (B, T)."""
        pairs = [self.sample(i) for i in indices]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
