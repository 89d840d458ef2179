"""The Hugging Face Llama adapter: config, weight names, and export/import directories.

raylm's RoPE uses Hugging Face's rotate_half layout, so q/k weights map across
unchanged; only names differ. Nothing here imports ``transformers``: an export
is plain JSON plus safetensors, and imports never unpickle.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from safetensors.torch import save_file

from raylm.configs.schema import ModelConfig
from raylm.errors import UserError
from raylm.files import read_json
from raylm.models.classifier import SCORE_WEIGHT
from raylm.models.shapes import ffn_hidden_size, head_dim, kv_heads
from raylm.models.weights import POINT_AT_WEIGHTS, Location, check_shapes, header_shapes, read_safetensors

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

TOP_LEVEL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
"""raylm name -> Hugging Face name, within ``layers.{i}.`` / ``model.layers.{i}.``."""

_RAYLM_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_TO_RAYLM_TOP = {hf: ours for ours, hf in TOP_LEVEL_NAMES.items()}
_HF_TO_RAYLM_LAYER = {hf: ours for ours, hf in LAYER_NAMES.items()}
_HF_DERIVED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
"""Old Hugging Face checkpoints store RoPE frequencies; they are recomputed from the config."""


def hf_config(
    cfg: ModelConfig,
    bos_token_id: Optional[int] = None,
    eos_token_id: Union[int, List[int], None] = None,
    pad_token_id: Optional[int] = None,
    dtype: str = "float32",
) -> Dict[str, Any]:
    """The ``config.json`` of the equivalent ``LlamaForCausalLM`` (``eos_token_id`` may list every id that ends a generation).

    RoPE and the dtype are written in both the transformers 4 (``rope_theta``,
    ``torch_dtype``) and 5 (``rope_parameters``, ``dtype``) spellings so either reads it.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": ffn_hidden_size(cfg),
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": kv_heads(cfg),
        "head_dim": head_dim(cfg),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }


def _config_value(config: Mapping[str, Any], key: str, source: str, default: Any = None, kind: type = int) -> Any:
    """A number of the config; without ``default`` the key is required."""
    if key not in config and default is None:
        raise UserError(f"{source} lacks '{key}'; it is not a complete Hugging Face Llama config.json")
    value = config.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise UserError(f"{source} has {key}={value!r}; it must be {'a number' if kind is float else 'an integer'}")
    return kind(value)


def model_config_from_hf(config: Mapping[str, Any], source: str = CONFIG_FILE, fix: str = POINT_AT_WEIGHTS) -> ModelConfig:
    """The raylm ``ModelConfig`` of a Hugging Face Llama ``config.json`` dict; refuses what raylm cannot represent."""
    from raylm.configs.loader import model_config_from

    if config.get("model_type") != "llama":
        raise UserError(f"{source} has model_type={config.get('model_type')!r}; only Hugging Face Llama models (model_type 'llama') can be imported")
    rope = config.get("rope_parameters") or {}
    if not isinstance(rope, Mapping) or config.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise UserError(f"{source} uses RoPE scaling ({config.get('rope_scaling') or rope}); raylm supports plain RoPE only, pick a model without rope_scaling")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise UserError(f"{source} sets {flag}=true; raylm's Llama has no biases, pick a model without them")
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source} has hidden_act={config['hidden_act']!r}; raylm's SwiGLU needs 'silu'")
    d_model = _config_value(config, "hidden_size", source)
    n_head = _config_value(config, "num_attention_heads", source)
    if n_head < 1 or config.get("head_dim") not in (None, d_model // n_head) or d_model % n_head:
        raise UserError(f"{source} has head_dim={config.get('head_dim')} with hidden_size={d_model}, num_attention_heads={n_head}; raylm needs head_dim = hidden_size / heads")
    return model_config_from(
        {
            "vocab_size": _config_value(config, "vocab_size", source),
            "d_model": d_model,
            "n_layer": _config_value(config, "num_hidden_layers", source),
            "n_head": n_head,
            "n_kv_head": _config_value(config, "num_key_value_heads", source, default=n_head),
            "ffn_hidden": _config_value(config, "intermediate_size", source),
            "max_seq_len": _config_value(config, "max_position_embeddings", source),
            "rope_theta": _config_value(config, "rope_theta", source, default=rope.get("rope_theta") or 10000.0, kind=float),
            "norm_eps": _config_value(config, "rms_norm_eps", source, default=1e-6, kind=float),
            # transformers' LlamaConfig defaults to untied.
            "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
            "init_std": _config_value(config, "initializer_range", source, default=0.02, kind=float),
        },
        source,
        fix,
    )


def _is_tied(sd: Mapping[str, torch.Tensor]) -> bool:
    head, embedding = sd.get("output.weight"), sd["tok_embeddings.weight"]
    return head is None or (head.data_ptr() == embedding.data_ptr() and head.shape == embedding.shape)


def to_hf_state_dict(sd: Mapping[str, torch.Tensor], tie_embeddings: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """raylm names -> Hugging Face names; a tied head is left out (``lm_head`` is tied on load).

    ``tie_embeddings=None`` infers tying: no ``output.weight``, or one sharing
    the embedding's storage (as in a tied model's ``state_dict()``).
    """
    tied = _is_tied(sd) if tie_embeddings is None else tie_embeddings
    out = {}
    for name, tensor in sd.items():
        if name == "output.weight" and tied:
            continue
        out[_to_hf_name(name)] = tensor
    return out


def _to_hf_name(name: str) -> str:
    if name in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[name]
    match = _RAYLM_LAYER.fullmatch(name)
    if match is None or match.group(2) not in LAYER_NAMES:
        raise ValueError(f"{name} is not a raylm Llama weight")
    return f"model.layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}"


def raylm_names(cfg: ModelConfig) -> List[str]:
    """Every state-dict name of ``Llama(cfg)`` (``output.weight`` included even when tied, as in ``state_dict()``)."""
    per_layer = [f"layers.{i}.{suffix}" for i in range(cfg.n_layer) for suffix in LAYER_NAMES]
    return ["tok_embeddings.weight", *per_layer, "norm.weight", "output.weight"]


def from_hf_state_dict(sd: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str = "the Hugging Face weights") -> Dict[str, torch.Tensor]:
    """Hugging Face names -> raylm names; with tied embeddings ``output.weight`` IS the embedding tensor."""
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in sd.items():
        ours = _from_hf_name(name)
        if ours is not None:
            out[ours] = tensor
        elif not _HF_DERIVED.fullmatch(name):
            unknown.append(name)
    if unknown:
        raise UserError(f"{source} holds weights a raylm Llama does not have ({', '.join(unknown[:3])}); it is not a plain Llama checkpoint")
    if cfg.tie_embeddings and "tok_embeddings.weight" in out:
        # A tied checkpoint may also store lm_head; the embedding is the one both share.
        out["output.weight"] = out["tok_embeddings.weight"]
    missing = [name for name in raylm_names(cfg) if name not in out]
    if missing:
        raise UserError(f"{source} lacks {', '.join(_to_hf_name(n) for n in missing[:3])}; the weights do not match their config.json")
    return out


def _from_hf_name(name: str) -> Optional[str]:
    if name in _HF_TO_RAYLM_TOP:
        return _HF_TO_RAYLM_TOP[name]
    match = _HF_LAYER.fullmatch(name)
    if match is None or match.group(2) not in _HF_TO_RAYLM_LAYER:
        return None
    return f"layers.{match.group(1)}.{_HF_TO_RAYLM_LAYER[match.group(2)]}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_hf(
    model_state_dict: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: Union[str, Path],
    tokenizer_json_path: Optional[Union[str, Path]] = None,
    special_tokens: Optional[Mapping[str, Any]] = None,
    stop_tokens: Sequence[str] = (),
    chat_template: Optional[str] = None,
    labels: Optional[Sequence[str]] = None,
) -> Path:
    """Write a directory ``transformers`` loads offline as ``LlamaForCausalLM`` (and ``AutoTokenizer``), or, with
    ``labels`` (the weights a ``LlamaClassifier``'s), as ``LlamaForSequenceClassification`` over those classes.

    ``special_tokens`` (e.g. ``{"bos_token": ..., "eos_token": ..., "pad_token": ...,
    "additional_special_tokens": [...]}``) and ``chat_template`` (Jinja) go into
    tokenizer_config.json, and the ids of bos/pad (looked up in the tokenizer)
    into config.json and generation_config.json. Their ``eos_token_id`` is the
    id of each of ``stop_tokens`` (a list when there are several, as
    ``generate`` accepts), else the eos token's. They need ``tokenizer_json_path``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    special_tokens = dict(special_tokens or {})
    if (special_tokens or stop_tokens or chat_template) and tokenizer_json_path is None:
        raise ValueError("special tokens and a chat template need tokenizer_json_path")
    ids = _special_token_ids(Path(tokenizer_json_path), special_tokens, stop_tokens) if tokenizer_json_path else {}

    # A classifier's head has the same name in both: Hugging Face's sequence classifiers call it score too.
    head = {SCORE_WEIGHT: model_state_dict[SCORE_WEIGHT]} if labels is not None else {}
    hf_sd = {**to_hf_state_dict({k: v for k, v in model_state_dict.items() if k not in head}, cfg.tie_embeddings), **head}
    # Safetensors refuses tensors sharing storage; each tensor is written on its own.
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in hf_sd.items()}
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})

    dtype = _dtype_name(tensors["model.embed_tokens.weight"].dtype)
    config = hf_config(cfg, ids.get("bos_token"), ids.get("eos_token"), ids.get("pad_token"), dtype=dtype)
    if labels is not None:
        # Its pooling finds each text's last token by config.pad_token_id, which special_tokens must therefore name.
        config.update(architectures=["LlamaForSequenceClassification"], problem_type="single_label_classification",
                      id2label={str(index): label for index, label in enumerate(labels)},
                      label2id={label: index for index, label in enumerate(labels)})
    _write_json(out_dir / CONFIG_FILE, config)
    generation = {"bos_token_id": ids.get("bos_token"), "eos_token_id": ids.get("eos_token"), "pad_token_id": ids.get("pad_token")}
    _write_json(out_dir / GENERATION_CONFIG_FILE, {k: v for k, v in generation.items() if v is not None})

    if tokenizer_json_path is not None:
        shutil.copyfile(tokenizer_json_path, out_dir / TOKENIZER_FILE)
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.max_seq_len,
            # Decoding gives back exactly the text that was encoded, as raylm's own decode does.
            "clean_up_tokenization_spaces": False,
            **special_tokens,
        }
        if chat_template is not None:
            tokenizer_config["chat_template"] = chat_template
        _write_json(out_dir / TOKENIZER_CONFIG_FILE, tokenizer_config)
    return out_dir


def _special_token_ids(tokenizer_json_path: Path, special_tokens: Mapping[str, Any], stop_tokens: Sequence[str]) -> Dict[str, Any]:
    """Ids of the bos/eos/pad tokens named in ``special_tokens``; the eos id is that of each stop token when there are any."""
    from tokenizers import Tokenizer

    if not tokenizer_json_path.is_file():
        raise UserError(f"no tokenizer at {tokenizer_json_path}; pass the path of a tokenizer.json")
    tokenizer = Tokenizer.from_file(str(tokenizer_json_path))

    def token_id(role: str, token: str) -> int:
        found = tokenizer.token_to_id(token)
        if found is None:
            raise UserError(f"{role} {token!r} is not in {tokenizer_json_path}; name a token of that tokenizer")
        return found

    ids: Dict[str, Any] = {role: token_id(role, special_tokens[role]) for role in ("bos_token", "eos_token", "pad_token")
                           if special_tokens.get(role) is not None}
    if stop_tokens:
        stops = [token_id("stop token", token) for token in stop_tokens]
        ids["eos_token"] = stops[0] if len(stops) == 1 else stops
    return ids


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def hf_model_config(directory: Path, fix: str = POINT_AT_WEIGHTS) -> ModelConfig:
    """The ModelConfig of a Hugging Face Llama directory's config.json."""
    config_path = Path(directory) / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"{directory} has no {CONFIG_FILE}; {fix}")
    return model_config_from_hf(read_json(config_path, fix), str(config_path), fix)


def load_hf_dir(directory: Union[str, Path], fix: str = POINT_AT_WEIGHTS) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """(config, state dict in raylm names) of a Hugging Face Llama directory of safetensors weights."""
    directory = Path(directory)
    cfg = hf_model_config(directory, fix)
    hf_sd: Dict[str, torch.Tensor] = {}
    for weights_file in hf_weight_files(directory):
        hf_sd.update(read_safetensors(weights_file, fix))
    state = from_hf_state_dict(hf_sd, cfg, source=str(directory))
    check_shapes({name: t.shape for name, t in state.items()}, cfg, str(directory), fix)
    return cfg, state


def hf_weight_locations(directory: Path, cfg: ModelConfig, fix: str = POINT_AT_WEIGHTS) -> Dict[str, Location]:
    """raylm weight name -> (shard file, Hugging Face key) in a Hugging Face Llama directory, from the headers alone."""
    located: Dict[str, Location] = {}
    for weights_file in hf_weight_files(directory):
        located.update({key: (weights_file, key) for key in header_shapes(weights_file, fix)})
    return from_hf_state_dict(located, cfg, source=str(directory))


def hf_weight_files(directory: Path) -> List[Path]:
    """model.safetensors, or the shards a model.safetensors.index.json names."""
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    index_path = directory / WEIGHTS_INDEX_FILE
    if index_path.is_file():
        weight_map = read_json(index_path, "download it again").get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index_path} has no 'weight_map' object; download it again")
        shards = sorted(set(map(str, weight_map.values())))
        missing = [shard for shard in shards if not (directory / shard).is_file()]
        if missing:
            raise UserError(f"{directory} lacks the shards {', '.join(missing[:3])} its {WEIGHTS_INDEX_FILE} names; download them too")
        return [directory / shard for shard in shards]
    raise UserError(f"{directory} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}; only safetensors weights are imported (convert .bin files first)")
