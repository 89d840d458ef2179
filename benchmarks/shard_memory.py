"""Peak host memory of building one rank's model, for tp=1, tp=2 and pp=2, fresh and from stored weights.

Each layout is built in fresh processes (``tests/host_memory.py``: gloo on localhost, no Ray); a rank
reports what the build added to its resident memory at its peak and the weights it holds.

    .venv/bin/python benchmarks/shard_memory.py --out /tmp/bench-shard
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import write_result  # noqa: E402
from host_memory import build_peaks  # noqa: E402

LAYOUTS = {"tp1": (1, []), "tp2": (2, ["parallel.tp=2"]), "pp2": (2, ["parallel.pp=2"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = [f"model.d_model={args.d_model}", f"model.n_layer={args.n_layer}", "model.n_head=8", "model.n_kv_head=8",
             f"model.vocab_size={args.vocab}", "parallel.zero_stage=1"]

    from raylm.configs.loader import load_config
    from raylm.models.llama import Llama
    from raylm.models.weights import save_consolidated

    result = {"model": model, "rows": []}
    with tempfile.TemporaryDirectory() as init_dir:
        cfg = load_config("tiny", model).model
        save_consolidated(Llama(cfg, seed=1).state_dict(), cfg, Path(init_dir))
        for source, init_from in (("fresh", None), ("init_from", Path(init_dir))):
            for layout, (world, overrides) in LAYOUTS.items():
                (ranks,) = build_peaks(world, [[*model, *overrides]], init_from)
                result["rows"].append({"layout": layout, "weights": source, "ranks": ranks})
    reference = {row["weights"]: row["ranks"][0]["peak_mib"] for row in result["rows"] if row["layout"] == "tp1"}
    print("| layout | weights from | held MiB per rank | peak MiB per rank | peak / tp1 peak |")
    print("| --- | --- | ---: | ---: | ---: |")
    for row in result["rows"]:
        held = " / ".join(f"{rank['weights_mib']:.0f}" for rank in row["ranks"])
        peaks = " / ".join(f"{rank['peak_mib']:.0f}" for rank in row["ranks"])
        ratio = " / ".join(f"{rank['peak_mib'] / reference[row['weights']]:.2f}" for rank in row["ranks"])
        print(f"| {row['layout']} | {row['weights']} | {held} | {peaks} | {ratio} |")
    write_result(args.out, "shard_memory", result)


if __name__ == "__main__":
    main()
