"""A mixture's datasets: its sources' samples as one dataset, and its held-out split read in blend order."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

import numpy as np

from raylm.data.blend import BlendOrder, BlendSource
from raylm.data.packed import PackedTokens, Samples


class MixedTokens(Samples):
    """The sources' samples back to back: global index = the source's offset + the sample's index in it.

    ``sources`` and ``blend_root`` are what the stage's training order blends
    (``raylm.data.training_order``); the order decides which indices are read.
    """

    def __init__(self, readers: Sequence[PackedTokens], sources: Sequence[BlendSource], blend_root: Path):
        self.readers = list(readers)
        self.sources = list(sources)
        self.blend_root = Path(blend_root)
        self.seq_len = self.readers[0].seq_len
        self.offsets = np.cumsum([0, *(reader.num_samples for reader in self.readers)])
        self.num_samples = int(self.offsets[-1])

    def sample(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range [0, {self.num_samples})")
        source = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.readers[source].sample(index - int(self.offsets[source]))


class BlendedSamples(Samples):
    """The positions of a blend as a dataset, sample ``k`` being what position ``k`` reads: a mixture's
    held-out split, so that evaluation (the split's first samples) weighs the sources as training does."""

    def __init__(self, samples: MixedTokens, order: BlendOrder):
        self.samples = samples
        self.order = order
        self.num_samples = order.length

    def sample(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        return self.samples.sample(self.order.index_at(index))
