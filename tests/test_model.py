"""The plain Llama: shapes, causality, GQA, parameter and FLOP counts, init, loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from numerics import assert_close, longest_reduction, model_depth, worst_case
from raylm.configs.schema import ModelConfig
from raylm.models.flops import flops_per_token, param_count
from raylm.models.llama import Llama, num_params
from raylm.models.shapes import ffn_hidden_size
from raylm.models.loss import cross_entropy_loss


def tiny_config(**changes) -> ModelConfig:
    shape = dict(vocab_size=97, d_model=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=32)
    return ModelConfig(**{**shape, **changes})


def tiny_model(seed: int = 0, **changes) -> Llama:
    torch.manual_seed(seed)
    return Llama(tiny_config(**changes))


def random_tokens(batch: int, length: int, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_have_batch_time_vocab_shape():
    model = tiny_model()
    assert model(random_tokens(3, 32)).shape == (3, 32, 97)
    assert model(random_tokens(1, 5)).shape == (1, 5, 97)


def test_changing_a_token_never_changes_earlier_logits():
    model = tiny_model()
    tokens = random_tokens(1, 20)
    reference = model(tokens)
    for t in (0, 7, 19):
        changed = tokens.clone()
        changed[0, t] = (changed[0, t] + 1) % 97
        logits = model(changed)
        assert torch.equal(logits[:, :t], reference[:, :t])
        assert not torch.allclose(logits[:, t], reference[:, t])


@pytest.mark.parametrize("n_kv_head,kv_width", [(2, 32), (4, 64), (1, 16)])
def test_grouped_query_attention_shrinks_key_value_projections(n_kv_head, kv_width):
    model = tiny_model(n_kv_head=n_kv_head)
    attention = model.layers[0].attention
    assert attention.wq.weight.shape == (64, 64)
    assert attention.wk.weight.shape == (kv_width, 64) and attention.wv.weight.shape == (kv_width, 64)
    assert model(random_tokens(2, 9)).shape == (2, 9, 97)


def test_grouped_query_attention_equals_multi_head_with_repeated_key_values():
    gqa = tiny_model(n_kv_head=2)
    mha = Llama(tiny_config(n_kv_head=4))
    state = gqa.state_dict()
    for i in range(2):
        for name in ("wk", "wv"):
            key = f"layers.{i}.attention.{name}.weight"
            # Query heads 0,1 use kv head 0 and heads 2,3 kv head 1.
            state[key] = state[key].view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(state)
    tokens = random_tokens(2, 12)
    # Repeated key/value heads feed other kernels than grouped ones: the same sums, reordered.
    rel = worst_case(longest_reduction(gqa.cfg, tokens.numel())) * model_depth(gqa.cfg)
    assert_close(mha(tokens), gqa(tokens), "GQA vs repeated MHA logits", rel)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("n_kv_head", [2, 4])
def test_param_count_from_config_equals_the_model(tie, n_kv_head):
    cfg = tiny_config(tie_embeddings=tie, n_kv_head=n_kv_head)
    model = Llama(cfg)
    assert param_count(cfg) == num_params(model) == sum(p.numel() for p in model.parameters())
    assert (model.output.weight is model.tok_embeddings.weight) == tie
    tables = 97 * 64 * (1 if tie else 2)
    assert num_params(model, non_embedding=True) == num_params(model) - tables


def test_param_count_of_a_known_shape():
    cfg = tiny_config(tie_embeddings=True)
    ffn = ffn_hidden_size(cfg)
    assert ffn == 192  # 8/3 * 64 = 170 rounded up to a multiple of 32
    attention = 64 * 64 + 2 * 64 * 32 + 64 * 64
    assert param_count(cfg) == 2 * (attention + 3 * 64 * ffn + 2 * 64) + 64 + 97 * 64


def test_flops_per_token_is_six_n_plus_attention():
    cfg = tiny_config(tie_embeddings=True)
    matmul = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 192) + 97 * 64  # blocks + head = 104512
    assert flops_per_token(cfg, 32) == 6 * matmul + 12 * 2 * 64 * 32 == 676_224
    assert flops_per_token(tiny_config(tie_embeddings=False), 32) == flops_per_token(cfg, 32)


def test_init_is_deterministic_under_a_seed_and_scaled_on_residual_outputs():
    a, b, c = tiny_model(seed=3), tiny_model(seed=3), tiny_model(seed=4)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert not torch.equal(a.layers[0].attention.wq.weight, c.layers[0].attention.wq.weight)
    big = Llama(tiny_config(d_model=256, n_layer=8, n_head=8, n_kv_head=8, vocab_size=2048))
    assert big.layers[0].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert big.layers[0].attention.wo.weight.std().item() == pytest.approx(0.02 / 4, rel=0.02)
    assert big.layers[0].feed_forward.w2.weight.std().item() == pytest.approx(0.02 / 4, rel=0.02)
    assert torch.equal(big.norm.weight, torch.ones(256))


def test_loss_ignores_minus_100_targets():
    logits = torch.randn(2, 5, 97, generator=torch.Generator().manual_seed(0))
    targets = random_tokens(2, 5)
    masked = targets.clone()
    masked[0, :3] = -100
    masked[1, 4] = -100
    valid = masked != -100
    expected = F.cross_entropy(logits[valid], targets[valid])
    torch.testing.assert_close(cross_entropy_loss(logits, masked), expected)
    assert not torch.allclose(cross_entropy_loss(logits, targets), expected)


def test_rope_beyond_the_context_length_is_refused():
    model = tiny_model()
    cos, sin = model.rope(4, 3)
    assert cos.shape == sin.shape == (3, 16)
    assert torch.equal(cos, model.cos[4:7])
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model(random_tokens(1, 33))
