"""raylm's consolidated weight format: ``model.safetensors`` + ``config.json``.

This is what stages hand to each other and what export reads: safetensors,
never a pickle, so weights crossing a trust boundary cannot run code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Dict, Tuple

import torch
from safetensors.torch import load_file, save_file

from raylm.configs.schema import ModelConfig
from raylm.errors import UserError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TIED_HEAD = "output.weight"


def save_consolidated(state_dict: Dict[str, torch.Tensor], cfg: ModelConfig, out_dir: Path) -> None:
    """Write full (unsharded) weights; a tied head is stored once, as the embedding."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if not (cfg.tie_embeddings and k == TIED_HEAD)}
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "raylm"})
    (out_dir / CONFIG).write_text(json.dumps({"format": "raylm", "model": asdict(cfg)}, indent=2))


def with_tied_head(state_dict: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """``state_dict`` as ``Llama.load_state_dict`` wants it: a tied head (stored once) points at the embedding."""
    return {**state_dict, TIED_HEAD: state_dict["tok_embeddings.weight"]} if cfg.tie_embeddings else state_dict


def is_raylm_dir(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG).read_text()).get("format") == "raylm"
    except (OSError, ValueError):
        return False


def _raylm_model_config(path: Path) -> ModelConfig:
    raw = json.loads((path / CONFIG).read_text())["model"]
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in raw.items() if k in known})


def model_config_of(path: Path) -> ModelConfig:
    """The model shape stored with weights (raylm final/ or Hugging Face), without loading them."""
    if is_raylm_dir(path):
        return _raylm_model_config(path)
    from raylm.models.hf import model_config_from_hf

    if not (path / CONFIG).is_file():
        raise UserError(f"{path} has no {CONFIG}; point at a raylm final/ or Hugging Face Llama directory")
    return model_config_from_hf(json.loads((path / CONFIG).read_text()), source=str(path / CONFIG))


def load_consolidated(path: Path) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise UserError(f"{path} has no {WEIGHTS} + {CONFIG}; point at a stage's final/ directory")
    cfg = _raylm_model_config(path)
    return cfg, with_tied_head(load_file(str(path / WEIGHTS)), cfg)


def load_any(path: Path) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """Weights from a raylm final/ directory or a Hugging Face Llama directory."""
    if is_raylm_dir(path):
        return load_consolidated(path)
    from raylm.models.hf import load_hf_dir

    return load_hf_dir(path)
