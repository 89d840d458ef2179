"""The deterministic sample order, independent of the data-parallel size.

Training reads one endless stream of samples: stream position ``k`` is sample
``permutation(epoch=k // N)[k % N]``, each epoch freshly shuffled from
``(seed, epoch)``. A global batch is the stream slice ``[consumed, consumed +
global_batch)``, cut into micro-batches by (accumulation step, dp rank), so the
same samples make up each optimizer step whatever the data-parallel size, and
a resumed run needs only ``consumed``. A mixture of corpora maps its stream
the same way, through its blend (``raylm.data.blend.BlendOrder``).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Union

import numpy as np


class StreamOrder:
    """Which dataset index each position of the endless training stream reads (``index_at``),
    and how a global batch of that stream is cut among ranks."""

    def index_at(self, position: int) -> int:
        raise NotImplementedError

    def consumed_by_source(self, consumed: int) -> Dict[str, int]:
        """Samples each source of a mixture gave to the first ``consumed`` positions; empty for one source."""
        return {}

    def micro_batch_indices(self, consumed: int, global_batch: int, dp_rank: int, dp_size: int, micro_batch: int, accum_step: int) -> List[int]:
        """Dataset indices of rank ``dp_rank``'s ``accum_step``-th micro-batch of the global batch starting at ``consumed``."""
        accum_steps, remainder = divmod(global_batch, dp_size * micro_batch)
        if remainder or accum_steps < 1:
            raise ValueError(f"global_batch={global_batch} must be a multiple of dp_size={dp_size} x micro_batch={micro_batch}")
        if not 0 <= accum_step < accum_steps:
            raise ValueError(f"accum_step={accum_step} out of range [0, {accum_steps})")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} out of range [0, {dp_size})")
        start = consumed + (accum_step * dp_size + dp_rank) * micro_batch
        return [self.index_at(position) for position in range(start, start + micro_batch)]


class SampleOrder(StreamOrder):
    """One dataset's samples, each epoch freshly shuffled; ``seed`` is an int, or several ints
    (a mixture shuffles each source from ``(seed, source)``)."""

    def __init__(self, num_samples: int, seed: Union[int, Sequence[int]]):
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples}; the order needs at least one sample")
        self.num_samples = num_samples
        self.seed = seed
        self._entropy = [seed] if isinstance(seed, int) else list(seed)
        self._permutations: Dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            # A global batch spans at most two epochs (or a few, on tiny sets); keep only recent ones.
            if len(self._permutations) >= 4:
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = np.random.default_rng([*self._entropy, epoch]).permutation(self.num_samples)
        return self._permutations[epoch]

    def index_at(self, position: int) -> int:
        """Dataset index of stream position ``position``."""
        epoch, offset = divmod(position, self.num_samples)
        return int(self._permutation(epoch)[offset])


def eval_indices(num_samples: int, batches: int, dp_rank: int, dp_size: int, micro_batch: int) -> List[List[int]]:
    """Rank ``dp_rank``'s evaluation micro-batches: the same fixed samples at every evaluation.

    The first ``batches * dp_size * micro_batch`` samples of the split, wrapping
    around when the split is smaller.
    """
    return [
        [(position + j) % num_samples for j in range(micro_batch)]
        for position in ((batch * dp_size + dp_rank) * micro_batch for batch in range(batches))
    ]
