"""Distill stages without Ray: the loss against a hand computation, the teacher's loading, and the CLI's refusals
(one line, exit 2, no run directory left behind)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_SETTINGS, finished_run, one_line_error
from raylm.configs.schema import DistillConfig
from raylm.data.tokenizer import train_tokenizer
from raylm.launcher.cli import main
from raylm.models.llama import Llama
from raylm.models.loss import IGNORE_INDEX, cross_entropy_loss, distillation_loss
from raylm.models.weights import load_consolidated
from raylm.trainer.distill import Distiller, load_teacher


def _softmax(row):
    peak = max(row)
    weights = [math.exp(x - peak) for x in row]
    return [w / sum(weights) for w in weights]


def test_the_loss_is_the_hand_computed_mix_of_kl_and_cross_entropy():
    student = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]])  # (B=1, T=2, V=3)
    teacher = torch.tensor([[[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]])
    targets = torch.tensor([[1, 2]])
    temperature, alpha = 2.0, 0.3
    kl_rows, ce_rows = [], []
    for s_row, t_row, target in zip(student[0].tolist(), teacher[0].tolist(), targets[0].tolist()):
        p = _softmax([x / temperature for x in t_row])
        q = _softmax([x / temperature for x in s_row])
        kl_rows.append(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q)))
        ce_rows.append(-math.log(_softmax(s_row)[target]))
    kl, ce = sum(kl_rows) / 2, sum(ce_rows) / 2
    got_loss, got_kl, got_ce = distillation_loss(student, teacher, targets, temperature, alpha)
    assert got_kl.item() == pytest.approx(kl, rel=1e-6)
    assert got_ce.item() == pytest.approx(ce, rel=1e-6)
    assert got_loss.item() == pytest.approx(alpha * temperature**2 * kl + (1 - alpha) * ce, rel=1e-6)


def test_alpha_zero_is_the_next_token_loss_and_ignored_targets_count_nowhere():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, requires_grad=True), torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[1, 3:] = IGNORE_INDEX
    loss, kl, _ = distillation_loss(student, teacher, targets, 2.0, 0.0)
    assert torch.equal(loss, cross_entropy_loss(student, targets))
    # The KL is the mean over the 8 positions with a target; what the teacher says at the others changes nothing.
    changed = teacher.clone()
    changed[1, 3:] = 100.0
    assert torch.equal(distillation_loss(student, changed, targets, 2.0, 0.5)[1], kl)
    valid = targets != IGNORE_INDEX
    by_hand = F.kl_div(F.log_softmax(student[valid] / 2, -1), F.log_softmax(teacher[valid] / 2, -1), reduction="sum", log_target=True) / 8
    assert kl.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_the_temperature_softens_and_t_squared_scales_the_kl_term():
    torch.manual_seed(1)
    student, teacher = torch.randn(1, 4, 7), torch.randn(1, 4, 7)
    targets = torch.randint(0, 7, (1, 4))
    for temperature in (1.0, 2.0, 4.0):
        loss, kl, _ = distillation_loss(student, teacher, targets, temperature, 1.0)
        # alpha = 1 leaves the KL term alone: T^2 times the KL of the softened distributions.
        softened = F.kl_div(F.log_softmax(student[0] / temperature, -1), F.log_softmax(teacher[0] / temperature, -1),
                            reduction="batchmean", log_target=True)
        assert kl.item() == pytest.approx(softened.item(), rel=1e-6)
        assert loss.item() == pytest.approx(temperature**2 * softened.item(), rel=1e-6)
    # Softer distributions are closer: the KL itself shrinks with T (here about as 1/T^2, the reason for the T^2).
    kls = [distillation_loss(student, teacher, targets, t, 1.0)[1].item() for t in (1.0, 2.0, 4.0)]
    assert kls[0] > kls[1] > kls[2]
    # The student's gradient through the scaled term keeps its size as T grows (Hinton et al.: it is ~1/T^2 without it).
    norms = []
    for temperature in (4.0, 8.0):
        leaf = student.clone().requires_grad_(True)
        distillation_loss(leaf, teacher, targets, temperature, 1.0)[0].backward()
        norms.append(leaf.grad.norm().item())
    assert 0.5 < norms[1] / norms[0] < 2.0


def test_the_teacher_is_frozen_in_eval_mode_in_the_compute_dtype_and_gives_the_saved_models_logits(tmp_path):
    final = finished_run(tmp_path) / "pretrain" / "final"
    cfg, state = load_consolidated(final)
    reference = Llama(cfg)
    reference.load_state_dict(state)
    teacher = load_teacher(final, torch.device("cpu"), torch.float32)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.output.weight is teacher.tok_embeddings.weight  # one tied weight, as saved
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(teacher(tokens), reference(tokens))
    assert load_teacher(final, torch.device("cpu"), torch.bfloat16).tok_embeddings.weight.dtype == torch.bfloat16
    # Its loss parts carry no graph; the loss itself carries the student's.
    student_logits = torch.randn(2, 16, cfg.vocab_size, requires_grad=True)
    loss, parts = Distiller(teacher, DistillConfig()).loss(student_logits, tokens, tokens)
    assert loss.requires_grad and set(parts) == {"kl", "ce"} and not any(p.requires_grad for p in parts.values())


# --- the CLI's refusals ------------------------------------------------------------------------------------------


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def _distill_after_pretrain(teacher: str, extra: str = "") -> str:
    return f"stages=[{{name: pretrain, kind: pretrain}}, {{name: student, kind: distill, teacher: {teacher}{extra}}}]"


@pytest.mark.parametrize("stages, fragment", [
    (_distill_after_pretrain("nowhere"), "stage 'student': stages.1.teacher='nowhere' is neither a stage of this run nor a directory (the stages before it are 'pretrain')"),
    ("stages=[{name: student, kind: distill, teacher: student}]", "stages.0.teacher='student' is not an earlier stage (it has not trained yet; no stage comes before it)"),
    ("stages=[{name: student, kind: distill}]", "kind distill needs stages.0.teacher"),
    (_distill_after_pretrain("pretrain", ", parallel: {tp: 2}"), "kind distill cannot run with parallel.tp=2; set stages.1.parallel.tp=1"),
    (_distill_after_pretrain("pretrain", ", parallel: {pp: 2, zero_stage: 1}"), "kind distill cannot run with parallel.pp=2; set stages.1.parallel.pp=1"),
    (_distill_after_pretrain("pretrain", ", lora: {rank: 4}"), "kind distill does not take stages.1.lora"),
    (_distill_after_pretrain("pretrain", ", distill: {temperature: 0}"), "stages.1.distill.temperature=0.0 must be > 0"),
    (_distill_after_pretrain("pretrain", ", distill: {alpha: 1.5}"), "stages.1.distill.alpha=1.5 must be in [0, 1]"),
    ("stages=[{name: pretrain, kind: pretrain, teacher: x}]", "stages.0.teacher is for kind distill, this stage is pretrain"),
    ("stages=[{name: topic, kind: classify, data: {source: 'builtin:pydoc-topic'}}, {name: student, kind: distill, teacher: topic, init_from: .}]",
     "stages.1.teacher='topic' is a classify stage"),
])
def test_bad_distill_configs_are_refused_before_anything_starts(in_tmp, capsys, stages, fragment):
    assert fragment in one_line_error(capsys, "launch", *TINY_SETTINGS, stages)
    assert not (in_tmp / "runs").exists()


def _teacher_copy(tmp_path: Path, name: str) -> Path:
    final = finished_run(tmp_path / "elsewhere", name) / "pretrain" / "final"
    return Path(shutil.copytree(final, tmp_path / name))


def test_a_teacher_of_another_vocabulary_is_refused_from_its_headers(in_tmp, capsys):
    teacher = _teacher_copy(in_tmp, "teacher")
    line = one_line_error(capsys, "launch", *TINY_SETTINGS, "model.vocab_size=1024", "data.tokenizer=byte",
                          f"stages=[{{name: student, kind: distill, teacher: {teacher}}}]")
    assert f"stages.0.teacher: the teacher in {teacher} has model.vocab_size=512, the student 1024" in line
    assert not (in_tmp / "runs").exists()


def test_a_teacher_with_another_tokenizer_is_refused_before_any_data_is_tokenized(in_tmp, capsys):
    student_start = _teacher_copy(in_tmp, "start")  # a byte tokenizer
    teacher = _teacher_copy(in_tmp, "teacher")
    train_tokenizer(["a few words to merge, words and more words"] * 20, "bpe", 270).save(teacher)
    line = one_line_error(capsys, "launch", *TINY_SETTINGS, "data.tokenizer=byte",
                          f"stages=[{{name: student, kind: distill, teacher: {teacher}, init_from: {student_start}}}]")
    assert f"stages.0.teacher: the teacher in {teacher} was trained with another tokenizer than this run's (bpe, " in line
    assert not (in_tmp / "runs").exists()


def test_config_keys_lists_the_distill_settings(capsys):
    assert main(["config", "keys"]) == 0
    out = capsys.readouterr().out
    for key in ("stages.N.teacher", "stages.N.distill.temperature = 2.0", "stages.N.distill.alpha = 0.5"):
        assert key in out, key


def test_a_first_stage_distilling_from_a_directory_takes_the_teachers_tokenizer(tmp_path):
    from raylm.configs.loader import load_config
    from raylm.data.tokenizer import Tokenizer
    from raylm.trainer import run_dir as rundir
    from raylm.trainer.stage_data import prepare_stage_data

    teacher = _teacher_copy(tmp_path, "teacher")  # a byte tokenizer; the stage's own data.tokenizer would train a BPE
    run = load_config("tiny", [*TINY_SETTINGS, f"runs_dir={tmp_path / 'runs'}", "name=student", "data.tokenizer=bpe",
                               f"stages=[{{name: student, kind: distill, teacher: {teacher}}}]"])
    data = prepare_stage_data(rundir.create(run, "student"), run, 0)
    assert data.tokenizer.fingerprint == Tokenizer.load(teacher).fingerprint
    assert data.train.num_samples > 0  # pretraining data, packed as a pretrain stage reads it


def test_a_hugging_face_llama_directory_teaches_as_the_raylm_weights_it_was_exported_from(tmp_path, capsys):
    from raylm.configs.loader import load_config
    from raylm.data.tokenizer import Tokenizer
    from raylm.trainer.distill import check_teacher, check_teacher_tokenizer

    run_dir = finished_run(tmp_path)
    hf_dir = tmp_path / "hf"
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(hf_dir)]) == 0
    student = load_config("tiny", [*TINY_SETTINGS, "model.d_model=64"]).model
    assert check_teacher(hf_dir, student, "stages.0.teacher").d_model == 128  # another shape, the same vocabulary
    check_teacher_tokenizer(Tokenizer.load(run_dir / "pretrain" / "final"), hf_dir, "stages.0.teacher")
    tokens = torch.randint(0, student.vocab_size, (2, 16))
    with torch.no_grad():
        from_hf = load_teacher(hf_dir, torch.device("cpu"), torch.float32)(tokens)
        from_raylm = load_teacher(run_dir / "pretrain" / "final", torch.device("cpu"), torch.float32)(tokens)
    assert torch.equal(from_hf, from_raylm)
