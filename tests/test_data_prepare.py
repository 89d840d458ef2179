"""raylm data prepare: input formats, Megatron shards, the manifest's reuse rules, data.source=DIR,
tokenizer choices, one-line errors for bad inputs, and Ray tasks on a 2-node cluster."""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import one_line_error
from raylm.configs.schema import DataConfig, ModelConfig
from raylm.data import corpus, prepare_dataset
from raylm.data.corpus import input_pieces, pydoc_topics, source_inputs
from raylm.data.indexed import IndexedShard, ShardWriter
from raylm.data.prepare import MANIFEST, prepare, tokenizer_sample
from raylm.data.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer, train_tokenizer
from raylm.errors import UserError
from raylm.files import read_text
from raylm.launcher.cli import main

DOCS = [f"document {i}: " + "héllo wörld " * (3 + i % 5) for i in range(24)]


@pytest.fixture(scope="module")
def byte() -> Tokenizer:
    return train_tokenizer([], "byte", MIN_VOCAB_SIZE)


def write_corpus(root: Path) -> list:
    """One input of every format, in the order a directory source lists them; returns (name, documents)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text(DOCS[0])
    (root / "b.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS[1:6])))
    with gzip.open(root / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in DOCS[6:10]))
    pq.write_table(pa.table({"id": list(range(10, 15)), "text": DOCS[10:15]}), root / "d.parquet", row_group_size=2)
    # A Hugging Face save_to_disk directory: Arrow IPC *stream* files (what datasets writes) beside JSON.
    hf = root / "e_hf"
    hf.mkdir()
    table = pa.table({"text": DOCS[15:20]})
    with pa.ipc.new_stream(str(hf / "data-00000-of-00001.arrow"), table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    (hf / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (hf / "dataset_info.json").write_text("{}")
    with pa.ipc.new_file(str(root / "f.arrow"), table.schema) as writer:  # Arrow's file layout (Feather v2)
        writer.write_table(pa.table({"text": DOCS[20:24]}))
    return DOCS


def stream_of(out: Path) -> np.ndarray:
    manifest = json.loads((out / MANIFEST).read_text())
    return np.concatenate([IndexedShard(out / "shards" / r["shard"]).tokens for r in manifest["shards"]])


def expected_stream(tokenizer: Tokenizer, documents: list) -> np.ndarray:
    return np.concatenate([tokenizer.encode(d) + [tokenizer.eos_id] for d in documents])


def test_every_format_gives_the_documents_in_order(byte, tmp_path):
    documents = write_corpus(tmp_path / "corpus")
    manifest = prepare(source_inputs([str(tmp_path / "corpus")]), tmp_path / "out", byte)
    assert len(manifest["shards"]) == 6 and manifest["documents"] == len(documents)
    np.testing.assert_array_equal(stream_of(tmp_path / "out"), expected_stream(byte, documents))


def test_shards_are_megatron_indexed_datasets(byte, tmp_path):
    """The .idx layout of Megatron-LM's indexed_dataset.py, read here with struct alone."""
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:3]))
    manifest = prepare([str(tmp_path / "c.jsonl")], tmp_path / "out", byte)
    prefix = tmp_path / "out" / "shards" / manifest["shards"][0]["shard"]
    raw = Path(f"{prefix}.idx").read_bytes()
    magic, version, code, sequences, doc_indices = struct.unpack("<9sQBQQ", raw[:34])
    assert (magic, version, code, sequences, doc_indices) == (b"MMIDIDX\x00\x00", 1, 8, 3, 4)  # 8 = uint16
    lengths = np.frombuffer(raw, np.int32, 3, 34)
    pointers = np.frombuffer(raw, np.int64, 3, 34 + 12)
    documents = np.frombuffer(raw, np.int64, 4, 34 + 12 + 24)
    assert lengths.tolist() == [len(byte.encode(d)) + 1 for d in DOCS[:3]]
    assert pointers.tolist() == [0, 2 * lengths[0], 2 * (lengths[0] + lengths[1])]
    assert documents.tolist() == [0, 1, 2, 3] and len(raw) == 34 + 12 + 24 + 32
    tokens = np.fromfile(f"{prefix}.bin", dtype=np.uint16)
    np.testing.assert_array_equal(tokens[pointers[1] // 2 : pointers[1] // 2 + lengths[1]], byte.encode(DOCS[1]) + [byte.eos_id])


def test_large_vocabularies_use_int32(tmp_path):
    writer = ShardWriter(tmp_path / "big", np.dtype(np.int32))
    writer.extend(np.array([70000, 1]))
    writer.extend(np.array([2]))
    writer.end_document()
    writer.close()
    assert Path(f"{tmp_path / 'big'}.idx").read_bytes()[17] == 4  # Megatron's code for int32
    np.testing.assert_array_equal(IndexedShard(tmp_path / "big").tokens, [70000, 1, 2])
    assert IndexedShard(tmp_path / "big").lengths.tolist() == [3]


def _mtimes(out: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}


def test_rerun_is_a_no_op_and_a_changed_input_re_tokenizes_only_its_shard(byte, tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    out = tmp_path / "out"
    inputs = source_inputs([str(corpus)])
    first = prepare(inputs, out, byte)
    before = _mtimes(out)
    assert prepare(inputs, out, byte) == first and _mtimes(out) == before
    # Touched but unchanged: its hash still matches, nothing is tokenized again.
    os.utime(corpus / "b.jsonl", ns=(1, 1))
    prepare(inputs, out, byte)
    assert {k: v for k, v in _mtimes(out).items() if not k.endswith(".json")} == {k: v for k, v in before.items() if not k.endswith(".json")}
    # One changed input: only its .bin/.idx/.json are rewritten.
    (corpus / "a.txt").write_text("a changed document")
    changed = prepare(inputs, out, byte)
    after = _mtimes(out)
    rewritten = {name for name in after if after[name] != before[name]}
    a_shard = changed["shards"][0]["shard"]
    assert rewritten - {f"{r['shard']}.json" for r in changed["shards"]} == {f"{a_shard}.bin", f"{a_shard}.idx"}
    assert changed["shards"][2:] == first["shards"][2:]
    np.testing.assert_array_equal(stream_of(out), expected_stream(byte, ["a changed document", *DOCS[1:]]))
    # An input left out loses its shard.
    prepare(inputs[1:], out, byte)
    assert not any(name.startswith(a_shard) for name in _mtimes(out))


def test_inputs_are_tokenized_largest_first_and_the_manifest_keeps_their_order(byte, tmp_path):
    from raylm.data.prepare import run_here

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, size in (("a.txt", 10), ("b.txt", 300), ("c.txt", 40), ("d.txt", 2000)):
        (corpus / name).write_text("x" * size)
    inputs = source_inputs([str(corpus)])
    handed = []

    def recording(fn, jobs):
        handed.extend(Path(job.input).name for job in jobs)
        return run_here()(fn, jobs)

    manifest = prepare(inputs, tmp_path / "out", byte, runner=recording)
    assert handed == ["d.txt", "b.txt", "c.txt", "a.txt"]
    assert [r["tokens"] for r in manifest["shards"]] == [11, 301, 41, 2001]  # the byte tokenizer: a token per byte, and the end


def test_data_source_can_be_a_prepared_directory(byte, tmp_path):
    write_corpus(tmp_path / "corpus")
    assert main(["data", "prepare", str(tmp_path / "corpus"), "--out", str(tmp_path / "prepared"), "--workers", "1", "--vocab-size", "300"]) == 0
    tokenizer = Tokenizer.load(tmp_path / "prepared")
    data_cfg = DataConfig(source=str(tmp_path / "prepared"), val_fraction=0.1)
    train, val, used = prepare_dataset("pretrain", data_cfg, ModelConfig(vocab_size=300, max_seq_len=16), tmp_path / "run_data", seed=3)
    assert used.fingerprint == tokenizer.fingerprint
    assert not list((tmp_path / "run_data").glob("shards"))  # the run reads the prepared shards where they are
    everything = np.concatenate([train.window(0, train.num_tokens), val.window(0, val.num_tokens)])
    assert sorted(everything.tolist()) == sorted(stream_of(tmp_path / "prepared").tolist())
    with pytest.raises(UserError, match="prepared with another tokenizer"):
        prepare_dataset("pretrain", data_cfg, ModelConfig(vocab_size=300, max_seq_len=16), tmp_path / "other", seed=3, tokenizer=byte)


def test_tokenizer_from_a_file_a_directory_or_a_run(byte, tmp_path):
    (tmp_path / "t.txt").write_text(DOCS[0])
    byte.save(tmp_path / "run" / "tokenizer")
    for given in (tmp_path / "run", tmp_path / "run" / "tokenizer", tmp_path / "run" / "tokenizer" / "tokenizer.json"):
        out = tmp_path / f"out_{given.name}"
        assert main(["data", "prepare", str(tmp_path / "t.txt"), "--out", str(out), "--workers", "1", "--tokenizer", str(given)]) == 0
        assert Tokenizer.load(out).fingerprint == byte.fingerprint


def test_tokenizer_sample_is_bounded_and_takes_from_every_input(tmp_path):
    for name in "ab":
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name}{i} " * 100}) + "\n" for i in range(100)))
    inputs = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    sample = list(tokenizer_sample(inputs, "text", budget_bytes=5000))
    assert sample == list(tokenizer_sample(inputs, "text", budget_bytes=5000))
    assert sum(len(s) for s in sample) <= 5000 + 2 * 500
    assert sample[0].startswith("a0 ") and sample[-1].startswith("b")


def test_rerun_of_the_command_keeps_its_tokenizer_and_shards(tmp_path):
    (tmp_path / "t.txt").write_text(" ".join(DOCS))
    args = ["data", "prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / "out"), "--workers", "1", "--vocab-size", "300"]
    assert main(args) == 0
    before = _mtimes(tmp_path / "out")
    assert main(args) == 0
    assert _mtimes(tmp_path / "out") == before


def test_encode_batches_are_bounded_by_documents_and_text():
    from raylm.data.prepare import _batches

    pieces = [("a" * n, True) for n in (3, 3, 3, 9, 1, 1, 1, 1, 1)]
    assert [[len(text) for text, _ in b] for b in _batches(pieces, size=4, max_chars=8)] == [[3, 3], [3], [9], [1, 1, 1, 1], [1]]
    assert [len(b) for b in _batches([(d, True) for d in DOCS], size=512, max_chars=1 << 20)] == [len(DOCS)]


def whitespace_heavy_text() -> str:
    """The Python help topics joined, each followed by runs of spaces, blank lines, tabs, trailing spaces,
    CRLF line ends or non-ASCII lines, five times over (about 2.4 MB): many cut points, and many line breaks
    next to whitespace, where a cut would change the tokens (" \n" ending a piece is one pre-token)."""
    fillers = ["   \n\n\n", "\t\tx  \n \ny\n", "end \r\nnext \n\nlast\r\n", "héllo 日本語 🎉\nwörld \nagain\n",
               "\n" * 5 + " " * 40 + "z\n\tq", "trailing \n\n\ttab \nspace \n\n" * 40]
    return "".join(topic + fillers[i % len(fillers)] for i, (_, topic) in enumerate(pydoc_topics())) * 5


def prepared_text_file(tmp_path: Path, text: str, tokenizer: Tokenizer) -> tuple:
    """(manifest, token stream, the document read whole) of one text file prepared into ``tmp_path / "out"``."""
    path = tmp_path / "doc.txt"
    path.write_bytes(text.encode())  # bytes, so that CRLF line ends stay in the file
    manifest = prepare([str(path)], tmp_path / "out", tokenizer)
    return manifest, stream_of(tmp_path / "out"), read_text(path, "")


def test_a_text_file_in_pieces_gives_the_tokens_of_the_whole_document(monkeypatch, tmp_path):
    """With a BPE trained on the text itself, which merges a space with a line break: a cut after " \n" would
    change the tokens."""
    monkeypatch.setattr(corpus, "PIECE_CHARS", 4096)
    text = whitespace_heavy_text()
    tokenizer = train_tokenizer([text[: len(text) // 5]], "bpe", 512)  # one of the five copies
    assert "ĠĊ" in tokenizer.hf.get_vocab()  # byte-level BPE's symbols for " " and "\n"
    manifest, stream, document = prepared_text_file(tmp_path, text, tokenizer)
    assert len(list(input_pieces(str(tmp_path / "doc.txt")))) > 400
    np.testing.assert_array_equal(stream, tokenizer.encode(document) + [tokenizer.eos_id])
    assert (manifest["documents"], manifest["tokens"], manifest["shards"][0]["text_bytes"]) == (1, len(stream), len(document.encode()))
    assert IndexedShard(tmp_path / "out" / "shards" / manifest["shards"][0]["shard"]).lengths.tolist() == [len(stream)]


def test_a_long_jsonl_document_is_encoded_in_pieces_and_ends_once(byte, monkeypatch, tmp_path):
    monkeypatch.setattr(corpus, "PIECE_CHARS", 4096)
    long = whitespace_heavy_text()[:300_000]
    documents = [DOCS[0], long, DOCS[1]]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    assert len(list(input_pieces(str(tmp_path / "c.jsonl")))) > 50
    manifest = prepare([str(tmp_path / "c.jsonl")], tmp_path / "out", byte)
    np.testing.assert_array_equal(stream_of(tmp_path / "out"), expected_stream(byte, documents))
    lengths = IndexedShard(tmp_path / "out" / "shards" / manifest["shards"][0]["shard"]).lengths
    assert manifest["documents"] == 3 and lengths.tolist() == [len(byte.encode(d)) + 1 for d in documents]


def test_a_text_file_without_cut_points_is_one_piece(byte, monkeypatch, tmp_path):
    """Every line break has whitespace on one side: nowhere to cut, so the document is one piece, held whole."""
    monkeypatch.setattr(corpus, "PIECE_CHARS", 4096)
    text = "".join(f"line {i} of text \n\n\tindented {i}\n " for i in range(2000))
    _, stream, document = prepared_text_file(tmp_path, text, byte)
    assert list(input_pieces(str(tmp_path / "doc.txt"))) == [(text, True)]
    np.testing.assert_array_equal(stream, byte.encode(document) + [byte.eos_id])


TOKENIZE_AND_MEASURE = """
import json, sys
from peak_rss import peak_since, start_measuring
from raylm.data import corpus
from raylm.data.prepare import ShardJob, tokenize_input
from raylm.data.tokenizer import MIN_VOCAB_SIZE, train_tokenizer
prepare = sys.modules["raylm.data.prepare"]
corpus.PIECE_CHARS, prepare.ENCODE_BATCH_CHARS = 1 << 14, 1 << 16
tokenizer_json = train_tokenizer([], "byte", MIN_VOCAB_SIZE).hf.to_str()
start = start_measuring()
record = tokenize_input(ShardJob(sys.argv[1], sys.argv[2], tokenizer_json, "text"))
print(json.dumps({"peak_mib": peak_since(start), "tokens": record["tokens"]}))
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_tokenizing_a_large_text_file_holds_a_batch_not_the_document(tmp_path):
    """Peak resident memory that tokenizing one 4 MB document adds, in a fresh process: what a batch costs, far
    from the ~280 bytes per token the whole document would (1.1 GB here, measured with pieces as large as the file). The byte tokenizer makes a token of
    every byte, the most a text can have; pieces and batches are made smaller than prepare's (16 and 64 KiB),
    so that a few MB show it (prepare's own: README, "Data", memory)."""
    import subprocess

    line = " ".join(f"word{i}" for i in range(12)) + "\n"
    (tmp_path / "big.txt").write_text(line * (4_000_000 // len(line)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", TOKENIZE_AND_MEASURE, str(tmp_path / "big.txt"), str(tmp_path / "big")],
                          env=env, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout)
    whole_document_mib = 280 * measured["tokens"] / 2**20
    assert measured["peak_mib"] < whole_document_mib / 20, (measured, whole_document_mib)


def test_a_bad_byte_far_into_a_large_text_file_is_one_line_and_leaves_no_shard(capsys, byte, monkeypatch, tmp_path):
    """After several batches of the file are written: the one line names the file and the byte's offset,
    and neither the shard nor the dataset is left looking complete."""
    monkeypatch.setattr(corpus, "PIECE_CHARS", 1 << 14)
    monkeypatch.setattr(sys.modules["raylm.data.prepare"], "ENCODE_BATCH_CHARS", 1 << 16)  # raylm.data.prepare is also a function
    good = "".join(f"line {i} of a long file\n" for i in range(40000)).encode()  # about 1 MB: 15 batches
    path = tmp_path / "big.txt"
    path.write_bytes(good + "café\n".encode("latin-1") + good[:1000])
    expected = f"{path} is not UTF-8 text (bad byte at offset {len(good) + 3})"
    with pytest.raises(UserError, match=re.escape(expected)):
        prepare([str(path)], tmp_path / "out", byte)
    assert [p.name for p in (tmp_path / "out" / "shards").iterdir()] == [] and not (tmp_path / "out" / MANIFEST).exists()
    byte.save(tmp_path / "tok")
    line = one_line_error(capsys, "data", "prepare", str(path), "--out", str(tmp_path / "new"), "--workers", "1", "--tokenizer", str(tmp_path / "tok"))
    assert expected in line and not (tmp_path / "new").exists()


def metaspace_tokenizer(texts: list) -> Tokenizer:
    """A SentencePiece-like BPE: Metaspace puts "▁" before every text it encodes, so pieces encoded alone differ."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS), show_progress=False))
    return Tokenizer(hf)


def test_a_tokenizer_that_is_not_byte_level_encodes_a_text_file_whole(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus, "PIECE_CHARS", 1024)
    text = "".join(f"line {i} of the file\nwith words\n" for i in range(1000))
    tokenizer = metaspace_tokenizer([text])
    assert not tokenizer.encodes_pieces_alone
    _, stream, document = prepared_text_file(tmp_path, text, tokenizer)
    pieces = [piece for piece, _ in input_pieces(str(tmp_path / "doc.txt"))]
    assert len(pieces) > 10 and sum((tokenizer.encode(p) for p in pieces), []) != tokenizer.encode(document)
    np.testing.assert_array_equal(stream, tokenizer.encode(document) + [tokenizer.eos_id])


def test_a_rerun_with_nothing_to_tokenize_starts_no_cluster(monkeypatch, tmp_path):
    """Every shard is reused: no Ray cluster is started or joined (that alone took 8 s of a no-op rerun)."""
    import raylm.cluster.connect

    (tmp_path / "t.txt").write_text(" ".join(DOCS))
    args = ["data", "prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / "out"), "--vocab-size", "300"]
    assert main([*args, "--workers", "1"]) == 0
    before = _mtimes(tmp_path / "out")

    def no_cluster(*_, **__):
        raise AssertionError("a cluster was started with nothing to tokenize")

    monkeypatch.setattr(raylm.cluster.connect, "start_or_connect", no_cluster)
    assert main([*args, "--workers", "2"]) == 0
    assert main([*args, "--address", "127.0.0.1:1"]) == 0
    assert _mtimes(tmp_path / "out") == before


def test_a_task_runs_tokenizers_on_one_thread_and_restores_the_environment(monkeypatch):
    from raylm.cluster.tasks import TASK_ENV, _on_one_core

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.setenv("RAYON_NUM_THREADS", "7")
    assert _on_one_core(lambda keys: [os.environ.get(k) for k in keys], list(TASK_ENV)) == list(TASK_ENV.values())
    assert "TOKENIZERS_PARALLELISM" not in os.environ and os.environ["RAYON_NUM_THREADS"] == "7"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ray_tasks_see_the_one_thread_environment(ray_cluster):
    """Set in the task's process (no runtime_env of its own, which would cost a fresh worker per slot)."""
    from raylm.cluster.tasks import TASK_ENV, map_unordered

    got = dict(map_unordered(os.getenv, list(TASK_ENV), 2))
    assert [got[i] for i in range(len(TASK_ENV))] == list(TASK_ENV.values())


def _bad(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("notes.csv", "a,b\n", r"notes.csv: unknown format '.csv'; give a .txt"),
        ("empty.txt", "  \n", r"SOURCE '.*empty.txt' holds only empty documents"),
        ("latin1.txt", b"caf\xe9", r"latin1.txt is not UTF-8 text \(bad byte at offset 3\)"),
        ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"latin1.jsonl:2: not UTF-8 text"),
        ("fields.jsonl", '{"text": "ok"}\n{"body": "x"}\n', r"fields.jsonl:2: no field 'text' \(fields: body\); set --text-field"),
    ],
)
def test_bad_input_is_one_line_naming_file_and_fix(capsys, tmp_path, name, content, expected):

    path = _bad(tmp_path, name, content)
    line = one_line_error(capsys, "data", "prepare", str(path), "--out", str(tmp_path / "out"), "--workers", "1", "--tokenizer-sample-mb", "1")
    assert re.search(expected, line), line
    assert not (tmp_path / "out").exists()


def test_parquet_without_the_column_names_file_and_columns(capsys, byte, tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    byte.save(tmp_path / "tok")
    line = one_line_error(capsys, "data", "prepare", str(tmp_path / "p.parquet"), "--out", str(tmp_path / "out"), "--workers", "1", "--tokenizer", str(tmp_path / "tok"))
    assert f"{tmp_path / 'p.parquet'}: no column 'text' (columns: body); set --text-field to the column holding the text" in line
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "n.parquet")
    line = one_line_error(capsys, "data", "prepare", str(tmp_path / "n.parquet"), "--out", str(tmp_path / "out"), "--workers", "1", "--tokenizer", str(tmp_path / "tok"))
    assert "n.parquet: row 1 of column 'text' is null" in line
    assert not (tmp_path / "out").exists()


def test_an_unfinished_prepared_directory_is_refused(byte, tmp_path):
    (tmp_path / "t.txt").write_text(DOCS[0])
    prepare([str(tmp_path / "t.txt")], tmp_path / "out", byte)
    (tmp_path / "out" / MANIFEST).unlink()
    with pytest.raises(UserError, match="unfinished prepared dataset"):
        prepare_dataset("pretrain", DataConfig(source=str(tmp_path / "out")), ModelConfig(), tmp_path / "run", seed=0)


TWO_NODE_PREPARE = """
import json, os, sys
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
from ray.cluster_utils import Cluster
from raylm.launcher.cli import main
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
for _ in range(2):
    cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
try:
    codes = [main(["data", "prepare", *args, "--address", cluster.address, "--workers", "2"]) for args in json.loads(sys.argv[1])]
finally:
    cluster.shutdown()
print(json.dumps(codes))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_tasks_on_two_nodes_give_the_single_process_token_stream(byte, tmp_path):
    """Each input file is one Ray task on a 2-node cluster; the shards equal in-process tokenization
    byte for byte, and a bad file in one task stops the job with its one-line error."""
    import subprocess

    documents = write_corpus(tmp_path / "corpus")
    byte.save(tmp_path / "tok")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.txt").write_text("fine")
    (tmp_path / "bad" / "b.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    runs = [[str(tmp_path / "corpus"), "--out", str(tmp_path / "ray"), "--tokenizer", str(tmp_path / "tok")],
            [str(tmp_path / "bad"), "--out", str(tmp_path / "bad_out"), "--tokenizer", str(tmp_path / "tok")]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", TWO_NODE_PREPARE, json.dumps(runs)], env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [0, 2]
    assert f"raylm: error: {tmp_path / 'bad' / 'b.jsonl'}:2: no field 'text'" in done.stderr
    assert not (tmp_path / "bad_out").exists()
    prepare(source_inputs([str(tmp_path / "corpus")]), tmp_path / "here", byte)
    for shard in (tmp_path / "here" / "shards").glob("*.[bi][id][nx]"):
        assert shard.read_bytes() == (tmp_path / "ray" / "shards" / shard.name).read_bytes(), shard.name
    np.testing.assert_array_equal(stream_of(tmp_path / "ray"), expected_stream(byte, documents))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_launch_trains_on_a_prepared_directory(ray_cluster, tmp_path):
    """`raylm launch data.source=DIR`: the run takes the prepared tokenizer and reads the shards in place."""
    from conftest import TINY_PRETRAIN, launch_in_process

    write_corpus(tmp_path / "corpus")
    assert main(["data", "prepare", str(tmp_path / "corpus"), "builtin:pydoc", "--out", str(tmp_path / "prepared"),
                 "--workers", "1", "--vocab-size", "512"]) == 0
    run_dir = launch_in_process(tmp_path / "runs", "prepared", [*TINY_PRETRAIN, f"data.source={tmp_path / 'prepared'}", "cluster.num_workers=1", "train.max_steps=2"])
    summary = json.loads((run_dir / "pretrain" / "summary.json").read_text())
    assert np.isfinite(summary["final_loss"])
    assert Tokenizer.load(run_dir / "pretrain" / "final").fingerprint == Tokenizer.load(tmp_path / "prepared").fingerprint
    assert not (run_dir / "data" / "pretrain" / "shards").exists()
