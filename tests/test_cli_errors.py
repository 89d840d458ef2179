"""The CLI's error paths: one line on stderr, exit code 2, no traceback, nothing created."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def raylm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raylm.launcher.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["launch", "model.n_hed=4"], "did you mean 'model.n_head'"),
        (["launch", "tinyy"], "did you mean 'tiny'"),
        (["launch", "missing.yaml"], "missing.yaml does not exist"),
        (["launch", "data.source=/no/such/corpus.txt"], "/no/such/corpus.txt"),
        (["launch", "parallel.tp=3"], "parallel.tp=3 must divide"),
        (["launch", "train.max_steps=-1"], "train.max_steps=-1 must be > 0"),
        (["config", "show", "stages.1.kind=dpo"], "stages.1.kind='dpo'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, fragment):
    result = raylm(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_unreachable_cluster_address_is_a_user_error(tmp_path):
    result = raylm("launch", "--address", "127.0.0.1:1", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "cluster.address='127.0.0.1:1'" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_show_prints_resolved_yaml(tmp_path):
    result = raylm("config", "show", "tiny", "train.max_steps=7", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "max_steps: 7" in result.stdout
    assert "builtin:pydoc-sft" in result.stdout


def test_config_keys_documents_every_key(tmp_path):
    result = raylm("config", "keys", cwd=tmp_path)
    assert result.returncode == 0
    assert "parallel.zero_stage" in result.stdout and "DeepSpeed ZeRO stage" in result.stdout
    assert "stages.N.init_from" in result.stdout
