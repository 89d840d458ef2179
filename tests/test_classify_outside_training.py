"""A finished classify stage outside training (made without Ray): `raylm eval` scores it, `raylm export --format hf`
writes a LlamaForSequenceClassification that transformers loads and that predicts what raylm predicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from conftest import TINY_PRETRAIN, one_line_error
from numerics import assert_close, longest_reduction, model_depth, worst_case
from raylm.configs.loader import load_config, resolve_stage
from raylm.data.classify import classifier_input
from raylm.data.pydoc_topic import BUILTIN_PYDOC_TOPIC, pydoc_topic_examples
from raylm.evals.classification import score_classifier
from raylm.launcher.cli import main
from raylm.launcher.inference import load_stage
from raylm.models.classifier import LlamaClassifier
from raylm.models.weights import save_consolidated
from raylm.trainer import run_dir as rundir
from raylm.trainer.stage_data import prepare_stage_data

STAGE = "cls"


def finished_classifier(runs_dir: Path, *overrides: str) -> Path:
    """A run whose one classify stage looks finished: a seeded classifier over the built-in task's labels,
    its head scaled up so that a fresh model's predictions differ from text to text."""
    stages = f"stages=[{{name: {STAGE}, kind: classify, data: {{source: '{BUILTIN_PYDOC_TOPIC}'}}}}]"
    run = load_config("tiny", [f"runs_dir={runs_dir}", "name=classified", *TINY_PRETRAIN, stages, "data.tokenizer=byte",
                               "data.val_fraction=0.2", *overrides])
    run_dir = rundir.create(run, "classified")
    data = prepare_stage_data(run_dir, run, 0)
    cfg = resolve_stage(run, 0)
    model = LlamaClassifier(cfg.model, len(data.train.labels), cfg.train.seed)
    with torch.no_grad():
        model.score.weight.mul_(50.0)
    final = run_dir / STAGE / "final"
    save_consolidated(model.state_dict(), cfg.model, final, data.train.labels)
    data.tokenizer.save(final)
    summary = {"stage": STAGE, "kind": "classify", "steps": 5, "final_loss": 1.0, "eval_loss": 1.0, "tokens_per_s": 1.0,
               "mfu": 0.0, "sample": "", "final_dir": str(final)}
    (run_dir / STAGE / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture(scope="module")
def classified(tmp_path_factory) -> Path:
    return finished_classifier(tmp_path_factory.mktemp("classified"))


def test_eval_scores_every_held_out_example(classified, capsys):
    assert main(["eval", str(classified)]) == 0
    result = json.loads(capsys.readouterr().out)
    stage = load_stage(classified, device=torch.device("cpu"))
    val = prepare_stage_data(classified, stage.run, 0).val
    expected = score_classifier(stage.model, val, stage.labels, stage.tokenizer.pad_id)
    assert result["stage"] == STAGE and result["examples"] == val.num_samples
    assert result["accuracy"] == expected["accuracy"] and result["per_class"] == expected["per_class"]
    assert sum(counts["support"] for counts in result["per_class"].values()) == val.num_samples
    assert sum(map(sum, result["confusion"])) == val.num_samples
    assert len({prediction for row in result["confusion"] for prediction, count in enumerate(row) if count}) > 1, \
        "the scaled head predicts more than one label"


def test_eval_data_with_an_unknown_label_names_its_line(classified, tmp_path, capsys):
    data = tmp_path / "more.jsonl"
    data.write_text('{"text": "for x in y: pass", "label": "statements"}\n{"text": "pdb", "label": "debugger"}\n')
    line = one_line_error(capsys, "eval", str(classified), "--data", str(data))
    assert f"{data}:2: label 'debugger' is not one of the classifier's labels" in line and "leave this example out of --data" in line
    data.write_text('{"text": "for x in y: pass", "label": "statements"}\n')
    assert main(["eval", str(classified), "--data", str(data)]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 1


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["export", "--format", "gguf", "--out", "x.gguf"],
                                     ["eval", "--tasks", "raylm_pydoc_topic"]])
def test_what_needs_a_language_model_refuses_a_classifier(classified, capsys, command):
    line = one_line_error(capsys, command[0], str(classified), *command[1:])
    assert f"stage '{STAGE}' is a classifier" in line and f"raylm eval --stage {STAGE}" in line


@pytest.mark.parametrize("tied", [True, False])
def test_hf_export_predicts_what_raylm_predicts(tmp_path, capsys, tied):
    run_dir = finished_classifier(tmp_path / "runs", f"model.tie_embeddings={str(tied).lower()}")
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(out)]) == 0
    stage = load_stage(run_dir, device=torch.device("cpu"))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert [model.config.id2label[i] for i in range(len(stage.labels))] == stage.labels
    texts = [text for text, _ in pydoc_topic_examples()[::10]]
    seq_len, pad_id = stage.model_cfg.max_seq_len, stage.tokenizer.pad_id
    rows = torch.full((len(texts), seq_len), pad_id)
    for row, text in enumerate(texts):
        ids = classifier_input(stage.tokenizer, text, seq_len)
        rows[row, : len(ids)] = torch.tensor(ids)
    # The exported tokenizer cuts, appends <|endoftext|> and pads with <|pad|> as raylm's rows do.
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    assert encoded["input_ids"].tolist() == rows.tolist()
    with torch.no_grad():
        theirs = model(input_ids=rows).logits  # (N, n_labels); no attention mask: padding only follows each text
        ours = stage.model.classify(rows, pad_id)
    assert_close(theirs, ours, "class logits", worst_case(longest_reduction(stage.model_cfg, seq_len)) * model_depth(stage.model_cfg))
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1)) and len(set(ours.argmax(-1).tolist())) > 1
    classify = transformers.pipeline("text-classification", model=str(out), device="cpu")
    # Texts longer than the context are cut as in training only when asked: transformers does not cut by default.
    assert [answer["label"] for answer in classify(texts, truncation=True)] == [stage.labels[i] for i in ours.argmax(-1).tolist()]
