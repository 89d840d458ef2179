"""LoRA: low-rank adapters on a frozen Llama, their merge into dense weights, and PEFT's adapter format.

A targeted projection ``W`` (out x in) computes ``x W^T + scaling * dropout(x) A^T B^T`` with
``A`` (rank x in, PEFT's Kaiming-uniform init), ``B`` (out x rank, zeros, so training starts at the base
model) and ``scaling = alpha / rank``. Only ``A`` and ``B`` train. The frozen weight keeps its name
(``layers.0.attention.wq.weight``) and the adapters sit beside it as ``...wq.lora_A.weight`` and
``...wq.lora_B.weight``, PEFT's own leaf names, so a Hugging Face name differs only by the mapping
``raylm.models.hf`` already applies to the weights. Like the model, this knows nothing of parallelism.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict, Mapping

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from raylm.configs.schema import LoraConfig
from raylm.models.hf import LAYER_NAMES

ADAPTER_DIR = "adapter"
"""Where a LoRA stage writes its PEFT adapter, inside its final/ directory."""
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""What PEFT's ``PeftModel`` puts before the wrapped ``LlamaForCausalLM``'s names when it saves adapters."""

# Each block's projection, by its path in a block ("attention.wq") -> its Hugging Face path
# ("self_attn.q_proj"), read off the weight-name mapping: projections sit one module deeper than the norms.
_PROJECTIONS = {ours.removesuffix(".weight"): hf.removesuffix(".weight")
                for ours, hf in LAYER_NAMES.items() if ours.count(".") == 2}
TARGET_PATHS = {path.rsplit(".", 1)[1]: path for path in _PROJECTIONS}
"""What ``lora.targets`` may name: wq, wk, wv, wo (attention) and w1, w3, w2 (SwiGLU gate, up, down)."""
HF_TARGETS = {leaf: _PROJECTIONS[path].rsplit(".", 1)[1] for leaf, path in TARGET_PATHS.items()}
"""raylm target -> PEFT ``target_modules`` name (wq -> q_proj, w1 -> gate_proj ...)."""

_ADAPTER_NAME = re.compile(r"(layers\.\d+\.(.+))\.lora_[AB]\.weight")


class LoRALinear(nn.Module):
    """A bias-free linear layer with a frozen weight and a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator):
        super().__init__()
        self.weight = base.weight  # the same Parameter: loaded weights and their name carry over
        self.weight.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank
        # PEFT's defaults (init_lora_weights=True): A as nn.Linear initialises itself, B zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, in) -> (B, T, out); the update goes through the rank-wide bottleneck, never a dense (out, in) delta.
        return F.linear(x, self.weight) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def add_lora(model: nn.Module, lora: LoraConfig, seed: int) -> None:
    """Freeze every weight of the Llama ``model`` and put adapters on the projections ``lora.targets`` names, in every block.

    ``seed`` fixes the A matrices, so every rank (and a resumed stage) starts from the same adapters.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for block in model.layers:
        for target in lora.targets:
            parent_path, leaf = TARGET_PATHS[target].split(".")
            parent = getattr(block, parent_path)
            setattr(parent, leaf, LoRALinear(getattr(parent, leaf), lora.rank, lora.alpha, lora.dropout, generator))


def adapter_weights(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The adapters among the weights of ``state`` (raylm names)."""
    return {name: tensor for name, tensor in state.items() if _ADAPTER_NAME.fullmatch(name)}


def load_adapters(model: nn.Module, adapters: Mapping[str, torch.Tensor]) -> None:
    """Set the adapters of a model made by ``add_lora`` (the base stays as built); they must be exactly its adapters."""
    expected = set(adapter_weights(model.state_dict()))
    if set(adapters) != expected:
        raise ValueError(f"the adapters do not fit this stage's lora settings: missing {sorted(expected - set(adapters))[:3]}, "
                         f"unexpected {sorted(set(adapters) - expected)[:3]}")
    model.load_state_dict(dict(adapters), strict=False)


def merged_weights(base: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor], lora: LoraConfig) -> Dict[str, torch.Tensor]:
    """Dense weights computing what base + adapters compute (without dropout): W + scaling * B A, in fp32."""
    merged = dict(base)
    scaling = lora.alpha / lora.rank
    for name in adapters:
        module = _ADAPTER_NAME.fullmatch(name).group(1)
        if name.endswith("lora_A.weight"):
            a, b = adapters[name].float(), adapters[f"{module}.lora_B.weight"].float()
            weight = f"{module}.weight"
            merged[weight] = base[weight].float() + scaling * (b @ a)  # (out, rank) @ (rank, in)
    return merged


def peft_name(name: str) -> str:
    """``layers.0.attention.wq.lora_A.weight`` -> ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    match = _ADAPTER_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name} is not a LoRA adapter weight")
    layer = match.group(1).split(".")[1]
    projection = _PROJECTIONS[match.group(2)]
    return f"{PEFT_PREFIX}model.layers.{layer}.{projection}.{name.rsplit('.', 2)[1]}.weight"


def peft_config(lora: LoraConfig) -> Dict:
    """PEFT's ``adapter_config.json`` for these settings (the base model is the stage's initial weights, exported)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(HF_TARGETS[t] for t in lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": None,
    }


def save_peft_adapter(adapters: Mapping[str, torch.Tensor], lora: LoraConfig, out_dir: Path) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as ``peft.PeftModel.from_pretrained`` reads them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {peft_name(name): tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in adapters.items()}
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG_FILE).write_text(json.dumps(peft_config(lora), indent=2) + "\n")
    return out_dir
