"""`raylm launch` of pretrain -> classify on the built-in task, end to end on the session's Ray cluster, then `raylm eval`.

The classify stage trains 60 steps (lr 1e-3, dp2 ZeRO-2, fp32 on the CPU) on ~390 paragraphs of 4 balanced
labels and is scored on its ~100 held-out ones. A classifier that learnt nothing scores about 1/4: on 100
examples its accuracy has a standard deviation of sqrt(0.25 * 0.75 / 100) = 0.043, so it passes the 0.40 bar
with a probability below 0.1% (binomial tail), and a head reading the wrong position, a label mix-up or no
training fails it. The stage itself reaches 0.576 (57 of 99; the README has the figures).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from conftest import TINY_SETTINGS, launch_in_process
from raylm.data.pydoc_topic import BUILTIN_PYDOC_TOPIC, TOPIC_GROUPS
from raylm.launcher.cli import main
from raylm.launcher.stages import print_summary

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ACCURACY_BAR = 0.40
STAGES = ("stages=[{name: pretrain, kind: pretrain}, {name: classify, kind: classify, "
          f"data: {{source: '{BUILTIN_PYDOC_TOPIC}', val_fraction: 0.2}}, optim: {{lr: 1.0e-3}}, train: {{max_steps: 60, log_every: 10}}}}]")


@pytest.fixture(scope="module")
def classified(ray_cluster, tmp_path_factory) -> Path:
    return launch_in_process(tmp_path_factory.mktemp("classify"), "cls", [*TINY_SETTINGS, STAGES])


def test_the_summary_has_accuracy_above_chance_and_per_class_counts(classified):
    summary = json.loads((classified / "classify" / "summary.json").read_text())
    report = summary["classification"]
    labels = sorted(TOPIC_GROUPS)
    assert summary["kind"] == "classify" and summary["perplexity"] is None and report["labels"] == labels
    assert summary["accuracy"] == report["accuracy"] > ACCURACY_BAR, report
    assert report["accuracy"] > report["majority_accuracy"] + 0.05, report
    per_class = report["per_class"]
    assert set(per_class) == set(labels) and all(counts["support"] > 0 for counts in per_class.values())
    assert sum(counts["support"] for counts in per_class.values()) == report["examples"] >= 90
    assert sum(counts["correct"] for counts in per_class.values()) == round(report["accuracy"] * report["examples"])
    confusion = report["confusion"]
    assert [sum(row) for row in confusion] == [per_class[label]["support"] for label in labels]
    assert [confusion[i][i] for i in range(len(labels))] == [per_class[label]["correct"] for label in labels]
    assert " -> " in summary["sample"] and "(true: " in summary["sample"]
    final = json.loads((classified / "classify" / "final" / "config.json").read_text())
    assert final["labels"] == labels
    console = Console(record=True, width=200)
    print_summary(json.loads((classified / "summary.json").read_text()), console)
    assert f"classify accuracy: {report['accuracy']:.3f} on {report['examples']} held-out examples" in console.export_text()


def test_metrics_record_the_scores(classified):
    records = [json.loads(line) for line in (classified / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if r["stage"] == "classify" and r["kind"] == "classify"]
    assert len(scored) == 1 and scored[0]["step"] == 60
    summary = json.loads((classified / "classify" / "summary.json").read_text())["classification"]
    assert scored[0]["accuracy"] == summary["accuracy"] and scored[0]["confusion"] == summary["confusion"]
    for label, counts in summary["per_class"].items():
        assert scored[0][f"support/{label}"] == counts["support"] and scored[0][f"correct/{label}"] == counts["correct"]
    losses = [r["loss"] for r in records if r["stage"] == "classify" and r["kind"] == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_eval_reports_the_same_accuracy(classified, capsys):
    assert main(["eval", str(classified), "--stage", "classify"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((classified / "classify" / "summary.json").read_text())["classification"]
    assert {key: result[key] for key in summary} == summary
