"""`raylm eval RUN --tasks ...`: EleutherAI's lm-evaluation-harness on a stage, offline, on local task files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import finished_run, one_line_error, read_metrics
from raylm.configs.loader import load_config, resolve_stage
from raylm.data import prepare_dataset
from raylm.data.corpus import pydoc_topics
from raylm.data.tokenizer import train_tokenizer
from raylm.evals.builtin import BUILTIN_TASKS, NEXTWORD, held_out_topics, write_builtin_tasks
from raylm.trainer import run_dir as rundir
from raylm.launcher.cli import main
from raylm.launcher.inference import load_stage
from test_data import split_documents

METRICS = {
    "raylm_pydoc_nextword": {"perplexity,none", "perplexity_stderr,none", "acc,none", "acc_stderr,none"},
    "raylm_pydoc_topic": {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"},
    "raylm_pydoc_perplexity": {"word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"},
    "capitals": {"acc,none", "acc_stderr,none"},
}
"""lm-eval's own metric names ('<metric>,<filter>'), as its results and its CLI's table show them."""

CAPITALS_YAML = """\
task: capitals
dataset_path: json
dataset_kwargs:
  data_files: {test: DATA}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: What is the capital of {{country}}?\\nAnswer:"
doc_to_choice: "{{[a, b]}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def test_builtin_tasks_use_exactly_the_topics_pretraining_held_out(tmp_path):
    run = load_config("tiny", ["stages=[{name: pretrain, kind: pretrain}]", "data.tokenizer=byte"])
    tokenizer = train_tokenizer([], "byte", run.model.vocab_size)
    cfg = resolve_stage(run, 0)
    _, val, _ = prepare_dataset("pretrain", cfg.data, cfg.model, tmp_path, cfg.train.seed, tokenizer=tokenizer)
    held_out = split_documents(tokenizer, val)
    assert sorted(text for _, text in held_out_topics(run, 0, tokenizer)) == sorted(held_out)
    # A run that never pretrained on the help topics may be asked about every one.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Some other text.")
    other = load_config("tiny", [f"stages=[{{name: pretrain, kind: pretrain, data: {{source: {corpus}}}}}]"])
    assert held_out_topics(other, 0, tokenizer) == pydoc_topics()


def test_builtin_task_files_are_the_same_every_time(tmp_path):
    topics = pydoc_topics()[:5]
    first, second = write_builtin_tasks(tmp_path / "a", topics), write_builtin_tasks(tmp_path / "b", topics)
    for task in BUILTIN_TASKS:
        assert (first / f"{task}.jsonl").read_text() == (second / f"{task}.jsonl").read_text()
        assert (first / f"{task}.jsonl").read_text().strip()


def nextword_reference(stage, task_file: Path) -> tuple:
    """LAMBADA's scores computed with raylm's own model: (perplexity of the last word, share predicted greedily).

    As lm-eval scores a loglikelihood request: context and target tokens together, cut to the last
    max_seq_len + 1 tokens, and the target's log-probabilities from the positions before each of its tokens.
    """
    tok, max_len = stage.tokenizer, stage.model_cfg.max_seq_len
    logliks, greedy = [], []
    for line in task_file.read_text().splitlines():
        text = json.loads(line)["text"]
        context, word = text.rsplit(" ", 1)
        target = tok.encode(" " + word)
        ids = (tok.encode(context) + target)[-(max_len + 1):]
        with torch.no_grad():
            logprobs = torch.log_softmax(stage.model(torch.tensor([ids[:-1]]))[0, -len(target):].double(), dim=-1)
        logliks.append(sum(logprobs[i, t].item() for i, t in enumerate(target)))
        greedy.append(logprobs.argmax(dim=-1).tolist() == target)
    return float(torch.tensor(-sum(logliks) / len(logliks)).exp()), sum(greedy) / len(greedy)


def _eval(capsys, *args: str) -> dict:
    assert main(["eval", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eval_runs_lm_eval_tasks_deterministically_and_records_the_scores(tmp_path, capsys):
    from wandb_records import read_run

    from raylm.trainer.metrics import WandbRun

    run_dir = finished_run(tmp_path / "runs")
    run = rundir.load(run_dir)
    run.logging.wandb.mode = "offline"
    rundir.save_config(run_dir, run)
    WandbRun(run.logging.wandb, run_dir, "done", "pretrain", {}).finish()  # the W&B run training would have left
    tasks_dir = tmp_path / "my_tasks"
    tasks_dir.mkdir()
    data = tasks_dir / "capitals.jsonl"
    data.write_text('{"country": "France", "a": " Paris", "b": " Rome", "label": 0}\n{"country": "Italy", "a": " Paris", "b": " Rome", "label": 1}\n')
    (tasks_dir / "capitals.yaml").write_text(CAPITALS_YAML.replace("DATA", str(data)))

    spec = ",".join([*BUILTIN_TASKS, str(tasks_dir)])
    first = _eval(capsys, str(run_dir), "--tasks", spec)
    second = _eval(capsys, str(run_dir), "--tasks", spec)
    assert first == second, "two evaluations of the same weights differ"
    scores = first["eval_tasks"]
    assert {task: set(metrics) - {"sample_len"} for task, metrics in scores.items()} == METRICS

    stage = load_stage(run_dir)
    task_files = write_builtin_tasks(tmp_path / "again", held_out_topics(stage.run, stage.index, stage.tokenizer))
    perplexity, accuracy = nextword_reference(stage, task_files / f"{NEXTWORD}.jsonl")
    assert scores[NEXTWORD]["perplexity,none"] == pytest.approx(perplexity, rel=1e-4)
    assert scores[NEXTWORD]["acc,none"] == accuracy

    assert rundir.stage_summary(run_dir, "pretrain")["eval_tasks"] == scores
    recorded = read_metrics(run_dir, "pretrain", kind="eval_tasks")
    assert [r["step"] for r in recorded] == [5, 5] and recorded[-1]["tasks"] == scores
    latest = sorted((run_dir / "wandb").glob("offline-run-*"))[-1]
    (row,) = [r for r in read_run(latest).history if "eval_tasks/capitals/acc,none" in r]
    assert row["trainer/step"] == 5 and row[f"eval_tasks/{NEXTWORD}/acc,none"] == scores[NEXTWORD]["acc,none"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory.mktemp("finished") / "runs")


@pytest.mark.parametrize("tasks, says", [
    ("hellaswag", "--tasks hellaswag: no such task; name built-in tasks (raylm_pydoc_nextword"),
    ("raylm_pydoc_nextword,/no/such/dir", "--tasks /no/such/dir: not a directory; give a directory of lm-eval task YAMLs"),
    (" , ", "names no task"),
])
def test_a_bad_task_name_or_directory_is_a_one_line_error(finished, capsys, tasks, says):
    assert says in one_line_error(capsys, "eval", str(finished), "--tasks", tasks)


def test_a_directory_without_task_yamls_or_with_a_broken_task_is_a_one_line_error(finished, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"--tasks {empty}: no lm-eval task YAML found there" in one_line_error(capsys, "eval", str(finished), "--tasks", str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "capitals.yaml").write_text(CAPITALS_YAML.replace("DATA", str(broken / "missing.jsonl")))
    said = one_line_error(capsys, "eval", str(finished), "--tasks", str(broken))
    assert "lm-eval cannot load capitals" in said and "fix the task YAML or its data files" in said


def test_tasks_and_data_together_are_a_one_line_error(finished, capsys):
    assert "give --tasks" in one_line_error(capsys, "eval", str(finished), "--tasks", NEXTWORD, "--data", "x.txt")


def test_a_stage_scores_its_eval_tasks_when_it_ends(single_worker, capsys):
    """``stages.0.eval_tasks`` (the session's one-worker run names one built-in task): the same scores as
    ``raylm eval --tasks`` on the finished stage, in its summary and metrics.jsonl."""
    summary = rundir.stage_summary(single_worker, "pretrain")
    (recorded,) = read_metrics(single_worker, "pretrain", kind="eval_tasks")
    assert set(summary["eval_tasks"]) == {"raylm_pydoc_topic"} and recorded["tasks"] == summary["eval_tasks"]
    assert recorded["step"] == summary["steps"] == 5
    assert set(summary["eval_tasks"]["raylm_pydoc_topic"]) - {"sample_len"} == METRICS["raylm_pydoc_topic"]
    assert _eval(capsys, str(single_worker), "--tasks", "raylm_pydoc_topic")["eval_tasks"] == summary["eval_tasks"]


@pytest.mark.parametrize("spec, says", [
    ("hellaswag", "stages.0.eval_tasks: hellaswag is no built-in task; name built-in tasks"),
    ("/no/such/dir", "stages.0.eval_tasks /no/such/dir: not a directory"),
])
def test_a_stage_eval_task_that_cannot_run_is_refused_before_training(capsys, spec, says):
    assert says in one_line_error(capsys, "config", "show", "tiny", f"stages.0.eval_tasks={spec}")
