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


def test_start_up_is_the_peak_of_a_zero3_rank_with_small_partitions():
    """ZeRO-3 over 64 ranks leaves each a sliver of the model states, but its fp32 weights reach the GPU whole first."""
    run = load_config("7b", ["parallel.tp=1", "cluster.num_workers=64", "parallel.zero_stage=3", "parallel.activation_checkpointing=true"])
    plan = estimate(run, bf16=True)
    assert plan.startup_gib == pytest.approx(4 * plan.params_per_rank / GIB)
    assert plan.training_gib(True) < plan.startup_gib == plan.total_gib(True)
    # The host holds the same fp32 weights while the rank builds them; tp=8 splits them and adds the largest weight.
    assert plan.host_startup_gib == pytest.approx(plan.startup_gib)
    tp8 = estimate(load_config("7b", ["cluster.num_workers=64"]), bf16=True)
    m = run.model
    assert tp8.host_startup_gib == pytest.approx((4 * tp8.params_per_rank + 4 * m.vocab_size * m.d_model) / GIB)


def test_zero1_and_2_count_deepspeeds_whole_fp32_bucket():
    for zero_stage in (1, 2):
        plan = estimate(load_config("tiny", [f"parallel.zero_stage={zero_stage}"]), bf16=False)
        assert plan.buckets_gib * GIB == 500_000_000 * 4  # allocated whole, however small the model
    plan = estimate(load_config("tiny", ["parallel.zero_stage=0"]), bf16=False)
    assert plan.buckets_gib * GIB == plan.params_per_rank * 4  # the all-reduce flattens at most the gradients


# Shapes whose micro-batch activations (tens of MiB) dwarf what the measurement cannot see.
MEASURED_SHAPES = {
    "tp1-fp32": (1, False, ["model.d_model=256", "model.n_layer=2", "model.n_head=8", "model.n_kv_head=4", "model.vocab_size=4096",
                            "model.max_seq_len=256", "parallel.micro_batch_size=4"]),
    "tp2-bf16": (2, True, ["model.d_model=512", "model.n_layer=2", "model.n_head=8", "model.n_kv_head=8", "model.vocab_size=2048",
                           "model.max_seq_len=256", "parallel.micro_batch_size=4", "parallel.tp=2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MEASURED_SHAPES))
def test_activations_and_loss_buffers_match_a_measured_step(name):
    """One micro-batch's forward and backward on CPU adds what the plan's activations, loss buffers and backward gradient say,
    within 10% (``tests/host_memory.py``; ``benchmarks/plan_memory.py`` has more shapes and the errors)."""
    from host_memory import step_peaks

    tp, bf16, shape = MEASURED_SHAPES[name]
    overrides = [*shape, "parallel.zero_stage=1", "train.global_batch_size=16"]
    plan = estimate(load_config("tiny", [*overrides, f"cluster.num_workers={tp}"]), bf16=bf16)
    predicted = (plan.activations_gib + plan.loss_gib + plan.backward_gib) * 1024
    for measured in step_peaks(tp, overrides, bf16):
        assert predicted == pytest.approx(measured, rel=0.1), (name, predicted, measured)
