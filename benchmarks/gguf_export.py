"""GGUF export of a trained model: file size per quant, dequantization error, greedy tokens against raylm.

Trains the benchmarks' model (d_model 256, 4 layers, GQA 8/4 heads, vocab 2048,
BPE) for --steps under torchrun on one rank (no Ray), exports the stage with
``raylm export --format gguf`` as f16 and q8_0, and compares:

- each file's size with the fp32 ``model.safetensors``;
- the largest |dequantized - original| weight over all tensors of each file;
- greedy continuations (temperature 0) of --prompts prompts: raylm's own
  generation on the original fp32 weights against the tests' numpy Llama in
  llama.cpp's conventions (``tests/gguf_llama.py``) over each file.

    .venv/bin/python benchmarks/gguf_export.py [--steps 80] [--prompts 10] [--new-tokens 32] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import pretrain_overrides, torchrun_stage, write_result  # noqa: E402
from gguf_llama import greedy, read_gguf  # noqa: E402  (the tests' llama.cpp-convention forward)

QUANTS = ("f16", "q8_0")


def prompts(count: int):
    """The first five words of evenly spaced Python help topics (the training corpus)."""
    from raylm.data.corpus import pydoc_topics

    topics = pydoc_topics()
    return [" ".join(text.split()[:5]) for _, text in topics[:: len(topics) // count][:count]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from raylm.launcher.cli import main as raylm
    from raylm.launcher.inference import load_stage
    from raylm.models.generate import stream
    from raylm.models.gguf_export import gguf_tensors

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="raylm-gguf-"))
    run_dir = root / "run"
    torchrun_stage(run_dir, pretrain_overrides(args.steps, workers=1, zero=0), 1)
    summary = json.loads((run_dir / "pretrain" / "summary.json").read_text())
    stage = load_stage(run_dir)
    original = gguf_tensors(stage.model.state_dict(), stage.model_cfg)
    texts = prompts(args.prompts)
    reference = [list(stream(stage.model, torch.tensor([stage.tokenizer.encode(p)]), args.new_tokens, temperature=0)) for p in texts]
    result = {
        "steps": args.steps,
        "final_loss": summary["final_loss"],
        "parameters": sum(a.size for a in original.values()),
        "safetensors_fp32_bytes": (run_dir / "pretrain" / "final" / "model.safetensors").stat().st_size,
        "prompts": len(texts),
        "new_tokens": args.new_tokens,
    }
    for quant in QUANTS:
        assert raylm(["export", str(run_dir), "--format", "gguf", "--quant", quant, "--out", str(root / "gguf")]) == 0
        path = root / "gguf" / f"run-pretrain-{quant}.gguf"
        reader, tensors = read_gguf(path)
        errors = {name: float(np.abs(tensors[name] - original[name]).max()) for name in original}
        worst = max(errors, key=errors.get)
        continuations = [greedy(reader, tensors, stage.tokenizer.encode(p), args.new_tokens) for p in texts]
        # Tokens that agree before the first difference: after one, the two continue different texts.
        agreed = [next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours)) for ours, theirs in zip(reference, continuations)]
        result[quant] = {
            "file_bytes": path.stat().st_size,
            "max_abs_error": errors[worst],
            "max_abs_error_tensor": worst,
            "identical_continuations": sum(a == args.new_tokens for a in agreed),
            "tokens_before_first_difference": agreed,
        }
    write_result(args.out, "gguf_export", result)


if __name__ == "__main__":
    main()
