"""Classify stages without Ray: the class head and its pooling, the built-in task, labels and rows, bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_SETTINGS, one_line_error
from numerics import assert_close, longest_reduction, model_depth, worst_case
from raylm.configs.loader import load_config, resolve_stage
from raylm.data import prepare_dataset
from raylm.data.pydoc_topic import BUILTIN_PYDOC_TOPIC, TOPIC_GROUPS, pydoc_topic_examples
from raylm.data.sft import IGNORE_INDEX
from raylm.models.classifier import SCORE_WEIGHT, LlamaClassifier, last_token_index
from raylm.models.llama import Llama
from raylm.parallelism.materialize import fresh_weights
from raylm.trainer.classify import with_score_head
from test_model import random_tokens, tiny_config

PAD = 0


def test_last_token_index_is_the_rightmost_non_pad_position():
    tokens = torch.tensor([[5, 6, PAD, PAD], [PAD, PAD, PAD, PAD], [1, 2, 3, 4], [7, PAD, 8, PAD]])
    assert last_token_index(tokens, PAD).tolist() == [1, 0, 3, 2]


def test_a_padded_batch_scores_each_text_as_if_it_were_alone():
    """The class logits of a right-padded row are those of its last token, which padding after it cannot change."""
    cfg = tiny_config()
    model = LlamaClassifier(cfg, 3, seed=0).eval()
    lengths = [5, 9, 16]
    texts = [random_tokens(1, n, seed=n)[0].clamp(min=1) for n in lengths]  # no pad id inside a text
    batch = torch.full((len(texts), 16), PAD)
    for row, text in enumerate(texts):
        batch[row, : len(text)] = text
    with torch.no_grad():
        pooled = model.classify(batch, PAD)  # (3, n_labels)
        alone = torch.stack([model(text[None])[0, -1] for text in texts])
        at_the_end = model(batch)[:, -1]
    assert pooled.shape == (3, 3)
    rel = worst_case(longest_reduction(cfg, 16)) * model_depth(cfg)
    assert_close(pooled, alone, "pooled vs each text alone", rel)
    # Reading the padded rows' last position instead would differ: the comparison can fail.
    assert (at_the_end[:2] - alone[:2]).abs().max() > 100 * rel * alone.abs().max()


def test_the_head_is_drawn_from_the_seed_and_the_backbone_is_the_language_models():
    cfg = tiny_config()
    first, again, other = LlamaClassifier(cfg, 4, seed=5), LlamaClassifier(cfg, 4, seed=5), LlamaClassifier(cfg, 4, seed=6)
    assert first.score.weight.shape == (4, cfg.d_model)
    assert torch.equal(first.score.weight, again.score.weight) and not torch.equal(first.score.weight, other.score.weight)
    language_model = Llama(cfg, seed=5).state_dict()
    state = first.state_dict()
    assert "output.weight" not in state and set(state) == set(language_model) - {"output.weight"} | {SCORE_WEIGHT}
    assert all(torch.equal(state[name], language_model[name]) for name in state if name != SCORE_WEIGHT)


def test_a_classify_stage_starts_from_the_given_weights_plus_the_seeded_head():
    cfg = tiny_config()
    source = with_score_head(fresh_weights(cfg, 1), cfg, 4, seed=7)
    assert torch.equal(source(SCORE_WEIGHT, 0, 1), LlamaClassifier(cfg, 4, seed=7).score.weight.detach())
    assert torch.equal(source("norm.weight", 0, 1), torch.ones(cfg.d_model))
    assert torch.equal(source("layers.0.attention.wq.weight", 0, 1), Llama(cfg, seed=1).layers[0].attention.wq.weight.detach())


def test_the_builtin_task_is_deterministic_and_balanced():
    examples = pydoc_topic_examples()
    assert examples == pydoc_topic_examples()
    counts = Counter(label for _, label in examples)
    assert sorted(counts) == sorted(TOPIC_GROUPS) and 3 <= len(counts) <= 8
    assert len(set(counts.values())) == 1 and min(counts.values()) >= 50, counts
    labels_of_text = {}
    for text, label in examples:
        labels_of_text.setdefault(text, set()).add(label)
    assert all(len(labels) == 1 for labels in labels_of_text.values()), "a paragraph under two labels"
    assert len(labels_of_text) == len(examples), "a paragraph twice"


def _classify_config(tmp_path: Path, source: str, *overrides: str):
    """The resolved config of a one-stage classify run."""
    run = load_config("tiny", [
        f"runs_dir={tmp_path}", f"stages=[{{name: cls, kind: classify, data: {{source: '{source}'}}}}]",
        "data.tokenizer=byte", "model.vocab_size=512", "model.max_seq_len=32", *overrides])
    return resolve_stage(run, 0)


def test_rows_target_the_closing_end_token_with_the_training_labels(tmp_path):
    run = _classify_config(tmp_path, BUILTIN_PYDOC_TOPIC, "data.val_fraction=0.2")
    train, val, tokenizer = prepare_dataset("classify", run.data, run.model, tmp_path / "data", run.train.seed)
    assert train.labels == val.labels == sorted(TOPIC_GROUPS)
    assert train.num_samples + val.num_samples == len(pydoc_topic_examples())
    assert abs(val.num_samples / (train.num_samples + val.num_samples) - 0.2) < 0.01
    for reader in (train, val):
        inputs, targets = reader.batch(range(reader.num_samples))
        marked = targets != IGNORE_INDEX
        assert (marked.sum(axis=1) == 1).all(), "one target per row"
        position = marked.argmax(axis=1)
        assert (position == last_token_index(torch.from_numpy(inputs), tokenizer.pad_id).numpy()).all()
        assert (inputs[np.arange(len(inputs)), position] == tokenizer.eos_id).all()
        assert set(reader.label_indices(range(reader.num_samples))) == set(range(len(TOPIC_GROUPS)))
    # Every label is in both splits in about its share: the split is per example, seeded.
    assert sorted(Counter(val.label_indices(range(val.num_samples)).tolist()).values())[0] >= 0.1 * val.num_samples


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_labels_are_the_sorted_strings_of_the_training_split(tmp_path):
    source = _jsonl(tmp_path / "c.jsonl", [{"text": f"text {i}", "label": "bcd"[i % 3]} for i in range(30)])
    run = _classify_config(tmp_path, str(source))
    train, val, _ = prepare_dataset("classify", run.data, run.model, tmp_path / "data", run.train.seed)
    assert train.labels == val.labels == ["b", "c", "d"]
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["labels"] == ["b", "c", "d"] and meta["train_examples"] + meta["val_examples"] == 30


SHORT = [*TINY_SETTINGS, "data.tokenizer=byte"]


def _launch_classify(source: str) -> list:
    return ["launch", *SHORT, f"stages=[{{name: cls, kind: classify, data: {{source: '{source}'}}}}]"]


@pytest.mark.parametrize("records, fragment", [
    ([{"text": "a", "label": "x"}, {"text": "b"}], "c.jsonl:2: expected string fields 'text' (set data.text_field) and 'label'"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": 3}], "c.jsonl:2: expected string fields"),
    ([{"text": "a", "label": "x"}, {"text": " ", "label": "y"}], "c.jsonl:2: empty 'text'"),
    ([{"text": f"t{i}", "label": "same"} for i in range(5)], "has only the label 'same' in its training split; a classifier needs at least two"),
])
def test_bad_classify_data_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch, records, fragment):
    monkeypatch.chdir(tmp_path)
    _jsonl(tmp_path / "c.jsonl", records)
    assert fragment in one_line_error(capsys, *_launch_classify("c.jsonl"))
    assert not (tmp_path / "runs").exists()


def test_a_label_only_the_held_out_split_has_is_named_with_its_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(20)] + [{"text": "rare", "label": "rare"}]
    _jsonl(tmp_path / "c.jsonl", records)
    # The seed that holds the one 'rare' example out (the split is seeded, per example).
    seed = next(s for s in range(100) if _held_out(len(records), 0.05, s)[-1])
    line = one_line_error(capsys, *_launch_classify("c.jsonl"), f"train.seed={seed}")
    assert "c.jsonl:21: label 'rare' is not one of the classifier's labels (a, b); only the held-out split has it" in line


def _held_out(n: int, fraction: float, seed: int) -> np.ndarray:
    from raylm.data.split import held_out_mask

    return held_out_mask(np.ones(n), fraction, seed)


@pytest.mark.parametrize("overrides, fragment", [
    (["stages.0.parallel.tp=2", "cluster.num_workers=2"], "kind classify cannot run with parallel.tp=2; set stages.0.parallel.tp=1"),
    (["parallel.pp=2", "parallel.zero_stage=1"], "kind classify cannot run with parallel.pp=2"),
    (["stages.0.lora={rank: 4}"], "kind classify does not take stages.0.lora"),
    (["stages.0.eval_tasks=raylm_pydoc_topic"], "kind classify does not take stages.0.eval_tasks"),
    (["stages.0.data.source=builtin:pydoc"], "data.source='builtin:pydoc' is not a built-in classify corpus; use builtin:pydoc-topic"),
    (["stages.0.data.source=notes.txt"], "data.source='notes.txt': no such file"),
])
def test_classify_layouts_and_options_refused_at_validation(capsys, overrides, fragment):
    stages = f"stages=[{{name: cls, kind: classify, data: {{source: '{BUILTIN_PYDOC_TOPIC}'}}}}]"
    assert fragment in one_line_error(capsys, "config", "show", stages, *overrides)


def test_a_stage_after_a_classifier_needs_its_own_weights(capsys):
    stages = f"stages=[{{name: cls, kind: classify, data: {{source: '{BUILTIN_PYDOC_TOPIC}'}}}}, {{name: more, kind: pretrain}}]"
    assert "stage 'more' would start from classify stage 'cls', whose weights are a classifier; set stages.1.init_from" in \
        one_line_error(capsys, "config", "show", stages)


def test_config_keys_explain_the_classify_kind_and_its_label_field(capsys):
    from raylm.launcher.cli import main

    assert main(["config", "keys"]) == 0
    out = capsys.readouterr().out
    assert "data.label_field = 'label'" in out and "holding a classify example's label" in out
    assert "'classify' (a class head on the last token's hidden state" in out and "builtin:pydoc-topic" in out
