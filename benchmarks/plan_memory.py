"""`raylm plan`'s activations, loss buffers and backward gradient against one micro-batch's measured peak, for a few shapes.

Each configuration runs in fresh processes (``tests/host_memory.py``: gloo on localhost, no Ray, a fixed
glibc mmap threshold so that the resident set follows the live tensors): the model is built, gradients
allocated, then one forward and backward of the training loss adds its peak on top.

    .venv/bin/python benchmarks/plan_memory.py --out /tmp/bench-plan
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import write_result  # noqa: E402
from host_memory import step_peaks  # noqa: E402

SHAPES = {
    "d256 L4 gqa8/4 V8192 T512 b4": ["model.d_model=256", "model.n_layer=4", "model.n_head=8", "model.n_kv_head=4",
                                     "model.vocab_size=8192", "model.max_seq_len=512", "parallel.micro_batch_size=4"],
    "d512 L2 mha8 V2048 T256 b8": ["model.d_model=512", "model.n_layer=2", "model.n_head=8", "model.n_kv_head=8",
                                   "model.vocab_size=2048", "model.max_seq_len=256", "parallel.micro_batch_size=8"],
    "d1024 L2 gqa16/4 V4096 T256 b2": ["model.d_model=1024", "model.n_layer=2", "model.n_head=16", "model.n_kv_head=4",
                                       "model.vocab_size=4096", "model.max_seq_len=256", "parallel.micro_batch_size=2"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from raylm.configs.loader import load_config
    from raylm.parallelism.memory import estimate

    rows = []
    print("| shape | tp | precision | measured MiB per rank | plan MiB | plan error |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for label, shape in SHAPES.items():
        for tp in (1, 2):
            for bf16 in (False, True):
                overrides = [*shape, f"parallel.tp={tp}", "parallel.zero_stage=1", "train.global_batch_size=16"]
                measured = step_peaks(tp, overrides, bf16)
                plan = estimate(load_config("tiny", [*overrides, f"cluster.num_workers={tp}"]), bf16)
                predicted = (plan.activations_gib + plan.loss_gib + plan.backward_gib) * 1024
                error = predicted / max(measured) - 1
                rows.append({"shape": label, "tp": tp, "bf16": bf16, "measured_mib": measured, "plan_mib": predicted, "error": error})
                print(f"| {label} | {tp} | {'bf16' if bf16 else 'fp32'} | {' / '.join(f'{m:.0f}' for m in measured)} | "
                      f"{predicted:.0f} | {error:+.1%} |", flush=True)
    write_result(args.out, "plan_memory", {"rows": rows})


if __name__ == "__main__":
    main()
