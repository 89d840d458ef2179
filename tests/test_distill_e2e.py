"""`raylm launch` of pretrain -> distill on the session's Ray cluster (2 workers, ZeRO-2, fp32), then a resume
of the distill stage from its step-3 checkpoint, and `raylm eval` of the student.

The student starts from the teacher's weights (the previous stage's, as any stage does), so its first step's
KL is zero to rounding: a teacher loaded from other weights, in another mode or dtype, would show at once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import TINY_SETTINGS, forget_after, launch_in_process, losses, read_metrics, resume_in_process
from raylm.launcher.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TEMPERATURE, ALPHA = 2.0, 0.25
STAGES = ("stages=[{name: pretrain, kind: pretrain}, {name: student, kind: distill, teacher: pretrain, "
          f"distill: {{temperature: {TEMPERATURE}, alpha: {ALPHA}}}, train: {{ckpt_every: 3}}}}]")


@pytest.fixture(scope="module")
def distilled(ray_cluster, tmp_path_factory) -> Path:
    return launch_in_process(tmp_path_factory.mktemp("distill"), "distill", [*TINY_SETTINGS, STAGES])


def test_every_step_logs_the_loss_as_its_kl_and_cross_entropy_parts(distilled):
    records = read_metrics(distilled, "student")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for r in records:
        assert r["loss"] == pytest.approx(ALPHA * TEMPERATURE**2 * r["kl"] + (1 - ALPHA) * r["ce"], rel=1e-5), r
    assert records[0]["kl"] < 1e-6 < records[-1]["kl"]  # the student leaves the teacher it started as


def test_the_summary_reports_the_teacher_the_loss_parts_and_the_held_out_perplexity(distilled):
    summary = json.loads((distilled / "student" / "summary.json").read_text())
    last = read_metrics(distilled, "student")[-1]
    assert summary["kind"] == "distill" and summary["steps"] == 5
    assert summary["distill"] == {"teacher": str(distilled / "pretrain" / "final"), "teacher_params": summary["trainable_params"],
                                  "temperature": TEMPERATURE, "alpha": ALPHA, "kl": last["kl"], "ce": last["ce"]}
    assert summary["perplexity"] > 1 and summary["final_loss"] == last["loss"]
    assert (distilled / "student" / "final" / "model.safetensors").is_file()


def test_a_resume_from_the_step_3_checkpoint_repeats_the_uninterrupted_steps(distilled, tmp_path):
    resumed = Path(shutil.copytree(distilled, tmp_path / "resumed"))
    forget_after(resumed, 3, stage="student")
    resume_in_process(resumed, [])
    assert [r["step"] for r in read_metrics(resumed, "student", kind="event") if r.get("event") == "resumed"] == [3]
    assert [r["step"] for r in read_metrics(resumed, "student")] == [1, 2, 3, 4, 5, 4, 5]  # steps 4 and 5 trained again
    assert losses(resumed, "student") == losses(distilled, "student")
    parts = lambda run: {r["step"]: (r["kl"], r["ce"]) for r in read_metrics(run, "student")}  # noqa: E731
    assert parts(resumed) == parts(distilled)


def test_eval_scores_the_student_on_its_held_out_split(distilled, capsys):
    assert main(["eval", str(distilled), "--stage", "student"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] > 1 and "student" in result["data"]
