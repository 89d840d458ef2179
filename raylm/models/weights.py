"""raylm's consolidated weight format: ``model.safetensors`` + ``config.json``.

This is what stages hand to each other and what export reads: safetensors,
never a pickle, so weights crossing a trust boundary cannot run code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from raylm.configs.schema import ModelConfig
from raylm.errors import UserError, first_line
from raylm.files import read_json
from raylm.models.classifier import LlamaClassifier
from raylm.models.llama import Llama

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TIED_HEAD = "output.weight"
LABELS = "labels"


def save_consolidated(state_dict: Dict[str, torch.Tensor], cfg: ModelConfig, out_dir: Path, labels: Optional[Sequence[str]] = None) -> None:
    """Write full (unsharded) weights; a tied head is stored once, as the embedding. A classifier's (``labels``
    given) class names go into config.json, in the order of its head's rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if not (cfg.tie_embeddings and k == TIED_HEAD)}
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "raylm"})
    config = {"format": "raylm", "model": asdict(cfg), **({LABELS: list(labels)} if labels is not None else {})}
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2))


def stored_labels(path: Path, fix: str = "point at a complete raylm final/ directory") -> Optional[List[str]]:
    """The class names of a raylm classifier's weights (None for a language model's)."""
    labels = read_json(path / CONFIG, fix).get(LABELS)
    if labels is not None and (not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(label, str) for label in labels)):
        raise UserError(f"{path / CONFIG} has {LABELS}={labels!r}, not a list of two or more strings; {fix}")
    return labels


POINT_AT_WEIGHTS = "point at a complete raylm final/ or Hugging Face Llama directory"
"""What to do about a weights directory that cannot be used, unless the caller knows better."""


def with_tied_head(state_dict: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """``state_dict`` as ``Llama.load_state_dict`` wants it: a tied head (stored once) points at the embedding."""
    return {**state_dict, TIED_HEAD: state_dict["tok_embeddings.weight"]} if cfg.tie_embeddings else state_dict


def is_raylm_dir(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG).read_text()).get("format") == "raylm"
    except (OSError, ValueError, AttributeError):
        return False


def _raylm_model_config(path: Path, fix: str) -> ModelConfig:
    from raylm.configs.loader import model_config_from

    raw = read_json(path / CONFIG, fix).get("model")
    if not isinstance(raw, dict):
        raise UserError(f"{path / CONFIG} has no 'model' mapping; {fix}")
    known = {f.name for f in fields(ModelConfig)}
    return model_config_from({k: v for k, v in raw.items() if k in known}, str(path / CONFIG), fix)


def model_config_of(path: Path, fix: str = POINT_AT_WEIGHTS) -> ModelConfig:
    """The model shape stored with weights (raylm final/ or Hugging Face), without loading them."""
    if is_raylm_dir(path):
        return _raylm_model_config(path, fix)
    from raylm.models.hf import hf_model_config

    return hf_model_config(path, fix)


def read_safetensors(path: Path, fix: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a truncated or foreign file is a UserError naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise _unreadable(path, err, fix) from None


def header_shapes(path: Path, fix: str) -> Dict[str, Tuple[int, ...]]:
    """name -> shape from a safetensors header alone (it is checked against the file's size, no tensor is read)."""
    try:
        with safe_open(str(path), "pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise _unreadable(path, err, fix) from None


def _unreadable(path: Path, err: BaseException, fix: str) -> UserError:
    if isinstance(err, OSError):
        return UserError(f"cannot read {path} ({err.strerror or err}); {fix}")
    return UserError(f"{path} is truncated or not a safetensors file ({first_line(err)}); {fix}")


def check_shapes(shapes: Mapping[str, Sequence[int]], cfg: ModelConfig, source: str, fix: str, labels: Optional[Sequence[str]] = None) -> None:
    """Refuse weights (raylm names -> shapes) that are not exactly ``Llama(cfg)``'s (``LlamaClassifier``'s with ``labels``),
    before ``load_state_dict`` would fail."""
    with torch.device("meta"):  # shapes without allocating a model
        model = Llama(cfg) if labels is None else LlamaClassifier(cfg, len(labels))
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if labels is None and cfg.tie_embeddings and TIED_HEAD not in shapes and "tok_embeddings.weight" in shapes:
        shapes = {**shapes, TIED_HEAD: shapes["tok_embeddings.weight"]}
    problems = [f"{name} is missing" for name in expected if name not in shapes]
    problems += [f"{name} is not in the model" for name in shapes if name not in expected]
    problems += [f"{name} is {list(shapes[name])}, the config needs {list(shape)}"
                 for name, shape in expected.items() if name in shapes and tuple(shapes[name]) != shape]
    if problems:
        raise UserError(f"the weights in {source} do not match their {CONFIG} ({'; '.join(problems[:3])}); {fix}")


def check_weights(path: Path, fix: str = POINT_AT_WEIGHTS) -> ModelConfig:
    """The model config stored with weights, once every weight file's header shows that model's
    tensors (no tensor is read: cheap enough to check before a launch creates anything)."""
    cfg = model_config_of(path, fix)
    if is_raylm_dir(path):
        if not (path / WEIGHTS).is_file():
            raise UserError(f"{path} has {CONFIG} but no {WEIGHTS}; {fix}")
        shapes = header_shapes(path / WEIGHTS, fix)
    else:
        from raylm.models.hf import from_hf_state_dict, hf_weight_files

        hf_shapes: Dict[str, Tuple[int, ...]] = {}
        for weights_file in hf_weight_files(path):
            hf_shapes.update(header_shapes(weights_file, fix))
        shapes = from_hf_state_dict(hf_shapes, cfg, source=str(path))
    check_shapes(shapes, cfg, str(path), fix)
    return cfg


def load_consolidated(path: Path, fix: str = POINT_AT_WEIGHTS) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise UserError(f"{path} has no {WEIGHTS} + {CONFIG}; {fix}")
    cfg = _raylm_model_config(path, fix)
    labels = stored_labels(path, fix)
    state = read_safetensors(path / WEIGHTS, fix)
    if labels is None and "tok_embeddings.weight" in state:
        state = with_tied_head(state, cfg)
    check_shapes({name: t.shape for name, t in state.items()}, cfg, str(path), fix, labels)
    return cfg, state


Location = Tuple[Path, str]
"""Where one weight is stored: a safetensors file and the tensor's key in it."""


def weight_locations(path: Path, fix: str = POINT_AT_WEIGHTS) -> Dict[str, Location]:
    """raylm weight name -> its location in a raylm final/ or Hugging Face Llama directory (headers only are read;
    a tied head is located at the embedding)."""
    cfg = model_config_of(path, fix)
    if not is_raylm_dir(path):
        from raylm.models.hf import hf_weight_locations

        return hf_weight_locations(path, cfg, fix)
    return with_tied_head({key: (path / WEIGHTS, key) for key in header_shapes(path / WEIGHTS, fix)}, cfg)


def read_part(location: Location, dim: Optional[int], index: int, parts: int) -> torch.Tensor:
    """The stored tensor, or with ``dim`` only its ``index``-th of ``parts`` equal slices along ``dim``: just those bytes are read."""
    path, key = location
    try:
        with safe_open(str(path), "pt") as handle:
            stored = handle.get_slice(key)
            if dim is None:
                part = stored[:]
            else:
                size = stored.get_shape()[dim]
                if size % parts:
                    raise ValueError(f"{key} in {path} has {size} entries along dimension {dim}, not a multiple of {parts}")
                step = size // parts
                part = stored[(slice(None),) * dim + (slice(index * step, (index + 1) * step),)]
            # A copy out of the memory-mapped file: its pages, counted in this process's resident memory
            # while mapped, are let go when the file closes (a column slice touches the whole tensor's).
            return part.clone()
    except (SafetensorError, OSError) as err:
        raise _unreadable(path, err, POINT_AT_WEIGHTS) from None


def load_any(path: Path, fix: str = POINT_AT_WEIGHTS) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """Weights from a raylm final/ directory or a Hugging Face Llama directory, checked against their config."""
    if is_raylm_dir(path):
        return load_consolidated(path, fix)
    from raylm.models.hf import load_hf_dir

    return load_hf_dir(path, fix)
