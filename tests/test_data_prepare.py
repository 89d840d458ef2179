"""raylm data prepare: input formats, Megatron shards, the manifest's reuse rules, data.source=DIR,
tokenizer choices, one-line errors for bad inputs, and Ray tasks on a 2-node cluster."""

from __future__ import annotations

import gzip
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import one_line_error
from raylm.configs.schema import DataConfig, ModelConfig
from raylm.data import prepare_dataset
from raylm.data.corpus import source_inputs
from raylm.data.indexed import IndexedShard, ShardWriter
from raylm.data.prepare import MANIFEST, prepare, tokenizer_sample
from raylm.data.tokenizer import MIN_VOCAB_SIZE, Tokenizer, train_tokenizer
from raylm.errors import UserError
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
    writer.add(np.array([70000, 1, 2]))
    writer.close()
    assert Path(f"{tmp_path / 'big'}.idx").read_bytes()[17] == 4  # Megatron's code for int32
    np.testing.assert_array_equal(IndexedShard(tmp_path / "big").tokens, [70000, 1, 2])


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

    docs = ["a" * n for n in (3, 3, 3, 9, 1, 1, 1, 1, 1)]
    assert [[len(d) for d in b] for b in _batches(docs, size=4, max_chars=8)] == [[3, 3], [3], [9], [1, 1, 1, 1], [1]]
    assert [len(b) for b in _batches(DOCS, size=512)] == [len(DOCS)]


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
    import re

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
