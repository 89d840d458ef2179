"""The suite's tolerances admit reordered sums and reject wrong math."""

from __future__ import annotations

import pytest
import torch

from numerics import assert_close, bf16_training_rel, training_rel, typical, worst_case
from raylm.configs.loader import load_config


def test_a_reordered_sum_is_within_the_worst_case_and_a_dropped_term_is_not():
    terms = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))
    forward = terms.sum(dim=1)
    backward = terms.flip(1).cumsum(dim=1)[:, -1]  # the same 4096 terms, added one by one in reverse
    assert_close(backward, forward, "reversed order", worst_case(4096))
    with pytest.raises(AssertionError):
        assert_close(terms[:, 1:].sum(dim=1), forward, "one term missing", worst_case(4096))


def test_bf16_tolerances_are_wider_than_fp32():
    assert worst_case(100, torch.bfloat16) == 2**16 * worst_case(100, torch.float32)
    assert typical(100, 3) == 3 * 10 * torch.finfo(torch.float32).eps


def test_training_tolerance_of_the_test_model_stays_far_below_a_learning_step():
    """Five steps of the tiny test model: the tolerance (a few 1e-4) must be far below what one optimizer step
    changes the loss by (percents), or parity tests could not see a wrong update."""
    cfg = load_config("tiny", ["model.vocab_size=512", "model.max_seq_len=64"])
    rel = training_rel(cfg.model, cfg.train.global_batch_size * cfg.model.max_seq_len, 5)
    assert 1e-5 < rel < 1e-3


def test_the_bf16_tolerance_is_the_mantissa_chained_through_the_model():
    """bf16 matmuls add in fp32, so a reduction's length barely matters next to bf16's 2^-7: the tiny test model's
    10 chained reductions give 7.8%, well below the 20% its loss falls over the 60 steps bf16 is compared on."""
    cfg = load_config("tiny", ["model.vocab_size=512", "model.max_seq_len=64"])
    rel = bf16_training_rel(cfg.model, cfg.train.global_batch_size * cfg.model.max_seq_len)
    assert rel == pytest.approx(10 * 2**-7, rel=1e-3)
