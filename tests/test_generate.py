"""Generation: the KV cache changes nothing but speed; sampling options behave."""

from __future__ import annotations

import pytest
import torch

from raylm.models.generate import generate, sample_next, stream
from raylm.models.kv_cache import make_kv_caches
from numerics import assert_close, longest_reduction, model_depth, worst_case
from test_model import random_tokens, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0).eval()


@pytest.mark.parametrize("prompt_len", [1, 5, 20, 31, 32, 40])
def test_cached_greedy_equals_uncached_up_to_the_context_length(model, prompt_len):
    prompt = random_tokens(1, prompt_len)
    cached = list(stream(model, prompt, 40, temperature=0, use_cache=True))
    uncached = list(stream(model, prompt, 40, temperature=0, use_cache=False))
    # The cache cannot slide: it stops after the token predicted from a full 32-token context.
    context = min(prompt_len, 32)
    assert len(cached) == 32 - context + 1
    assert len(uncached) == 40
    assert cached == uncached[: len(cached)]


def test_generate_returns_prompt_then_new_tokens(model):
    prompt = random_tokens(1, 6)
    out = generate(model, prompt, 4, temperature=0)
    assert out.shape == (1, 10)
    assert torch.equal(out[:, :6], prompt)
    assert out[0, 6:].tolist() == list(stream(model, prompt, 4, temperature=0))
    assert torch.equal(generate(model, prompt, 0), prompt)


def test_generation_stops_after_eos(model):
    prompt = random_tokens(1, 6)
    greedy = list(stream(model, prompt, 8, temperature=0))
    eos = greedy[2]
    stopped = list(stream(model, prompt, 8, temperature=0, eos_id=eos))
    assert stopped == greedy[: greedy.index(eos) + 1]


@pytest.mark.parametrize("chunks", [[32], [1] * 8 + [24], [10, 10, 12], [5, 1, 26]])
def test_chunked_prefill_with_cache_matches_full_forward(model, chunks):
    tokens = random_tokens(2, 32, seed=5)
    with torch.no_grad():
        full = model(tokens)
        caches = make_kv_caches(model, batch_size=2)
        pieces, start = [], 0
        for size in chunks:
            pieces.append(model(tokens[:, start : start + size], caches, start))
            start += size
    # A chunk attends over its cached keys in other blocks than the full forward: the same sums, reordered.
    rel = worst_case(longest_reduction(model.cfg, tokens.shape[1])) * model_depth(model.cfg)
    assert_close(torch.cat(pieces, dim=1), full, f"chunks {chunks}", rel)


def test_cache_is_sized_from_the_key_projection(model):
    caches = make_kv_caches(model, batch_size=3, max_len=10)
    assert len(caches) == 2 and caches[0].k.shape == (3, 10, 2, 16)
    # A tensor-parallel shard holds half the key heads; its cache follows.
    model_half = tiny_model(seed=0)
    for block in model_half.layers:
        block.attention.wk = torch.nn.Linear(64, 16, bias=False)
    assert make_kv_caches(model_half, batch_size=1)[1].v.shape == (1, 32, 1, 16)


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 97, generator=torch.Generator().manual_seed(0))
    greedy = sample_next(logits, temperature=0)
    assert torch.equal(greedy, logits.argmax(-1))
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=generator), greedy)
        assert torch.equal(sample_next(logits, 1.0, top_p=1e-6, generator=generator), greedy)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(400, 1)
    generator = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=generator).tolist()) == {0, 1}
    # softmax: 0.636, 0.234, 0.086, ...; 0.8 of the mass needs the two most likely.
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=generator).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, generator=generator).tolist()) == {0, 1, 2, 3, 4}


def test_seeded_sampling_is_reproducible(model):
    prompt = random_tokens(1, 4)

    def sample(seed):
        return generate(model, prompt, 20, temperature=1.0, seed=seed)

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
    uncached = generate(model, prompt, 20, temperature=1.0, use_cache=False, seed=7)
    assert torch.equal(uncached, sample(7))


def test_sampling_runs_on_the_models_device(model, monkeypatch):
    """The prompt moves to the model and the seeded generator is made there (a CPU one cannot sample on a GPU).

    On a CPU-only machine the other device is ``meta``: it computes shapes but
    holds no values, so reading the first token back fails after everything
    before it ran on the model's device.
    """
    prompt = random_tokens(1, 4)
    on_meta = tiny_model(seed=0).to("meta").eval()
    requested = []

    class RecordingGenerator(torch.Generator):
        """Notes the device asked for, and is a CPU generator (none exists on meta; sampling there ignores it)."""

        def __new__(cls, device="cpu"):
            requested.append(torch.device(device))
            return super().__new__(cls)

        def __init__(self, device="cpu"):
            super().__init__()

    monkeypatch.setattr(torch, "Generator", RecordingGenerator)
    assert len(list(stream(model, prompt, 3, seed=0))) == 3
    assert requested == [torch.device("cpu")]
    inputs_seen = []
    on_meta.register_forward_pre_hook(lambda module, args: inputs_seen.append(args[0].device))
    with pytest.raises(RuntimeError, match="cannot be called on meta tensors"):
        list(stream(on_meta, prompt, 3, seed=0))
    assert requested[-1] == torch.device("meta") and inputs_seen == [torch.device("meta")]
