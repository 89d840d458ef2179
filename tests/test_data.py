"""raylm.data: tokenizers, corpora, packed tokens, chat template, sft rows, prepare_dataset."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from raylm.configs.schema import DataConfig, ModelConfig
from raylm.data import prepare_dataset
from raylm.data.chat import format_chat, tokenize_chat
from raylm.data.corpus import input_documents, source_inputs
from raylm.data.indexed import token_dtype
from raylm.data.packed import PackedTokens
from raylm.data.prepare import tokenizer_sample
from raylm.data.sft import IGNORE_INDEX, SftRows, build_sft, iter_sft_examples
from raylm.data.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer, train_tokenizer
from raylm.errors import UserError

UNICODE_TEXT = "héllo wörld — 日本語 🎉\n\n\tx  <|end|> trailing space "


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_tokenizer(iter_documents("builtin:pydoc"), "bpe", 512)


@pytest.fixture(scope="module")
def byte() -> Tokenizer:
    return train_tokenizer([], "byte", MIN_VOCAB_SIZE)


def iter_documents(source: str, text_field: str = "text") -> list:
    """The non-empty documents a source's inputs hold, in order (what its shards are made of)."""
    return [d for i in source_inputs([source]) for d in input_documents(i, text_field) if d.strip()]


def numbered_documents(count: int) -> list:
    return [f"document {i}: " + "word " * (5 + i % 7) for i in range(count)]


def pack(documents: list, tokenizer: Tokenizer, out: Path, val_fraction: float, seed: int, seq_len: int = 16):
    """(train, val, meta) of ``documents`` written as one JSONL input and prepared like any corpus."""
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    data_cfg = DataConfig(source=str(corpus), val_fraction=val_fraction)
    train, val, _ = prepare_dataset("pretrain", data_cfg, ModelConfig(vocab_size=300, max_seq_len=seq_len), out / "data", seed, tokenizer=tokenizer)
    return train, val, json.loads((out / "data" / "meta.json").read_text())


def split_documents(tokenizer: Tokenizer, reader: PackedTokens) -> list:
    """The documents of a packed split, recovered by cutting its token stream at eos."""
    return tokenizer.decode(reader.window(0, reader.num_tokens).tolist()).split(SPECIAL_TOKENS[0])[:-1]


# ---------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_tokenizer_round_trips_any_text(kind, bpe, byte):
    tokenizer = bpe if kind == "bpe" else byte
    assert tokenizer.kind == kind
    assert tokenizer.decode(tokenizer.encode(UNICODE_TEXT)) == UNICODE_TEXT


def test_bpe_has_exact_vocab_size_and_compresses(bpe, byte):
    assert bpe.vocab_size == 512
    assert byte.vocab_size == MIN_VOCAB_SIZE == 262
    text = "def function(argument): return argument"
    assert len(bpe.encode(text)) < len(byte.encode(text)) == len(text)


def test_special_tokens_are_single_distinct_ids(bpe):
    ids = [bpe.eos_id, bpe.pad_id, bpe.system_id, bpe.user_id, bpe.assistant_id, bpe.end_id]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert [bpe.encode(token) for token in SPECIAL_TOKENS] == [[i] for i in ids]


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_save_load_gives_same_encodings(kind, bpe, byte, tmp_path):
    tokenizer = bpe if kind == "bpe" else byte
    tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.encode(UNICODE_TEXT) == tokenizer.encode(UNICODE_TEXT)
    assert (loaded.kind, loaded.vocab_size, loaded.fingerprint) == (tokenizer.kind, tokenizer.vocab_size, tokenizer.fingerprint)


def test_saved_tokenizer_loads_in_hugging_face(bpe, tmp_path):
    import transformers

    bpe.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert hf.encode(UNICODE_TEXT) == bpe.encode(UNICODE_TEXT)
    assert (hf.eos_token_id, hf.pad_token_id) == (bpe.eos_id, bpe.pad_id)


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_tiny_vocab_is_a_user_error(kind):
    with pytest.raises(UserError, match="model.vocab_size=100"):
        train_tokenizer(["some text"], kind, 100)


def test_corpus_too_small_for_bpe_vocab_is_a_user_error():
    with pytest.raises(UserError, match="too small to learn 4096"):
        train_tokenizer(["tiny corpus"], "bpe", 4096)


def test_load_missing_tokenizer_names_the_path(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)):
        Tokenizer.load(tmp_path)


# ---------------------------------------------------------------- corpus
def test_builtin_pydoc_is_every_topic_sorted():
    from pydoc_data.topics import topics

    documents = list(iter_documents("builtin:pydoc"))
    assert documents == [topics[key] for key in sorted(topics)]


def test_text_file_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    assert list(iter_documents(str(tmp_path / "a.txt"))) == ["line one\nline two\n"]


def cut_by_definition(text: str, piece_chars: int) -> list:
    """Pieces of ``text``: each but the last ends just after the first "\n" at least ``piece_chars`` into it
    whose neighbours are both non-whitespace."""
    pieces, start = [], 0
    for i in range(1, len(text) - 1):
        if text[i] == "\n" and not text[i - 1].isspace() and not text[i + 1].isspace() and i + 1 - start >= piece_chars:
            pieces.append(text[start : i + 1])
            start = i + 1
    return pieces + [text[start:]]


@pytest.mark.parametrize("piece_chars", [2, 7, 64, 1000])
@pytest.mark.parametrize("chunk_chars", [1, 3, 50, 4096])
def test_text_is_cut_only_between_a_non_whitespace_character_and_a_line_break(piece_chars, chunk_chars):
    """However the text arrives in chunks."""
    import random

    from raylm.data.corpus import _cut

    rng = random.Random(piece_chars * chunk_chars)
    text = "".join(rng.choice(["a", "b", " ", "\n", "\n", "\t", "é", "日", "\x1c"]) for _ in range(5000))
    pieces = list(_cut([text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars)], piece_chars))
    assert pieces == cut_by_definition(text, piece_chars) and len(pieces) > 1


def test_a_text_without_cut_points_is_one_piece():
    from raylm.data.corpus import _cut

    text = "".join(f"line {i} \n\n\tindented\n " for i in range(100)) + "x"
    assert list(_cut([text[i : i + 10] for i in range(0, len(text), 10)], 16)) == [text]


@pytest.mark.parametrize("bad_at", [*range(61, 67), *range(190, 195), None])
def test_a_text_file_read_in_chunks_gives_the_whole_file_error_for_a_bad_byte(tmp_path, bad_at):
    """The same one line as reading the file whole, with the offset in the file, wherever the bad byte falls
    against the chunks of 64 bytes (inside a character the previous chunk ended in); None: the file ends
    inside a character."""
    from raylm.files import read_text, read_text_chunks

    data = "é日\r\n".encode() * 40  # characters of 2 and 3 bytes (one across byte 64, one across byte 192), CRLF line ends
    data = data + "日".encode()[:2] if bad_at is None else data[:bad_at] + b"\xff" + data[bad_at:]
    (tmp_path / "t.txt").write_bytes(data)
    with pytest.raises(UserError) as whole:
        read_text(tmp_path / "t.txt", "fix it")
    with pytest.raises(UserError) as chunked:
        "".join(read_text_chunks(tmp_path / "t.txt", "fix it", 64))
    assert str(chunked.value) == str(whole.value)


def test_a_text_file_read_in_chunks_is_the_text_read_whole(tmp_path):
    """Universal newlines too: a CRLF or a lone CR split between two chunks is one line break."""
    from raylm.files import read_text, read_text_chunks

    (tmp_path / "t.txt").write_bytes(("é\r\nline\rx\n日" * 50).encode())
    expected = read_text(tmp_path / "t.txt", "fix")
    assert "\r" not in expected
    for chunk_bytes in (1, 2, 3, 5, 64, 1 << 20):
        assert "".join(read_text_chunks(tmp_path / "t.txt", "fix", chunk_bytes)) == expected


def _tokenizer_variant(byte: Tokenizer, change) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(byte.hf.to_str())
    change(hf)
    return Tokenizer(hf)


def test_only_gpt2_byte_level_tokenizers_encode_pieces_alone(bpe, byte):
    from tokenizers import AddedToken, normalizers, pre_tokenizers

    assert bpe.encodes_pieces_alone and byte.encodes_pieces_alone
    assert _tokenizer_variant(byte, lambda hf: hf.add_tokens(["<x>", AddedToken("<r>", rstrip=True)])).encodes_pieces_alone
    changes = {
        "prefix space": lambda hf: setattr(hf, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)),
        "no regex": lambda hf: setattr(hf, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)),
        "metaspace": lambda hf: setattr(hf, "pre_tokenizer", pre_tokenizers.Metaspace()),
        "normalizer": lambda hf: setattr(hf, "normalizer", normalizers.NFKC()),
        "added line break": lambda hf: hf.add_tokens(["\n#"]),
        "added lstrip": lambda hf: hf.add_tokens([AddedToken("<l>", lstrip=True)]),
    }
    assert [name for name, change in changes.items() if _tokenizer_variant(byte, change).encodes_pieces_alone] == []


def test_directory_reads_txt_and_md_recursively_in_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("B")
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "sub" / "c.txt").write_text("C")
    (tmp_path / "skip.py").write_text("not text")
    (tmp_path / "empty.txt").write_text("  \n")
    assert list(iter_documents(str(tmp_path))) == ["A", "B", "C"]


def test_glob_matches_files_sorted(tmp_path):
    for name in ["2.txt", "1.txt", "x.log"]:
        (tmp_path / name).write_text(name)
    assert list(iter_documents(str(tmp_path / "*.txt"))) == ["1.txt", "2.txt"]


def test_jsonl_reads_the_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"body": "first"}\n\n{"body": "second", "id": 2}\n')
    assert list(iter_documents(str(path), text_field="body")) == ["first", "second"]


def test_missing_source_names_the_path(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(UserError, match="nowhere.txt"):
        list(iter_documents(str(missing)))


def test_glob_without_match_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="matched no files"):
        list(iter_documents(str(tmp_path / "*.txt")))


@pytest.mark.parametrize(
    "bad_line, expected",
    [("not json", r"c.jsonl:2: not valid JSON"), ("[1, 2]", r"c.jsonl:2: expected a JSON object"), ('{"other": "x"}', r"c.jsonl:2: no field 'text'")],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad_line, expected):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n' + bad_line + "\n")
    with pytest.raises(UserError, match=expected):
        list(iter_documents(str(path)))


def test_only_empty_documents_is_a_user_error(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n")
    with pytest.raises(UserError, match="only empty documents"):
        list(tokenizer_sample(source_inputs([str(tmp_path)]), "text"))


# ---------------------------------------------------------------- packed
def test_token_dtype_fits_the_vocabulary():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.int32  # Megatron's indexed format has no uint32


def test_packed_windows_are_shifted_by_one_and_do_not_overlap(byte, tmp_path):
    train, _, _ = pack(numbered_documents(40), byte, tmp_path, val_fraction=0.1, seed=0)
    tokens = train.window(0, train.num_tokens)
    assert train.num_samples == (len(tokens) - 1) // 16
    inputs, targets = train.batch([0, 1, 2])
    assert inputs.shape == targets.shape == (3, 16) and inputs.dtype == np.int64
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    np.testing.assert_array_equal(inputs.reshape(-1), tokens[:48])
    np.testing.assert_array_equal(targets.reshape(-1), tokens[1:49])


def test_held_out_split_is_whole_documents_disjoint_and_deterministic(byte, tmp_path):
    documents = numbered_documents(40)
    splits = {name: pack(documents, byte, tmp_path / name, val_fraction=0.2, seed=seed) for name, seed in (("a", 7), ("b", 7), ("c", 8))}
    train, val = (split_documents(byte, reader) for reader in splits["a"][:2])
    assert sorted(train + val) == sorted(documents)
    assert not set(train) & set(val)
    assert 0.1 < len(val) / len(documents) < 0.3
    assert split_documents(byte, splits["a"][1]) == split_documents(byte, splits["b"][1])
    assert split_documents(byte, splits["a"][1]) != split_documents(byte, splits["c"][1])


def test_two_documents_give_one_to_each_split(byte, tmp_path):
    train, val, _ = pack(["first document " * 4, "second document " * 4], byte, tmp_path, val_fraction=0.01, seed=0)
    assert len(split_documents(byte, train)) == len(split_documents(byte, val)) == 1


def test_single_document_splits_its_tokens(byte, tmp_path):
    _, _, meta = pack(["x" * 998], byte, tmp_path, val_fraction=0.1, seed=0)  # 999 tokens with eos
    assert (meta["train_tokens"], meta["val_tokens"]) == (899, 100)


def test_split_shorter_than_a_sequence_is_a_user_error(byte, tmp_path):
    train, _, _ = pack(numbered_documents(10), byte, tmp_path, val_fraction=0.1, seed=0)
    with pytest.raises(UserError, match="val split.*max_seq_len"):
        PackedTokens(train.prefixes, np.array([[0, 0, 50]]), seq_len=4096, split="val")


# ---------------------------------------------------------------- chat
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": " Six, with a leading space."},
]


def test_chat_template_renders_roles_and_generation_prompt():
    text = format_chat(CONVERSATION[1:2], add_generation_prompt=True)
    assert text == "<|user|>\nWhat is 2 + 2?<|end|>\n<|assistant|>\n"


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_chat_mask_covers_exactly_the_assistant_replies(kind, bpe, byte):
    tokenizer = bpe if kind == "bpe" else byte
    ids, mask = tokenize_chat(tokenizer, CONVERSATION)
    assert len(ids) == len(mask)
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "It is 4.<|end|> Six, with a leading space.<|end|>"
    # Segment-wise tokenization agrees with tokenizing the rendered text, which generation does.
    assert ids == tokenizer.encode(format_chat(CONVERSATION, add_generation_prompt=False))


def test_unknown_role_is_refused():
    with pytest.raises(ValueError, match="role 'bot'"):
        format_chat([{"role": "bot", "content": "hi"}], add_generation_prompt=False)


# ---------------------------------------------------------------- sft
def test_builtin_pydoc_sft_has_many_deterministic_examples():
    examples = list(iter_sft_examples("builtin:pydoc-sft"))
    assert len(examples) > 100
    assert examples == list(iter_sft_examples("builtin:pydoc-sft"))
    assert examples[0][0]["content"].startswith("Explain the Python topic '")
    assert all(len(m["content"]) <= 400 for example in examples for m in example)


def test_sft_jsonl_accepts_both_record_shapes(tmp_path):
    path = tmp_path / "sft.jsonl"
    records = [{"prompt": "p", "response": "r"}, {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert list(iter_sft_examples(str(path))) == [
        [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}],
        [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
    ]


@pytest.mark.parametrize(
    "bad_record, expected",
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, "sft.jsonl:2: message 0 has role 'robot'"),
        ({"prompt": "only a prompt"}, "sft.jsonl:2: expected string fields 'prompt' and 'response'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "sft.jsonl:2: no assistant message"),
    ],
)
def test_bad_sft_record_names_file_and_line(tmp_path, bad_record, expected):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n" + json.dumps(bad_record) + "\n")
    with pytest.raises(UserError, match=expected):
        list(iter_sft_examples(str(path)))


def test_sft_targets_ignore_prompt_and_padding(bpe, tmp_path):
    examples = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}] for i in range(10)]
    meta = build_sft(examples, bpe, tmp_path, seq_len=32, val_fraction=0.2, seed=0)
    assert (meta["train_examples"], meta["val_examples"], meta["truncated_examples"]) == (8, 2, 0)
    train = SftRows(tmp_path, "train")
    inputs, targets = train.batch(range(train.num_samples))
    assert inputs.shape == targets.shape == (8, 32) and targets.dtype == np.int64
    for row_inputs, row_targets in zip(inputs, targets):
        trained = row_targets[row_targets != IGNORE_INDEX]
        answer = bpe.decode(trained.tolist())
        assert answer.startswith("answer ") and answer.endswith("<|end|>")
        prompt_and_reply = bpe.decode(row_inputs[row_inputs != bpe.pad_id].tolist())
        assert prompt_and_reply.startswith("<|user|>\nquestion ")
        # Padding is ignored: after the last real token every target is -100.
        real = int((row_inputs != bpe.pad_id).sum())
        assert (row_inputs[real:] == bpe.pad_id).all() and (row_targets[real - 1 :] == IGNORE_INDEX).all()


def test_sft_truncates_long_examples_and_counts_them(byte, tmp_path):
    examples = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 100}] for _ in range(4)]
    meta = build_sft(examples, byte, tmp_path, seq_len=20, val_fraction=0.25, seed=0)
    assert meta["truncated_examples"] == 4
    inputs, targets = SftRows(tmp_path, "train").batch([0])
    assert (inputs != byte.pad_id).all()
    assert (targets[0, -5:] == byte.encode("a")[0]).all()


# ---------------------------------------------------------------- prepare_dataset
def test_prepare_pretrain_reuses_a_complete_dataset(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"word{i % 50}" for i in range(3000)))
    data_cfg = DataConfig(source=str(corpus), tokenizer="byte", val_fraction=0.1)
    model_cfg = ModelConfig(vocab_size=300, max_seq_len=32)
    out = tmp_path / "data"
    train, val, tokenizer = prepare_dataset("pretrain", data_cfg, model_cfg, out, seed=1)
    assert train.num_samples > 0 and val.num_samples > 0 and tokenizer.kind == "byte"
    first = train.batch([0])

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the dataset should have been reused")

    monkeypatch.setattr(sys.modules["raylm.data.prepare"], "tokenize_input", no_rebuild)
    monkeypatch.setattr("raylm.data.split_segments", no_rebuild)
    train_again, _, _ = prepare_dataset("pretrain", data_cfg, model_cfg, out, seed=1)
    np.testing.assert_array_equal(train_again.batch([0])[0], first[0])
    # A split whose meta.json never got written, or a different split recipe, is split again (the shard stays).
    (out / "meta.json").unlink()
    with pytest.raises(AssertionError, match="reused"):
        prepare_dataset("pretrain", data_cfg, model_cfg, out, seed=1)
    with pytest.raises(AssertionError, match="reused"):
        prepare_dataset("pretrain", replace(data_cfg, val_fraction=0.2), model_cfg, out, seed=1)
    # A shard whose index is gone is tokenized again.
    monkeypatch.undo()
    next(out.glob("shards/*.idx")).unlink()
    monkeypatch.setattr(sys.modules["raylm.data.prepare"], "tokenize_input", no_rebuild)
    with pytest.raises(AssertionError, match="reused"):
        prepare_dataset("pretrain", data_cfg, model_cfg, out, seed=1)


def test_prepare_sft_trains_a_tokenizer_on_the_examples(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"say {i}", "response": f"number {i} " * 5}) + "\n" for i in range(30)))
    data_cfg = DataConfig(source=str(path), tokenizer="bpe", val_fraction=0.1)
    train, val, tokenizer = prepare_dataset("sft", data_cfg, ModelConfig(vocab_size=300, max_seq_len=48), tmp_path / "sft", seed=0)
    assert (train.num_samples, val.num_samples) == (27, 3)
    assert tokenizer.vocab_size == 300 and (tmp_path / "sft" / "tokenizer.json").is_file()


def test_tokenizer_bigger_than_the_model_vocab_is_a_user_error(bpe, tmp_path):
    with pytest.raises(UserError, match="model.vocab_size=300"):
        prepare_dataset("pretrain", DataConfig(), ModelConfig(vocab_size=300), tmp_path, seed=0, tokenizer=bpe)
