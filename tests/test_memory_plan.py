"""`raylm plan` arithmetic, checked against DeepSpeed's own estimators."""

import pytest
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

from raylm.configs.loader import load_config
from raylm.parallelism.memory import GIB, estimate, parse_size


def test_zero2_model_states_equal_deepspeeds_estimate():
    run = load_config("1.3b", ["cluster.num_workers=8", "parallel.zero_stage=2"])
    plan = estimate(run, bf16=True)
    _, deepspeed_bytes = estimate_zero2_model_states_mem_needs(plan.params, num_gpus_per_node=8, cpu_offload=False)
    assert plan.model_states_gib * GIB == pytest.approx(deepspeed_bytes, rel=1e-6)


def test_zero3_model_states_close_to_deepspeeds_estimate():
    run = load_config("7b", ["parallel.tp=1", "cluster.num_workers=64", "parallel.zero_stage=3"])
    plan = estimate(run, bf16=True)
    m = run.model
    largest_layer = m.vocab_size * m.d_model
    _, deepspeed_bytes, _ = estimate_zero3_model_states_mem_needs(plan.params, largest_layer, num_gpus_per_node=8, num_nodes=8, cpu_offload=False)
    # DeepSpeed adds a gathered-layer buffer and leaves out the sharded 16-bit weights.
    assert plan.model_states_gib * GIB == pytest.approx(deepspeed_bytes, rel=0.15)


def test_bubble_and_tensor_parallel_sharding():
    run = load_config("tiny", ["parallel.pp=2", "parallel.zero_stage=1", "cluster.num_workers=4", "parallel.pipeline_microbatches=8", "train.global_batch_size=32"])
    plan = estimate(run, bf16=False)
    assert plan.bubble_fraction == pytest.approx(1 / 9)
    assert plan.micro_batches == 8 and plan.micro_batch == 2
    base = estimate(load_config("1.3b", ["cluster.num_workers=8"]), bf16=True)
    tp2 = estimate(load_config("1.3b", ["cluster.num_workers=8", "parallel.tp=2"]), bf16=True)
    assert tp2.params_per_rank == pytest.approx(base.params_per_rank / 2, rel=0.01)


def test_checkpointing_reduces_activation_memory():
    plan = estimate(load_config("1.3b", ["cluster.num_workers=8"]), bf16=True)
    assert plan.activations_checkpointed_gib < plan.activations_gib / 4


@pytest.mark.parametrize("text, gib", [("80GB", 80e9 / GIB), ("141GiB", 141), ("16", 16)])
def test_parse_size(text, gib):
    assert parse_size(text) == pytest.approx(gib)
