"""GGUF export: what llama.cpp reads back is raylm's model, tensor by tensor and token by token.

Every file is read with the ``gguf`` package's own GGUFReader and dequantizer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from conftest import finished_run, one_line_error  # noqa: E402
from gguf_llama import field, greedy, read_gguf  # noqa: E402
from raylm.data.corpus import pydoc_topics  # noqa: E402
from raylm.data.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer  # noqa: E402
from raylm.launcher.cli import main  # noqa: E402
from raylm.models.generate import stream  # noqa: E402
from raylm.models.gguf_export import export_gguf, interleave_rope_rows  # noqa: E402
from raylm.models.llama import Llama  # noqa: E402
from raylm.models.shapes import ffn_hidden_size, head_dim, kv_heads  # noqa: E402
from raylm.models.weights import load_consolidated, save_consolidated  # noqa: E402

Q = gguf.GGMLQuantizationType
TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "output.weight": "output.weight"}
LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight", "attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight", "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w3.weight": "ffn_up.weight", "feed_forward.w2.weight": "ffn_down.weight",
}
"""raylm name -> the name llama.cpp's llama loader looks up (``blk.N.`` within a layer)."""

PROMPT = "The for statement"


def gguf_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    _, index, rest = name.split(".", 2)
    return f"blk.{index}.{LAYER_NAMES[rest]}"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The models are tiny: a second thread only waits for a core (seconds on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spread_weights(model: Llama) -> None:
    """Weights whose greedy continuation depends on every part of the model.

    Fresh weights (std 0.02) make a tied model repeat its last token whatever
    attention does; unit-scale matrices, a small embedding and norms that are
    not all ones (ones would hide a swap of the two norms) do not.
    """
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1 if name == "tok_embeddings.weight" else param.size(1) ** -0.5)


@pytest.fixture(scope="module")
def bpe_tokenizer() -> Tokenizer:
    return train_tokenizer((text for _, text in pydoc_topics()), "bpe", 512)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, bpe_tokenizer) -> Path:
    """conftest's finished run (the tiny preset: tied, GQA 4/2 heads, vocab 512) with a BPE tokenizer."""
    run = finished_run(tmp_path_factory.mktemp("runs"))
    final = run / "pretrain" / "final"
    cfg, state = load_consolidated(final, "")
    model = Llama(cfg)
    model.load_state_dict(state)
    spread_weights(model)
    save_consolidated(model.state_dict(), cfg, final)
    bpe_tokenizer.save(final)
    return run


def untied_model(tied: Llama) -> Llama:
    """Untied, and 80 wide: rows of 80 are not whole q8_0 blocks (32), so those matrices fall back to f16."""
    cfg = dataclasses.replace(tied.cfg, tie_embeddings=False, d_model=80, n_head=4, n_kv_head=2, ffn_hidden=96)
    model = Llama(cfg).eval()
    spread_weights(model)
    return model


def tied_model(run_dir: Path) -> Llama:
    cfg, state = load_consolidated(run_dir / "pretrain" / "final", "")
    model = Llama(cfg).eval()
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module", params=["tied-f16", "tied-q8_0", "untied-f16", "untied-q8_0"])
def exported(request, run_dir, bpe_tokenizer, tmp_path_factory):
    """(model, quant, GGUF file): the tied run through the CLI, the untied model through export_gguf."""
    shape, quant = request.param.split("-")
    out = tmp_path_factory.mktemp("gguf")
    model = tied_model(run_dir)
    if shape == "tied":
        assert main(["export", str(run_dir), "--format", "gguf", "--quant", quant, "--out", str(out)]) == 0
        return model, quant, out / f"done-pretrain-{quant}.gguf"
    model = untied_model(model)
    path = export_gguf(model.state_dict(), model.cfg, bpe_tokenizer, out / "untied.gguf", quant, "untied")
    return model, quant, path


def stored_type(array: np.ndarray, quant: str) -> Q:
    """llama.cpp's converter's rule: vectors f32; matrices f16, or q8_0 where rows are whole 32-value blocks."""
    if array.ndim == 1:
        return Q.F32
    return Q.Q8_0 if quant == "q8_0" and array.shape[1] % 32 == 0 else Q.F16


def q8_0_bound(original: np.ndarray) -> np.ndarray:
    """How far q8_0 may move each value: per block of 32, scale d = max|x| / 127, q = round(x / d) is off by at
    most d/2; the stored scale is d rounded to fp16, which moves q * d16 by up to 127 |d - d16| more."""
    blocks = original.reshape(-1, 32).astype(np.float64)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    d16 = d.astype(np.float16).astype(np.float64)
    return np.broadcast_to(d / 2 + 127 * np.abs(d - d16), blocks.shape).reshape(original.shape)


def in_gguf_layout(name: str, weight: torch.Tensor, cfg) -> np.ndarray:
    array = weight.float().numpy()
    if name.endswith("wq.weight"):
        return interleave_rope_rows(array, cfg.n_head)
    if name.endswith("wk.weight"):
        return interleave_rope_rows(array, kv_heads(cfg))
    return array


def quantized_like_the_file(model: Llama, quant: str) -> Llama:
    """raylm's model with each weight rounded as the file rounds it, in raylm's own layout and names.

    q8_0 rounds each row on its own, so rounding before or after the q/k row permutation is the same;
    nothing here goes through the export's naming or permutation.
    """
    rounded = Llama(model.cfg).eval()
    state = {}
    for name, weight in model.state_dict().items():
        array = weight.float().numpy()
        qtype = stored_type(array, quant)
        state[name] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype).copy())
    rounded.load_state_dict(state)
    return rounded


def test_every_tensor_is_stored_with_its_shape_type_and_values(exported):
    model, quant, path = exported
    reader = gguf.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    expected = {n: w for n, w in model.state_dict().items() if not (model.cfg.tie_embeddings and n == "output.weight")}
    assert sorted(stored) == sorted(gguf_name(n) for n in expected)  # a tied head is token_embd, as llama.cpp loads it
    types = set()
    for name, weight in expected.items():
        tensor = stored[gguf_name(name)]
        original = in_gguf_layout(name, weight, model.cfg)
        assert [int(n) for n in tensor.shape] == list(reversed(original.shape)), name  # GGUF lists dims innermost first
        assert tensor.tensor_type == stored_type(original, quant), name
        types.add(tensor.tensor_type)
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if tensor.tensor_type == Q.Q8_0:
            error = np.abs(values.astype(np.float64) - original)
            assert (error <= q8_0_bound(original) * (1 + 1e-6)).all(), f"{name}: max q8_0 error {error.max():.3g}"
        else:  # f32 exactly, f16 exactly the fp16 rounding of each value
            assert np.array_equal(values, original.astype(np.float16 if tensor.tensor_type == Q.F16 else np.float32)), name
    # The odd-width model mixes q8_0 with its f16 fallback; the run's q8_0 file is all q8_0 matrices.
    assert Q.Q8_0 in types if quant == "q8_0" else Q.Q8_0 not in types


def test_metadata_is_what_llama_cpps_llama_loader_reads(exported):
    model, quant, path = exported
    reader, cfg = gguf.GGUFReader(path), model.cfg
    expected = {
        "general.architecture": "llama",
        "general.file_type": {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant],
        "llama.vocab_size": cfg.vocab_size,
        "llama.context_length": cfg.max_seq_len,
        "llama.embedding_length": cfg.d_model,
        "llama.block_count": cfg.n_layer,
        "llama.feed_forward_length": ffn_hidden_size(cfg),
        "llama.attention.head_count": cfg.n_head,
        "llama.attention.head_count_kv": cfg.n_kv_head,
        "llama.rope.freq_base": cfg.rope_theta,
        "llama.rope.dimension_count": head_dim(cfg),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.add_bos_token": False,
    }
    assert {key: field(reader, key) for key in expected} == expected
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps, rel=1e-6)  # stored as f32


def test_llama_cpps_forward_over_the_file_gives_raylms_greedy_tokens(exported, bpe_tokenizer):
    """A numpy Llama in llama.cpp's conventions (interleaved RoPE on the permuted q/k, GQA, SwiGLU) over the
    dequantized file continues a prompt exactly as raylm's own greedy generation does with the same rounding."""
    model, quant, path = exported
    prompt = bpe_tokenizer.encode(PROMPT)
    expected = list(stream(quantized_like_the_file(model, quant), torch.tensor([prompt]), 16, temperature=0))
    reader, tensors = read_gguf(path)
    assert greedy(reader, tensors, prompt, 16) == expected
    assert len(set(expected)) > 4  # the continuation depends on the prompt, not one repeated token


def test_the_vocabulary_tokenizes_as_raylms_tokenizer(run_dir, tmp_path, bpe_tokenizer):
    """The gpt2 vocabulary rebuilt from the file alone (tokens by id, merges by rank, GPT-2's split) encodes
    text to raylm's ids; the special tokens are control tokens and the bos/eos/pad/eot ids are raylm's."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    main(["export", str(run_dir), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    control = [tok for tok, kind in zip(tokens, types) if kind == gguf.TokenType.CONTROL]
    assert control == list(SPECIAL_TOKENS)
    merges = [tuple(m.split(" ")) for m in field(reader, "tokenizer.ggml.merges")]
    rebuilt = HFTokenizer(models.BPE({tok: i for i, tok in enumerate(tokens)}, merges))
    rebuilt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rebuilt.add_special_tokens(control)
    text = "\n".join(text for _, text in pydoc_topics()[:20]) + "<|user|>\nwhy?<|end|>\n"
    assert rebuilt.encode(text).ids == bpe_tokenizer.encode(text)
    ids = {role: field(reader, f"tokenizer.ggml.{role}_token_id") for role in ("bos", "eos", "padding", "eot")}
    tok = bpe_tokenizer
    assert ids == {"bos": tok.eos_id, "eos": tok.eos_id, "padding": tok.pad_id, "eot": tok.end_id}


def test_the_byte_tokenizer_is_refused_and_nothing_is_written(tmp_path, capsys):
    run = finished_run(tmp_path / "runs")  # its tokenizer is the byte kind
    line = one_line_error(capsys, "export", str(run), "--format", "gguf", "--out", str(tmp_path / "out"))
    assert "byte tokenizer" in line and "data.tokenizer=bpe" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--format", "gguf", "--out", "{tmp}/taken.gguf"], "exists; choose a new file name"),
    (["--format", "gguf", "--out", "{tmp}/a_file"], "is a file; give a new .gguf file name or a directory"),
    (["--format", "gguf", "--quant", "q4_0", "--out", "{tmp}/x.gguf"], "invalid choice: 'q4_0'"),
    (["--quant", "q8_0", "--out", "{tmp}/hf"], "--quant q8_0 applies to --format gguf only"),
])
def test_bad_export_options_are_one_line_errors(run_dir, tmp_path, capsys, args, fragment):
    (tmp_path / "taken.gguf").write_bytes(b"keep")
    (tmp_path / "a_file").write_text("keep")
    line = one_line_error(capsys, "export", str(run_dir), *[a.format(tmp=tmp_path) for a in args])
    assert fragment in line
    assert (tmp_path / "taken.gguf").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "taken.gguf"]


def test_an_sft_stage_carries_raylms_chat_template_and_a_pretraining_one_none(run_dir, tmp_path, bpe_tokenizer):
    """llama.cpp's chat mode formats turns with ``tokenizer.chat_template``: the same Jinja template as the
    Hugging Face export (whose rendering the HF chat tests check token for token)."""
    from raylm.data.chat import jinja_chat_template

    sft = finished_run(tmp_path / "runs", kind="sft", state=tied_model(run_dir).state_dict())
    bpe_tokenizer.save(sft / "sft" / "final")
    assert main(["export", str(sft), "--format", "gguf", "--out", str(tmp_path / "sft.gguf")]) == 0
    assert field(gguf.GGUFReader(tmp_path / "sft.gguf"), "tokenizer.chat_template") == jinja_chat_template()
    assert main(["export", str(run_dir), "--format", "gguf", "--out", str(tmp_path / "pretrain.gguf")]) == 0
    assert "tokenizer.chat_template" not in gguf.GGUFReader(tmp_path / "pretrain.gguf").fields
