"""Megatron-LM's indexed dataset: a ``.bin`` of token ids and its ``.idx`` index.

The layout follows ``megatron/core/datasets/indexed_dataset.py`` (so Megatron,
NeMo and datatrove read raylm's shards, and raylm reads theirs): the ``.idx``
is the magic ``MMIDIDX\\x00\\x00``, ``<Q`` version 1, ``<B`` dtype code, ``<Q``
sequence count, ``<Q`` document-index count (documents + 1), then int32
sequence lengths, int64 byte offsets of each sequence in ``.bin`` and int64
document indices ``[0, ..., sequence count]``. raylm stores one document per
sequence, its ``<|endoftext|>`` included.
"""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path
from typing import BinaryIO, Sequence, Union

import numpy as np

from raylm.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
               np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8}
HEADER = struct.Struct("<9sQBQQ")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else int32 (Megatron has no uint32 code)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


MAX_SEQUENCE_TOKENS = 2**31 - 1
"""The index stores each sequence's length as an int32."""


class ShardWriter:
    """Streams documents into ``<prefix>.bin`` and writes ``<prefix>.idx`` at close.

    A document's ids come in any number of ``extend`` calls; ``end_document`` ends it. Both files are
    written under temporary names and renamed into place, ``.idx`` last, so a crash never leaves a pair
    that looks complete.
    """

    def __init__(self, prefix: Union[str, Path], dtype: np.dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.lengths = array("q")  # 8 bytes a document, not a Python int's 28 plus a list slot
        self._document_tokens = 0
        self._bin: BinaryIO = open(self._tmp(".bin"), "wb")

    def _tmp(self, suffix: str) -> Path:
        return self.prefix.with_name(self.prefix.name + suffix + ".tmp")

    def extend(self, ids: Sequence[int]) -> None:
        """Append ids to the current document."""
        self._bin.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self._document_tokens += len(ids)

    def end_document(self) -> None:
        if self._document_tokens > MAX_SEQUENCE_TOKENS:
            raise UserError(f"{self.prefix}: a document of {self._document_tokens} tokens is more than Megatron's index holds ({MAX_SEQUENCE_TOKENS}); split its input into smaller files")
        self.lengths.append(self._document_tokens)
        self._document_tokens = 0

    def close(self) -> None:
        self._bin.close()
        lengths = np.asarray(self.lengths).astype(np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=pointers[1:])
        pointers *= self.dtype.itemsize
        with open(self._tmp(".idx"), "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, DTYPE_CODES[self.dtype], len(lengths), len(lengths) + 1))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
        os.replace(self._tmp(".bin"), bin_path(self.prefix))
        os.replace(self._tmp(".idx"), idx_path(self.prefix))

    def abort(self) -> None:
        self._bin.close()
        self._tmp(".bin").unlink(missing_ok=True)


def bin_path(prefix: Union[str, Path]) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: Union[str, Path]) -> Path:
    return Path(f"{prefix}.idx")


class IndexedShard:
    """One ``.bin``/``.idx`` pair, memory-mapped: ``tokens`` and per-document ``lengths``."""

    def __init__(self, prefix: Union[str, Path]):
        self.prefix = Path(prefix)
        path = idx_path(prefix)
        fix = "delete it and run 'raylm data prepare' again"
        try:
            with open(path, "rb") as f:
                magic, version, code, sequences, doc_indices = HEADER.unpack(f.read(HEADER.size))
        except (OSError, struct.error) as err:
            raise UserError(f"{path} is missing or truncated ({err}); {fix}") from None
        codes = {c: d for d, c in DTYPE_CODES.items()}
        if magic != MAGIC or version != VERSION or code not in codes:
            raise UserError(f"{path} is not a Megatron indexed dataset index (magic, version or dtype code); {fix}")
        self.dtype = codes[code]
        index = np.memmap(path, mode="r", dtype=np.uint8, offset=HEADER.size)
        if index.size < sequences * 12 + doc_indices * 8:
            raise UserError(f"{path} is truncated; {fix}")
        # Per sequence: raylm stores one document per sequence; a Megatron dataset split into sentences
        # has several per document, which still concatenate to the same token stream.
        self.lengths = index[: sequences * 4].view(np.int32)
        n_tokens = bin_path(prefix).stat().st_size // self.dtype.itemsize if bin_path(prefix).exists() else -1
        if n_tokens != int(self.lengths.sum(dtype=np.int64)):
            raise UserError(f"{bin_path(prefix)} does not hold the {int(self.lengths.sum(dtype=np.int64))} tokens its index lists; {fix}")
        self.num_tokens = n_tokens
        # np.memmap cannot map an empty file.
        self.tokens = np.memmap(bin_path(prefix), mode="r", dtype=self.dtype) if n_tokens else np.zeros(0, self.dtype)
