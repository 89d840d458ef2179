"""raylm.data.blend: the interleave's bound, its purity and cache, small sources wrapping, any dp size."""

from __future__ import annotations

import numpy as np
import pytest

from raylm.data.blend import SOURCE_IDS, BlendSource, cached_blend, interleave

WEIGHT_SETS = [
    [0.7, 0.3],
    [0.5, 0.5],
    [0.999, 0.001],
    [1, 1, 1],
    [0.5, 0.25, 0.125, 0.125],
    [0.6, 0.3, 0.1, 0.0, 0.0],
    [3.0],
    list(np.random.default_rng(0).random(8) ** 3),  # eight uneven sources: where Megatron's greedy drifts past 1
]


def blended(weights, length: int) -> np.ndarray:
    ids = np.empty(length, dtype=np.uint8)
    interleave(weights, ids, np.empty(length, dtype=np.uint32))
    return ids


def prefix_counts(ids: np.ndarray, sources: int) -> np.ndarray:
    """counts[N - 1, i]: positions of source i among the first N."""
    return np.cumsum(np.eye(sources, dtype=np.int64)[ids], axis=0)


def sources_of(*sizes: int, weights=None, fingerprint: str = "f") -> list:
    weights = weights or [1.0] * len(sizes)
    return [BlendSource(f"s{i}", w, n, fingerprint) for i, (w, n) in enumerate(zip(weights, sizes))]


@pytest.mark.parametrize("weights", WEIGHT_SETS, ids=lambda w: f"{len(w)}-sources")
def test_every_prefix_draws_each_source_within_the_bound(weights):
    """|c_i(N) - w_i N| <= 1 - 1/(2m - 2) for every prefix N (m sources of positive weight): under one sample."""
    length = 20_000
    counts = prefix_counts(blended(weights, length), len(weights))
    shares = np.asarray(weights, dtype=float) / sum(weights)
    deviation = np.abs(counts - np.outer(np.arange(1, length + 1), shares)).max()
    m = int((shares > 0).sum())
    bound = 1 - 1 / (2 * m - 2) if m > 1 else 0.0
    assert deviation <= bound + 1e-6 and bound < 1
    assert (counts[-1][shares == 0] == 0).all()  # a zero weight never draws


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.5], [0.2, 0.8], [1 / 3, 2 / 3], [0.999, 0.001]])
def test_two_sources_interleave_as_megatrons_blend(weights):
    """Megatron's rule (the source whose share lags its weight most, ties to the lower index) gives the same positions."""
    counts, expected = [0, 0], []
    for t in range(1, 5001):
        lags = [w / sum(weights) * t - c for w, c in zip(weights, counts)]
        chosen = 0 if lags[0] >= lags[1] - 1e-9 else 1  # a tie up to float rounding
        expected.append(chosen)
        counts[chosen] += 1
    assert blended(weights, 5000).tolist() == expected


def test_each_position_knows_how_many_earlier_ones_its_source_had():
    ids, positions = np.empty(1000, np.uint8), np.empty(1000, np.uint32)
    interleave([0.6, 0.4], ids, positions)
    for source in (0, 1):
        assert positions[ids == source].tolist() == list(range(int((ids == source).sum())))


def test_the_blend_is_a_pure_function_of_its_inputs(tmp_path):
    sources = sources_of(40, 7, weights=[0.7, 0.3])
    a = cached_blend(tmp_path / "a", "train", sources, seed=1, seq_len=64, length=500)
    b = cached_blend(tmp_path / "b", "train", sources, seed=1, seq_len=64, length=500)
    assert [a.index_at(k) for k in range(500)] == [b.index_at(k) for k in range(500)]
    other_seed = cached_blend(tmp_path / "c", "train", sources, seed=2, seq_len=64, length=500)
    assert [a.index_at(k) for k in range(500)] != [other_seed.index_at(k) for k in range(500)]


def test_a_rerun_reuses_the_cached_blend_and_other_inputs_build_a_new_one(tmp_path):
    sources = sources_of(40, 7, weights=[0.7, 0.3])
    first = cached_blend(tmp_path, "train", sources, seed=1, seq_len=64, length=500)
    (built,) = tmp_path.glob("train-*")
    written = (built / SOURCE_IDS).stat().st_mtime_ns
    again = cached_blend(tmp_path, "train", sources, seed=1, seq_len=64, length=500)
    assert list(tmp_path.glob("train-*")) == [built] and (built / SOURCE_IDS).stat().st_mtime_ns == written
    assert [again.index_at(k) for k in range(500)] == [first.index_at(k) for k in range(500)]
    assert isinstance(again.source_ids, np.memmap)  # read from disk, never held in memory
    for changed in [
        dict(sources=sources_of(40, 7, weights=[0.6, 0.4])),
        dict(sources=sources_of(41, 7, weights=[0.7, 0.3])),
        dict(sources=sources_of(40, 7, weights=[0.7, 0.3], fingerprint="other shards")),
        dict(seq_len=128),
        dict(seed=2),
        dict(length=600),
    ]:
        inputs = dict(sources=sources, seed=1, seq_len=64, length=500) | changed
        cached_blend(tmp_path, "train", **inputs)
        (rebuilt,) = tmp_path.glob("train-*")  # a new blend, and the stale one removed
        assert rebuilt != built
        built = rebuilt


def test_a_longer_blend_starts_with_the_shorter_one(tmp_path):
    """The first N positions do not depend on the length: a stage given more steps reads the same stream first."""
    sources = sources_of(40, 7, 13, weights=[0.5, 0.3, 0.2])
    short = cached_blend(tmp_path / "short", "train", sources, seed=3, seq_len=64, length=300)
    long = cached_blend(tmp_path / "long", "train", sources, seed=3, seq_len=64, length=1000)
    assert [short.index_at(k) for k in range(300)] == [long.index_at(k) for k in range(300)]
    with pytest.raises(IndexError, match="outside the blend's 300 positions"):
        short.index_at(300)


def test_a_small_source_wraps_reshuffled_each_pass(tmp_path):
    order = cached_blend(tmp_path, "train", sources_of(1000, 3, weights=[0.5, 0.5]), seed=0, seq_len=64, length=120)
    small = [index - 1000 for index in (order.index_at(k) for k in range(120)) if index >= 1000]
    assert len(small) == 60
    passes = [small[i : i + 3] for i in range(0, 60, 3)]
    assert all(sorted(p) == [0, 1, 2] for p in passes)  # every pass reads each of its samples once
    assert len({tuple(p) for p in passes}) > 1  # in a fresh order
    big = [index for index in (order.index_at(k) for k in range(120)) if index < 1000]
    assert len(set(big)) == len(big)  # the big source has not wrapped: no repeats


def test_global_batches_are_the_same_for_any_dp_size(tmp_path):
    order = cached_blend(tmp_path, "train", sources_of(30, 5, weights=[0.7, 0.3]), seed=4, seq_len=64, length=160)
    for consumed in (0, 16, 144):
        expected = [order.index_at(k) for k in range(consumed, consumed + 16)]
        for dp_size, micro_batch in [(1, 4), (2, 4), (4, 2), (4, 4), (1, 16)]:
            batch = [
                index
                for accum_step in range(16 // (dp_size * micro_batch))
                for dp_rank in range(dp_size)
                for index in order.micro_batch_indices(consumed, 16, dp_rank, dp_size, micro_batch, accum_step)
            ]
            assert batch == expected


def test_consumed_by_source_counts_the_stream_so_far(tmp_path):
    order = cached_blend(tmp_path, "train", sources_of(30, 5, weights=[0.7, 0.3]), seed=4, seq_len=64, length=160)
    assert order.consumed_by_source(0) == {"s0": 0, "s1": 0}
    assert order.consumed_by_source(160) == {"s0": 112, "s1": 48}
    assert order.consumed_by_source(10) == {"s0": 7, "s1": 3}
