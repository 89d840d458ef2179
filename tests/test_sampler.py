"""raylm.data.sampler: a deterministic sample order that ignores the data-parallel size."""

from __future__ import annotations

import pytest

from raylm.data.sampler import SampleOrder, eval_indices

NUM_SAMPLES = 37
GLOBAL_BATCH = 16


def global_batch(order: SampleOrder, consumed: int, dp_size: int, micro_batch: int) -> list:
    """Every index of one global batch, in (accumulation step, dp rank) order."""
    accum_steps = GLOBAL_BATCH // (dp_size * micro_batch)
    return [
        index
        for accum_step in range(accum_steps)
        for dp_rank in range(dp_size)
        for index in order.micro_batch_indices(consumed, GLOBAL_BATCH, dp_rank, dp_size, micro_batch, accum_step)
    ]


def test_order_is_deterministic_per_seed():
    stream = [SampleOrder(NUM_SAMPLES, seed=3).index_at(k) for k in range(100)]
    assert stream == [SampleOrder(NUM_SAMPLES, seed=3).index_at(k) for k in range(100)]
    assert stream != [SampleOrder(NUM_SAMPLES, seed=4).index_at(k) for k in range(100)]


def test_each_epoch_is_a_fresh_permutation():
    order = SampleOrder(NUM_SAMPLES, seed=0)
    epochs = [[order.index_at(epoch * NUM_SAMPLES + k) for k in range(NUM_SAMPLES)] for epoch in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(NUM_SAMPLES))
    assert epochs[0] != epochs[1] != epochs[2]


@pytest.mark.parametrize("consumed", [0, 32, 30])  # 30: the batch straddles two epochs
def test_global_batch_is_the_same_stream_slice_for_any_dp_size(consumed):
    order = SampleOrder(NUM_SAMPLES, seed=1)
    expected = [order.index_at(k) for k in range(consumed, consumed + GLOBAL_BATCH)]
    for dp_size, micro_batch in [(1, 4), (2, 4), (4, 2), (4, 4), (1, 16)]:
        assert sorted(global_batch(order, consumed, dp_size, micro_batch)) == sorted(expected)


def test_resume_at_consumed_continues_the_same_stream():
    uninterrupted = SampleOrder(NUM_SAMPLES, seed=5)
    batches = [global_batch(uninterrupted, step * GLOBAL_BATCH, dp_size=2, micro_batch=4) for step in range(6)]
    resumed = SampleOrder(NUM_SAMPLES, seed=5)
    assert [global_batch(resumed, step * GLOBAL_BATCH, dp_size=4, micro_batch=2) for step in range(3, 6)] == batches[3:]


def test_global_batch_must_split_evenly():
    order = SampleOrder(NUM_SAMPLES, seed=0)
    with pytest.raises(ValueError, match="global_batch=10 must be a multiple of dp_size=4 x micro_batch=2"):
        order.micro_batch_indices(0, 10, 0, 4, 2, 0)
    with pytest.raises(ValueError, match="accum_step=2"):
        order.micro_batch_indices(0, 16, 0, 4, 2, 2)


def test_eval_indices_are_fixed_and_split_across_ranks():
    per_rank = [eval_indices(100, batches=3, dp_rank=rank, dp_size=2, micro_batch=4) for rank in range(2)]
    # Batch b of every rank together is the b-th slice of the split, whatever the number of ranks.
    assert per_rank[0] == [[0, 1, 2, 3], [8, 9, 10, 11], [16, 17, 18, 19]]
    one_rank = eval_indices(100, batches=3, dp_rank=0, dp_size=1, micro_batch=8)
    assert [a + b for a, b in zip(*per_rank)] == one_rank
    flat = [i for rank in per_rank for batch in rank for i in batch]
    assert sorted(flat) == list(range(24))
    assert all(len(batch) == 4 for rank in per_rank for batch in rank)


def test_eval_indices_wrap_on_a_small_split():
    assert eval_indices(3, batches=2, dp_rank=0, dp_size=1, micro_batch=2) == [[0, 1], [2, 0]]
