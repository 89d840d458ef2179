"""The blend of a mixture: which source, and which of its samples, each stream position reads.

**Interleave.** Position ``t`` (1-based) goes to a source by Tijdeman's rule for
the chairman assignment problem (Discrete Mathematics 32, 1980): among the
sources that may take a sample now without getting more than ``slack`` ahead of
their share (``w_i t - c_i >= 1 - slack``), the one that would first fall more
than ``slack`` behind it (the smallest ``(c_i + slack) / w_i``), ties to the
lowest index. With ``m`` sources of positive weight and ``slack = 1 - 1/(2m - 2)``
this keeps, for every source ``i`` and every prefix of ``N`` positions,

    |c_i(N) - w_i N| <= 1 - 1/(2m - 2)     (1/2 for two sources, < 1 for any m),

where ``c_i(N)`` counts the source's positions among the first ``N`` and the
weights are normalised to sum to 1. For two sources this is exactly Megatron's
blend (each position to the source whose share lags its weight most); with
three or more, Megatron's rule drifts past one sample (1.18 measured for eight
sources), this one does not. A zero weight never draws.

**Within a source** its ``j``-th position reads ``SampleOrder(n_i, (seed, i))``
at ``j``: each pass over its samples freshly shuffled, so a small source wraps
deterministically. The global dataset index is that sample plus the source's
offset in the mixture (``raylm.data.mixture.MixedTokens``).

**Stored, not recomputed.** The rule is sequential (a position's source depends
on every earlier choice), so it is not O(1) per position on the fly: the blend
is computed once, on the driver, in chunks, into two ``.npy`` files (the source
of each position, and its position in that source's own stream) that every rank
memory-maps; a stage of N samples costs N x (1 + 4) bytes on disk (8 past 2^32)
and nothing in memory but the pages it reads. It is cached under a hash of what
it is a function of (the sources' weights, sample counts and shards, the seed,
the sequence length and the length), so a rerun opens it and any change builds
a new one. The first ``N`` positions do not depend on the length, so a longer
stage extends the same stream.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from raylm.data.meta import invalidate, matches, read_meta, write_meta
from raylm.data.sampler import SampleOrder, StreamOrder

SOURCE_IDS = "source_ids.npy"
SOURCE_POSITIONS = "source_positions.npy"
CHUNK = 1 << 20
"""Positions computed between two writes to the memory-mapped files."""
ROUNDING = 1e-6
"""Slack for float rounding of ``w_i t`` (below 1e-7 for any stream under 10^9 positions)."""
TIE = 1e-13
"""Deadlines this close (relatively) are equal: 0.7 and 0.3 are not exact in binary, their ties should still go to the lower index."""


@dataclass(frozen=True)
class BlendSource:
    """What the blend needs of one source."""

    name: str
    """Its path as configured (the key of ``consumed_by_source``)."""
    weight: float
    num_samples: int
    fingerprint: str
    """What its samples are made of (its shards and split); another fingerprint is another blend."""


def interleave(weights: Sequence[float], source_ids: np.ndarray, positions: np.ndarray) -> None:
    """Fill ``source_ids[t]`` and ``positions[t]`` (how many earlier positions went to that source) for every ``t``."""
    total = float(sum(weights))
    shares = [w / total for w in weights]
    active = [i for i, share in enumerate(shares) if share > 0]
    slack = 1 - 1 / (2 * (len(active) - 1)) if len(active) > 1 else 0.0
    release = 1 - slack - ROUNDING
    counts = [0] * len(shares)
    length = len(source_ids)
    for start in range(0, length, CHUNK):
        chunk_ids: List[int] = []
        chunk_positions: List[int] = []
        for t in range(start + 1, min(length, start + CHUNK) + 1):
            # Some source is always free to draw: the one lagging most lags by >= 1/m >= 1 - slack.
            chosen, earliest = active[0], math.inf
            for i in active:
                if shares[i] * t - counts[i] >= release:
                    deadline = (counts[i] + slack) / shares[i]
                    if deadline < earliest * (1 - TIE):
                        chosen, earliest = i, deadline
            chunk_ids.append(chosen)
            chunk_positions.append(counts[chosen])
            counts[chosen] += 1
        source_ids[start : start + len(chunk_ids)] = chunk_ids
        positions[start : start + len(chunk_ids)] = chunk_positions


class BlendOrder(StreamOrder):
    """The stream of a mixture: position -> global index of the sample it reads (see the module doc)."""

    def __init__(self, directory: Path, sources: Sequence[BlendSource], seed: int):
        self.sources = list(sources)
        self.source_ids = np.load(Path(directory) / SOURCE_IDS, mmap_mode="r")
        self.positions = np.load(Path(directory) / SOURCE_POSITIONS, mmap_mode="r")
        self.length = len(self.source_ids)
        self._orders = [SampleOrder(source.num_samples, (seed, i)) for i, source in enumerate(self.sources)]
        self._offsets = np.concatenate([[0], np.cumsum([source.num_samples for source in self.sources])]).tolist()

    def index_at(self, position: int) -> int:
        if not 0 <= position < self.length:
            raise IndexError(f"stream position {position} is outside the blend's {self.length} positions")
        source = int(self.source_ids[position])
        return self._offsets[source] + self._orders[source].index_at(int(self.positions[position]))

    def consumed_by_source(self, consumed: int) -> Dict[str, int]:
        counts = np.bincount(self.source_ids[:consumed], minlength=len(self.sources))
        return {source.name: int(count) for source, count in zip(self.sources, counts)}


def cached_blend(root: Path, split: str, sources: Sequence[BlendSource], seed: int, seq_len: int, length: int) -> BlendOrder:
    """The blend of ``length`` positions, from ``root/<split>-<hash of its inputs>/`` (built there first if missing)."""
    recipe = {"sources": [asdict(source) for source in sources], "seed": seed, "seq_len": seq_len, "length": length}
    directory = Path(root) / f"{split}-{hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]}"
    if not matches(read_meta(directory), recipe):
        directory.mkdir(parents=True, exist_ok=True)
        invalidate(directory)
        ids = np.lib.format.open_memmap(directory / SOURCE_IDS, mode="w+", dtype=np.min_scalar_type(len(sources) - 1), shape=(length,))
        positions = np.lib.format.open_memmap(directory / SOURCE_POSITIONS, mode="w+", dtype=np.min_scalar_type(max(length - 1, 0)), shape=(length,))
        interleave([source.weight for source in sources], ids, positions)
        ids.flush()
        positions.flush()
        del ids, positions
        write_meta(directory, recipe)
        # Blends of earlier inputs are never read again (a stage reads one): they only hold disk.
        for stale in Path(root).glob(f"{split}-*"):
            if stale != directory:
                shutil.rmtree(stale, ignore_errors=True)
    return BlendOrder(directory, sources, seed)
