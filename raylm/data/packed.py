"""Pretraining samples read straight from a prepared dataset's memory-mapped shards.

The shards' documents (each ending in ``<|endoftext|>``) form one token
stream; whole documents are held out for evaluation. Each split is a list of
*segments* ``(shard, first token, end token)``, consecutive documents of one
shard merged, so a split costs memory per held-out run of documents, never per
token. A sample is a window of ``seq_len + 1`` tokens of a split's stream;
windows do not overlap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np

from raylm.data.indexed import IndexedShard
from raylm.data.split import held_out_mask
from raylm.errors import UserError

SPLITS = ("train", "val")


def _runs(shard_ids: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """(n, 3) segments: documents adjacent in the same shard merged into one."""
    if len(starts) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    new = np.ones(len(starts), dtype=bool)
    new[1:] = (shard_ids[1:] != shard_ids[:-1]) | (starts[1:] != ends[:-1])
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, len(starts) - 1)
    return np.stack([shard_ids[first], starts[first], ends[last]], axis=1).astype(np.int64)


def split_segments(shards: Sequence[IndexedShard], val_fraction: float, seed: int) -> Dict[str, np.ndarray]:
    """Each split's segments: seeded whole documents held out (``split.held_out_mask``),
    or the tail of the only document when there is one."""
    lengths = np.concatenate([s.lengths.astype(np.int64) for s in shards])
    shard_ids = np.concatenate([np.full(len(s.lengths), i, dtype=np.int64) for i, s in enumerate(shards)])
    ends = np.concatenate([np.cumsum(s.lengths, dtype=np.int64) for s in shards])
    starts = ends - lengths
    if len(lengths) == 1:
        n_val = max(1, int(round(val_fraction * lengths[0])))
        cut = ends[0] - n_val
        return {"train": np.array([[shard_ids[0], 0, cut]]), "val": np.array([[shard_ids[0], cut, ends[0]]])}
    held_out = held_out_mask(lengths, val_fraction, seed)
    return {split: _runs(shard_ids[mask], starts[mask], ends[mask]) for split, mask in (("train", ~held_out), ("val", held_out))}


class Samples:
    """A dataset of (input_ids, targets) samples: ``num_samples`` of them, read one by one with ``sample``."""

    num_samples: int

    def sample(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def batch(self, indices: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each int64 of shape (B, T)."""
        pairs = [self.sample(i) for i in indices]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


class PackedTokens(Samples):
    """Non-overlapping ``seq_len + 1`` token windows of one split's segments of the shards."""

    def __init__(self, shard_prefixes: Sequence[Union[str, Path]], segments: np.ndarray, seq_len: int, split: str):
        self.prefixes = [Path(p) for p in shard_prefixes]
        self.segments = np.asarray(segments, dtype=np.int64).reshape(-1, 3)
        self.seq_len = seq_len
        self.seg_ends = np.cumsum(self.segments[:, 2] - self.segments[:, 1])
        n_tokens = int(self.seg_ends[-1]) if len(self.seg_ends) else 0
        self.num_tokens = n_tokens
        self.num_samples = (n_tokens - 1) // seq_len if n_tokens else 0
        if self.num_samples < 1:
            where = self.prefixes[0].parent.parent if self.prefixes else "the dataset"
            raise UserError(
                f"the {split} split (of {where}) has {n_tokens} tokens, fewer than one sequence of {seq_len}+1; "
                f"lower model.max_seq_len, use a bigger data.source{' or raise data.val_fraction' if split == 'val' else ' or lower data.val_fraction'}"
            )
        self._shards: Dict[int, np.ndarray] = {}

    def _tokens(self, shard: int) -> np.ndarray:
        # Opened on first use: a run over thousands of shards maps only those it reads.
        if shard not in self._shards:
            self._shards[shard] = IndexedShard(self.prefixes[shard]).tokens
        return self._shards[shard]

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the split's stream, as int64."""
        pieces: List[np.ndarray] = []
        segment = int(np.searchsorted(self.seg_ends, start, side="right"))
        while length > 0:
            shard, first, end = self.segments[segment]
            offset = start - (int(self.seg_ends[segment]) - (end - first))
            take = min(length, int(end - first - offset))
            pieces.append(self._tokens(int(shard))[first + offset : first + offset + take])
            start, length, segment = start + take, length - take, segment + 1
        return np.concatenate(pieces).astype(np.int64)

    def sample(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """(input_ids, targets) of window ``index``: targets are the inputs shifted by one."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range [0, {self.num_samples})")
        window = self.window(index * self.seq_len, self.seq_len + 1)
        return window[:-1], window[1:]
