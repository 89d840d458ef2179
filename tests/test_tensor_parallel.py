"""Tensor-parallel layers, loss and a whole tiny Llama on tp=2 (gloo) equal their dense counterparts."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gloo_spawn import run_on_gloo
from numerics import assert_close, longest_reduction, model_depth, worst_case
from raylm.configs.schema import ModelConfig
from raylm.errors import UserError
from raylm.models.llama import Llama
from raylm.models.loss import cross_entropy_loss
from raylm.parallelism.plan import LLAMA_TP_PLAN, apply_tensor_parallel, check_tp_divides, split_dim_of, tp_loss_fn
from raylm.parallelism.reshard import gather_tp_tensor, shard_state_dict, unshard_state_dicts
from raylm.parallelism.tensor import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, vocab_parallel_cross_entropy
from raylm.parallelism.topology import Topology, build_groups



def tiny_config(tie_embeddings: bool = True, **changes) -> ModelConfig:
    shape = dict(vocab_size=96, d_model=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=16, tie_embeddings=tie_embeddings)
    return ModelConfig(**{**shape, **changes})


def shard(tensor: torch.Tensor, dim: int, rank: int, tp: int) -> torch.Tensor:
    return tensor.chunk(tp, dim=dim)[rank]


def _dense_reference(layer: nn.Module, inputs: torch.Tensor, upstream: torch.Tensor):
    """Output, input gradient and weight gradient of a dense layer under the loss sum(out * upstream)."""
    inputs = inputs.clone().requires_grad_(inputs.is_floating_point())
    out = layer(inputs)
    (out * upstream).sum().backward()
    return out.detach(), inputs.grad, layer.weight.grad


def _check_layers(rank: int, tp: int) -> None:
    group = dist.group.WORLD
    torch.manual_seed(0)  # the same dense layers and data on every rank
    x = torch.randn(3, 5, 16)  # (B, T, in)

    linear = nn.Linear(16, 12, bias=False)
    upstream = torch.randn(3, 5, 12)  # (B, T, out)
    y_ref, dx_ref, dw_ref = _dense_reference(linear, x, upstream)
    # Outputs sum over 16 inputs, input grads over 12 outputs, weight grads over 15 tokens.
    rel = worst_case(16)

    for gather_output in (True, False):
        column = ColumnParallelLinear.from_dense(linear, group, gather_output=gather_output)
        x_in = x.clone().requires_grad_()
        y = column(x_in)
        local_upstream = upstream if gather_output else shard(upstream, -1, rank, tp)
        (y * local_upstream).sum().backward()
        assert_close(y, y_ref if gather_output else shard(y_ref, -1, rank, tp), f"column(gather={gather_output}) output", rel)
        assert_close(x_in.grad, dx_ref, f"column(gather={gather_output}) input grad", rel)
        assert_close(column.weight.grad, shard(dw_ref, 0, rank, tp), f"column(gather={gather_output}) weight grad", rel)
        # The tolerance still tells this rank's shard from the other rank's.
        with pytest.raises(AssertionError):
            assert_close(column.weight.grad, shard(dw_ref, 0, tp - 1 - rank, tp), "the other rank's shard", rel)

    for input_is_parallel in (True, False):
        row = RowParallelLinear.from_dense(linear, group, input_is_parallel=input_is_parallel)
        x_in = (shard(x, -1, rank, tp) if input_is_parallel else x).clone().requires_grad_()
        y = row(x_in)
        (y * upstream).sum().backward()
        assert_close(y, y_ref, f"row(parallel input={input_is_parallel}) output", rel)
        assert_close(x_in.grad, shard(dx_ref, -1, rank, tp) if input_is_parallel else dx_ref,
                     f"row(parallel input={input_is_parallel}) input grad", rel)
        assert_close(row.weight.grad, shard(dw_ref, 1, rank, tp), f"row(parallel input={input_is_parallel}) weight grad", rel)

    embedding = nn.Embedding(10, 8)
    tokens = torch.randint(0, 10, (3, 5))
    upstream = torch.randn(3, 5, 8)
    out_ref, _, dw_ref = _dense_reference(embedding, tokens, upstream)
    vocab_embedding = VocabParallelEmbedding.from_dense(embedding, group)
    out = vocab_embedding(tokens)
    (out * upstream).sum().backward()
    # A lookup plus an all-reduce with zeros is exact; the weight grad sums at most the 15 tokens.
    assert torch.equal(out, out_ref), "vocab embedding output"
    assert_close(vocab_embedding.weight.grad, shard(dw_ref, 0, rank, tp), "vocab embedding weight grad", worst_case(15))

    # A parameter split over the tp group is marked for DeepSpeed's gradient-norm accounting.
    from deepspeed.runtime.utils import is_model_parallel_parameter

    assert is_model_parallel_parameter(vocab_embedding.weight) and not is_model_parallel_parameter(embedding.weight)


def _check_vocab_parallel_cross_entropy(rank: int, tp: int) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 96) * 3
    targets = torch.randint(0, 96, (3, 7))
    targets[0, :3] = -100  # masked prompt tokens
    targets[2, -1] = 95  # the last vocabulary id, on the last rank
    full = logits.clone().requires_grad_()
    loss_ref = F.cross_entropy(full.flatten(0, 1), targets.flatten(), ignore_index=-100)
    loss_ref.backward()

    local = shard(logits, -1, rank, tp).clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, targets, dist.group.WORLD)
    loss.backward()
    # log-sum-exp over 96 logits, then the mean over 21 targets: the sums are at most 96 terms long.
    assert_close(loss, loss_ref, "vocab-parallel loss", worst_case(96))
    assert_close(local.grad, shard(full.grad, -1, rank, tp), "vocab-parallel logits grad", worst_case(96))


def _check_tp_of_one_is_identity(rank: int, tp: int) -> None:
    singletons = [dist.new_group([r]) for r in range(tp)]  # every rank creates every group
    model = Llama(tiny_config())
    assert apply_tensor_parallel(model, singletons[rank]) is model
    assert all(isinstance(module, nn.Linear) for name, module in model.named_modules() if name.endswith(".wq"))
    assert tp_loss_fn(singletons[rank]) is cross_entropy_loss


def _check_layers_and_loss(rank: int, tp: int) -> None:
    _check_layers(rank, tp)
    _check_vocab_parallel_cross_entropy(rank, tp)
    _check_tp_of_one_is_identity(rank, tp)


@pytest.mark.slow
def test_layers_and_loss_match_dense_on_two_ranks():
    run_on_gloo(_check_layers_and_loss, 2)


@contextmanager
def collective_shapes():
    """Record the shape of every tensor handed to ``all_reduce`` / ``all_gather`` (the real collectives still run)."""
    shapes = []
    real = {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}

    def spy(name, position):
        def call(*args, **kwargs):
            shapes.append((name, tuple(args[position].shape)))
            return real[name](*args, **kwargs)
        return call

    dist.all_reduce, dist.all_gather = spy("all_reduce", 0), spy("all_gather", 1)
    try:
        yield shapes
    finally:
        dist.all_reduce, dist.all_gather = real["all_reduce"], real["all_gather"]


def _gathered_grads(model: nn.Module, tp_group, tp: int) -> dict:
    """Dense-layout gradients of a tensor-parallel model (its parameters' names are the dense names)."""
    per_rank = [dict() for _ in range(tp)]
    for name, param in model.named_parameters():
        parts = [torch.empty_like(param.grad) for _ in range(tp)]
        dist.all_gather(parts, param.grad, group=tp_group)
        for sd, part in zip(per_rank, parts):
            sd[name] = part
    return unshard_state_dicts(per_rank, tp)


def _check_llama(rank: int, world_size: int, tie_embeddings: bool) -> None:
    groups = build_groups(Topology.for_world(world_size, 1, world_size), rank, timedelta(seconds=60))
    tp = world_size
    torch.manual_seed(0)
    dense = Llama(tiny_config(tie_embeddings))
    parallel = apply_tensor_parallel(copy.deepcopy(dense), groups.tp_group)
    assert (parallel.output.weight is parallel.tok_embeddings.weight) == tie_embeddings
    assert isinstance(parallel.layers[1].feed_forward.w2, RowParallelLinear)

    # Same names, and this rank's shards are exactly the plan's slices of the dense weights.
    expected_shards = shard_state_dict(dense.state_dict(), rank, tp)
    actual = parallel.state_dict()
    assert actual.keys() == expected_shards.keys()
    for name, value in actual.items():
        assert torch.equal(value, expected_shards[name]), name

    tokens = torch.randint(0, 96, (2, 16))
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100
    loss_ref = cross_entropy_loss(dense(tokens), targets)
    loss_ref.backward()
    dense_grads = {name: p.grad for name, p in dense.named_parameters()}
    # Every block adds its own rounding of its longest sum to what reaches the loss and the gradients.
    rel = worst_case(longest_reduction(dense.cfg, tokens.numel())) * model_depth(dense.cfg)

    mismatch, shapes = _mismatch(parallel, groups, tokens, targets, loss_ref, dense_grads, rel)
    assert mismatch is None, mismatch
    # The loss never gathers logits: only (B, T, d_model) activations and per-token (B*T,) statistics travel.
    assert shapes and {shape for _, shape in shapes} <= {(2, 16, 64), (32,)}, shapes

    full = {name: gather_tp_tensor(value, name, groups.tp_group) for name, value in parallel.state_dict().items()}
    assert full.keys() == dense.state_dict().keys()
    for name, value in dense.state_dict().items():
        assert torch.equal(full[name], value), name

    # The same tolerances catch a rank that holds the wrong slice of one weight.
    w1 = parallel.layers[0].feed_forward.w1.weight
    with torch.no_grad():
        w1.copy_(shard(dense.layers[0].feed_forward.w1.weight, 0, 0, tp))
    parallel.zero_grad()
    assert _mismatch(parallel, groups, tokens, targets, loss_ref, dense_grads, rel)[0] is not None


def _mismatch(parallel, groups, tokens, targets, loss_ref, dense_grads, rel):
    """The first of loss and gradients that differs from the dense model's beyond ``rel`` (or None),
    and the shapes of the tensors the forward and backward passes sent through collectives."""
    tp = len(groups.tp_ranks)
    with collective_shapes() as shapes:
        local_logits = parallel(tokens)
        assert local_logits.shape == (2, 16, 96 // tp)
        loss = tp_loss_fn(groups.tp_group)(local_logits, targets)
        loss.backward()
    grads = _gathered_grads(parallel, groups.tp_group, tp)
    assert grads.keys() == dense_grads.keys()
    try:
        assert_close(loss, loss_ref, "loss", rel)
        for name, grad in grads.items():
            assert_close(grad, dense_grads[name], f"grad of {name}", rel)
    except AssertionError as err:
        return str(err), shapes
    return None, shapes


@pytest.mark.slow
@pytest.mark.parametrize("tie_embeddings", [True, False], ids=["tied", "untied"])
def test_tensor_parallel_llama_matches_dense(tie_embeddings):
    run_on_gloo(_check_llama, 2, tie_embeddings)


@pytest.mark.parametrize("tie_embeddings", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("tp", [2, 4])
def test_shard_unshard_round_trip_is_exact(tp, tie_embeddings):
    torch.manual_seed(0)
    full = Llama(tiny_config(tie_embeddings)).state_dict()
    shards = [shard_state_dict(full, rank, tp) for rank in range(tp)]
    wq = "layers.0.attention.wq.weight"
    assert shards[1][wq].shape == (64 // tp, 64) and shards[1]["layers.1.feed_forward.w2.weight"].shape[1] * tp == full["layers.1.feed_forward.w2.weight"].shape[1]
    assert torch.equal(shards[1]["norm.weight"], full["norm.weight"])
    restored = unshard_state_dicts(shards, tp)
    assert restored.keys() == full.keys()
    for name, value in full.items():
        assert torch.equal(restored[name], value), name


def test_plan_names_every_split_weight():
    names = Llama(tiny_config(tie_embeddings=False)).state_dict().keys()
    split = {name: split_dim_of(name) for name in names if split_dim_of(name) is not None}
    assert split["tok_embeddings.weight"] == 0 and split["output.weight"] == 0
    assert split["layers.1.attention.wo.weight"] == 1 and split["layers.0.feed_forward.w3.weight"] == 0
    assert len(split) == 2 + 7 * 2  # embedding, head, and 7 projections in each of the 2 blocks
    assert not any("norm" in name for name in split)
    assert set(LLAMA_TP_PLAN.values()) == {"vocab_embedding", "colwise", "rowwise", "colwise_vocab"}


@pytest.mark.parametrize(
    "changes,tp,keys",
    [
        (dict(n_kv_head=2), 4, ["parallel.tp=4", "model.n_head=4", "model.n_kv_head=2"]),
        (dict(n_head=2, n_kv_head=None), 4, ["parallel.tp=4", "model.n_head=2"]),
        (dict(vocab_size=97), 2, ["parallel.tp=2", "model.vocab_size=97"]),
        (dict(n_head=8, n_kv_head=8, ffn_hidden=100), 8, ["parallel.tp=8", "model.ffn_hidden"]),
    ],
)
def test_indivisible_shapes_name_the_keys(changes, tp, keys):
    model = Llama(tiny_config(**changes))
    with pytest.raises(UserError) as err:
        check_tp_divides(model, tp)
    for key in keys:
        assert key in str(err.value)
