"""llama.cpp's GGUF format: a raylm Llama and its tokenizer in one file (``raylm export --format gguf``).

The file is what llama.cpp's own converter (``convert_hf_to_gguf.py``, its
``LlamaModel``) writes for the Hugging Face export of the same model: weights
go raylm name -> Hugging Face name (``raylm.models.hf``) -> GGUF name (the
``gguf`` package's tensor map), q/k rows are permuted for llama.cpp's RoPE,
1-D tensors stay f32, and the tokenizer is a ``gpt2`` (byte-level BPE) vocabulary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from raylm.configs.schema import ModelConfig
from raylm.data.tokenizer import Tokenizer
from raylm.errors import UserError
from raylm.models.hf import to_hf_state_dict
from raylm.models.shapes import ffn_hidden_size, head_dim, kv_heads

try:
    import gguf
except ImportError:
    raise UserError("--format gguf needs the 'gguf' package; install it with pip install 'raylm[gguf]'") from None

QUANTS: Dict[str, Tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
"""--quant -> (the file's general.file_type, the type of its matrices)."""

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]  # "llama"


def interleave_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """q or k projection rows (n_heads * head_dim, d_model) from rotate-half order to llama.cpp's.

    raylm (like Hugging Face) rotates dimension i of a head with i + head_dim/2;
    llama.cpp's llama architecture rotates 2i with 2i + 1, both at frequency i.
    Row (head, j * head_dim/2 + i) moves to (head, 2i + j), llama.cpp's converter's
    ``permute``. q and k move alike, so every q.k score is unchanged.
    """
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_tensors(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, np.ndarray]:
    """GGUF name -> fp32 array in llama.cpp's layout; a tied head is left out (llama.cpp reuses token_embd)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layer)
    rope_heads = {"q_proj": cfg.n_head, "k_proj": kv_heads(cfg)}
    tensors = {}
    for hf_name, tensor in to_hf_state_dict(state_dict, cfg.tie_embeddings).items():
        array = tensor.detach().to("cpu", torch.float32).numpy()
        projection = hf_name.split(".")[-2]
        if projection in rope_heads:
            array = interleave_rope_rows(array, rope_heads[projection])
        tensors[names.get_name(hf_name, try_suffixes=(".weight",))] = array  # e.g. blk.0.attn_q.weight
    return tensors


def _encoded(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> Tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The bytes to store and their type: vectors (norms) stay f32, matrices take ``qtype``.

    A matrix whose rows are not whole q8_0 blocks (32 values) falls back to f16,
    as in llama.cpp's converter.
    """
    if array.ndim == 1:
        return array, gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> None:
    """raylm's byte-level BPE as llama.cpp's ``gpt2`` vocabulary: tokens by id, their types, merges by rank."""
    merges = json.loads(tokenizer.hf.to_str())["model"]["merges"]
    if not merges:
        # llama.cpp refuses a gpt2 vocabulary without tokenizer.ggml.merges, and GGUF cannot store an empty list.
        raise UserError("the stage's tokenizer is raylm's byte tokenizer (no BPE merges), which llama.cpp's gpt2 "
                        "vocabulary cannot hold; export a run trained with data.tokenizer=bpe")
    by_id = {i: token for token, i in tokenizer.hf.get_vocab(with_added_tokens=True).items()}
    special = {i for i, added in tokenizer.hf.get_added_tokens_decoder().items() if added.special}
    # Ids the tokenizer never produces (a vocabulary padded past it) get placeholders, as llama.cpp's converter does.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED
             for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    # ByteLevel's split is GPT-2's regex, which is llama.cpp's "gpt-2" pre-tokenizer.
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # tokenizers writes a merge as [left, right] (older versions "left right"); GGUF wants "left right".
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    # Every document ends with <|endoftext|>, so it also starts the next (GPT-2's convention): bos = eos.
    writer.add_bos_token_id(tokenizer.eos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_eot_token_id(tokenizer.end_id)  # a chat answer ends with <|end|>
    writer.add_add_bos_token(False)  # raylm's prompts start without one


def write_gguf(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, tokenizer: Tokenizer, path: Path, quant: str, name: str,
               chat_template: Optional[str] = None) -> None:
    """Write the model as a llama.cpp GGUF file at ``path`` (f16 or q8_0 matrices, f32 norms); an sft stage's
    ``chat_template`` (Jinja, as in the Hugging Face export) lets llama.cpp's chat mode format turns as raylm does."""
    file_type, qtype = QUANTS[quant]
    writer = gguf.GGUFWriter(path, ARCH)  # writes general.architecture
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(ffn_hidden_size(cfg))
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(kv_heads(cfg))
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(head_dim(cfg))
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    _add_tokenizer(writer, tokenizer, cfg.vocab_size)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for tensor_name, array in gguf_tensors(state_dict, cfg).items():
        data, data_type = _encoded(array, qtype)
        writer.add_tensor(tensor_name, data, raw_dtype=data_type)
    path.parent.mkdir(parents=True, exist_ok=True)  # only now: a refused export creates nothing
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, tokenizer: Tokenizer, out: Path, quant: str, name: str,
                chat_template: Optional[str] = None) -> Path:
    """``raylm export --format gguf``: ``out`` is a new ``.gguf`` file, or a directory that gets ``{name}-{quant}.gguf``."""
    if out.suffix != ".gguf" and out.is_file():
        raise UserError(f"--out {out} is a file; give a new .gguf file name or a directory")
    path = out if out.suffix == ".gguf" else out / f"{name}-{quant}.gguf"
    if path.exists():
        raise UserError(f"--out {path} exists; choose a new file name or directory")
    # Written aside and renamed: an interrupted export never leaves a truncated .gguf behind.
    partial = path.with_name(path.name + ".partial")
    try:
        write_gguf(state_dict, cfg, tokenizer, partial, quant, name, chat_template)
        os.replace(partial, path)
    except OSError as err:
        raise UserError(f"--out {out}: cannot write there ({err.strerror or err}); choose a writable path") from None
    finally:
        partial.unlink(missing_ok=True)
    return path
