"""Which documents (or examples) are held out for evaluation."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from raylm.errors import UserError


def held_out_mask(sizes: Sequence[int], val_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask over items, True for the held-out ones.

    Items are visited in a seeded random order and held out until their sizes
    reach ``val_fraction`` of the total; with two or more items each split
    gets at least one. A single item is never held out (the caller splits it).
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"data.val_fraction={val_fraction} must be strictly between 0 and 1")
    sizes = np.asarray(sizes, dtype=np.int64)
    mask = np.zeros(len(sizes), dtype=bool)
    if len(sizes) < 2:
        return mask
    order = np.random.default_rng(seed).permutation(len(sizes))
    # The shortest prefix of the shuffled items whose sizes reach the target.
    count = int(np.searchsorted(np.cumsum(sizes[order]), val_fraction * sizes.sum())) + 1
    mask[order[: min(max(count, 1), len(sizes) - 1)]] = True
    return mask
