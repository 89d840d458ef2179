"""Damaged or unreadable files of a run: each command names the file and the fix in one line (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import finished_run, one_line_error
from raylm.launcher.cli import main


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory.mktemp("finished") / "runs")


@pytest.fixture
def run_copy(done, tmp_path) -> Path:
    return Path(shutil.copytree(done, tmp_path / "runs" / "copy"))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_model_config(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config["model"].update(changes)
    path.write_text(json.dumps(config))


DAMAGES = {
    "truncated-weights": ("pretrain/final/model.safetensors", _truncate, "model.safetensors is truncated or not a safetensors file"),
    "config-json-not-json": ("pretrain/final/config.json", lambda p: p.write_text("{oops"), "config.json:1: not valid JSON"),
    "config-json-other-shape": ("pretrain/final/config.json", lambda p: _edit_model_config(p, n_layer=2), "do not match their config.json"),
    "config-json-bad-type": ("pretrain/final/config.json", lambda p: _edit_model_config(p, n_head="four"), "config key 'n_head'"),
    "tokenizer-json": ("pretrain/final/tokenizer.json", lambda p: p.write_text("[]"), "tokenizer.json is not a valid tokenizer.json"),
}


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["eval"], ["export", "--out", "hf"]])
@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_final_directory_names_the_file_and_how_to_rewrite_it(run_copy, capsys, command, damage):
    relative, spoil, fragment = damage
    spoil(run_copy / relative)
    line = one_line_error(capsys, command[0], str(run_copy), *command[1:])
    assert fragment in line and str(run_copy / relative.rsplit("/", 1)[0]) in line
    assert f"raylm resume {run_copy}" in line
    assert not Path("hf").exists()


@pytest.mark.parametrize(
    "text, fragment",
    [(b"\xff\xfe", "config.yaml is not UTF-8 text"), (b"model: [1]\n", "'model' must be a mapping"), (b"train: {max_stepz: 1}\n", "did you mean 'train.max_steps'")],
)
def test_a_damaged_run_config_names_the_file(run_copy, capsys, text, fragment):
    (run_copy / "config.yaml").write_bytes(text)
    line = one_line_error(capsys, "generate", str(run_copy), "--prompt", "x")
    assert fragment in line and str(run_copy / "config.yaml") in line


def test_a_damaged_stage_summary_stops_resume_before_ray_starts(run_copy, capsys):
    (run_copy / "pretrain" / "summary.json").write_text('{"stage": "pretrain"}')
    line = one_line_error(capsys, "resume", str(run_copy))
    assert "summary.json has kind=None" in line and f"raylm resume {run_copy}" in line


def test_export_refuses_a_file_or_a_full_directory_as_out(run_copy, capsys):
    Path("a_file").write_text("keep me")
    assert "--out a_file is a file" in one_line_error(capsys, "export", str(run_copy), "--out", "a_file")
    assert Path("a_file").read_text() == "keep me"
    Path("full").mkdir()
    (Path("full") / "x").write_text("")
    assert "--out full exists and is not empty" in one_line_error(capsys, "export", str(run_copy), "--out", "full")


def test_eval_data_problems_name_the_file(run_copy, capsys):
    Path("blank.txt").write_text("  \n")
    assert "--data 'blank.txt' holds only empty documents" in one_line_error(capsys, "eval", str(run_copy), "--data", "blank.txt")
    Path("latin1.txt").write_bytes(b"caf\xe9")
    assert "latin1.txt is not UTF-8 text (bad byte at offset 3)" in one_line_error(capsys, "eval", str(run_copy), "--data", "latin1.txt")
    Path("rows.jsonl").write_text('{"text": "fine"}\nnot json\n')
    assert "rows.jsonl:2: not valid JSON" in one_line_error(capsys, "eval", str(run_copy), "--data", "rows.jsonl")


def test_status_reads_damaged_metrics_and_manifests_and_lists_a_damaged_run(run_copy, capsys):
    (run_copy / "metrics.jsonl").write_bytes(b'5\n[1]\n\xff\n{"stage": "pretrain", "kind": "train", "step": 3}\n{"stage": "pre')
    for step, manifest in ((1, '{"state": [1], "files": 3}'), (2, '{"state": {"step": 2}, "files": {"a": 5}}'), (3, "{")):
        (run_copy / "pretrain" / f"step_000000{step}").mkdir()
        (run_copy / "pretrain" / f"step_000000{step}" / "manifest.json").write_text(manifest)
    assert main(["status", str(run_copy)]) == 0
    out = capsys.readouterr().out
    assert "finished" in out and "3/5" in out

    broken = Path(shutil.copytree(run_copy, run_copy.parent / "broken"))
    (broken / "config.yaml").write_text("- not a mapping\n")
    assert main(["status", "--runs-dir", str(run_copy.parent)]) == 0
    out = capsys.readouterr().out
    assert "unreadable" in out and "copy" in out
    assert "must be a mapping of config sections" in one_line_error(capsys, "status", str(broken))


