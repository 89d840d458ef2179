"""data.sources: a mixture prepared with one tokenizer, read by weight through its blend, reopened from its files alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from raylm.configs.schema import DataConfig, DataSourceConfig, ModelConfig
from raylm.data import open_dataset, prepare_dataset, prepared_mixture_sources, training_order
from raylm.data.prepare import prepare
from raylm.data.tokenizer import MIN_VOCAB_SIZE, Tokenizer, train_tokenizer
from raylm.errors import UserError

MODEL = ModelConfig(vocab_size=300, max_seq_len=16)


@pytest.fixture(scope="module")
def byte() -> Tokenizer:
    return train_tokenizer([], "byte", MIN_VOCAB_SIZE)


def write_jsonl(path: Path, letter: str, documents: int = 40) -> str:
    """Documents of one letter only, so that any window of tokens tells which source it came from."""
    path.write_text("".join(json.dumps({"text": letter * (20 + i % 7)}) + "\n" for i in range(documents)))
    return str(path)


def mixture(*weighted) -> DataConfig:
    return DataConfig(sources=[DataSourceConfig(path, weight) for path, weight in weighted], tokenizer="byte", val_fraction=0.1)


def letters_read(tokenizer: Tokenizer, inputs) -> list:
    """The one letter (besides <|endoftext|>) of each sample."""
    found = []
    for row in inputs:
        letters = set(tokenizer.decode(row.tolist()).replace("<|endoftext|>", ""))
        assert len(letters) == 1, letters
        found.append(letters.pop())
    return found


def test_training_reads_each_source_by_its_weight(tmp_path):
    data = mixture((write_jsonl(tmp_path / "a.jsonl", "a"), 0.7), (write_jsonl(tmp_path / "b.jsonl", "b", documents=8), 0.3))
    train, val, tokenizer = prepare_dataset("pretrain", data, MODEL, tmp_path / "run", seed=1)
    order = training_order(train, seed=1, samples=200)
    inputs, targets = train.batch([order.index_at(k) for k in range(200)])
    read = letters_read(tokenizer, inputs)
    assert (read.count("a"), read.count("b")) == (140, 60)
    assert order.consumed_by_source(200) == {data.sources[0].path: 140, data.sources[1].path: 60}
    assert train.sources[1].num_samples < 60  # the small source wrapped
    # The held-out split is read in blend order too: its samples weigh the sources as training does.
    held_out = letters_read(tokenizer, val.batch(range(val.num_samples))[0])
    assert abs(held_out.count("a") - 0.7 * val.num_samples) <= 0.5 and held_out.count("b") > 0


def test_every_source_is_tokenized_with_one_tokenizer_trained_across_them(tmp_path):
    model = ModelConfig(vocab_size=400, max_seq_len=16)
    data = DataConfig(sources=[DataSourceConfig(write_jsonl(tmp_path / "a.jsonl", "a"), 1.0), DataSourceConfig("builtin:pydoc", 1.0)])
    _, _, tokenizer = prepare_dataset("pretrain", data, model, tmp_path / "run", seed=0)
    saved = [Tokenizer.load(d) for d in sorted((tmp_path / "run" / "sources").iterdir())]
    assert len(saved) == 2 and {t.fingerprint for t in saved} == {tokenizer.fingerprint}
    # Its merges come from both: the letter runs of one source, which Python's documentation alone does not teach.
    _, _, pydoc_only = prepare_dataset("pretrain", DataConfig(), model, tmp_path / "pydoc", seed=0)
    assert len(tokenizer.encode("a" * 16)) < len(pydoc_only.encode("a" * 16))
    assert len(tokenizer.encode("the function returns")) < len("the function returns")  # and merges of English prose


def test_a_rerun_reuses_everything_and_a_changed_weight_only_reblends(tmp_path, byte):
    data = mixture((write_jsonl(tmp_path / "a.jsonl", "a"), 0.7), (write_jsonl(tmp_path / "b.jsonl", "b"), 0.3))
    train, _, _ = prepare_dataset("pretrain", data, MODEL, tmp_path / "run", seed=1, tokenizer=byte)
    training_order(train, seed=1, samples=100)
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    train, _, _ = prepare_dataset("pretrain", data, MODEL, tmp_path / "run", seed=1, tokenizer=byte)
    training_order(train, seed=1, samples=100)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()} == files
    reweighted = mixture((data.sources[0].path, 0.5), (data.sources[1].path, 0.5))
    train, _, _ = prepare_dataset("pretrain", reweighted, MODEL, tmp_path / "run", seed=1, tokenizer=byte)
    assert training_order(train, seed=1, samples=100).consumed_by_source(100) == {s.path: 50 for s in reweighted.sources}
    shards = [p for p in files if "/shards/" in str(p)]
    assert shards and all(p.stat().st_mtime_ns == files[p] for p in shards)  # nothing tokenized again


def test_a_mixture_opens_from_its_files_alone(tmp_path, byte):
    """Where the sources are out of reach (a run in object storage), the stage directory holds all it reads,
    a prepared source's shards linked in."""
    prepared = tmp_path / "prepared"
    prepare([write_jsonl(tmp_path / "a.jsonl", "a")], prepared, byte)
    data = mixture((str(prepared), 0.6), (write_jsonl(tmp_path / "b.jsonl", "b"), 0.4))
    train, val, _ = prepare_dataset("pretrain", data, MODEL, tmp_path / "run", seed=2)
    expected = train.batch([training_order(train, seed=2, samples=50).index_at(k) for k in range(50)])
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy)
    for source, target in prepared_mixture_sources(data, copy):
        shutil.copytree(source / "shards", target / "shards")
        shutil.copy2(source / "manifest.json", target / "manifest.json")
    expected_val = val.batch(range(val.num_samples))
    shutil.rmtree(prepared)
    train_copy, val_copy = open_dataset("pretrain", MODEL, copy)
    got = train_copy.batch([training_order(train_copy, seed=2, samples=50).index_at(k) for k in range(50)])
    assert all((a == b).all() for a, b in zip(expected, got))
    assert all((a == b).all() for a, b in zip(expected_val, val_copy.batch(range(val_copy.num_samples))))


def test_a_bad_source_is_named_by_its_key(tmp_path, byte):
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": " "}) + "\n")
    data = mixture((write_jsonl(tmp_path / "a.jsonl", "a"), 0.5), (str(tmp_path / "empty.jsonl"), 0.5))
    with pytest.raises(UserError, match=r"^data\.sources\.1\.path .*empty\.jsonl' holds only empty documents"):
        prepare_dataset("pretrain", data, MODEL, tmp_path / "run", seed=0, tokenizer=byte)
