"""The CLI's error paths: one line on stderr, exit code 2, no traceback, nothing created.

Most cases call ``raylm.launcher.cli.main`` in this process (what ``python -m
raylm.launcher.cli`` exits with); an exception other than a UserError would
escape ``main`` and fail the test, as it would print a traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_SETTINGS, finished_run, one_line_error
from raylm.launcher.cli import main


def raylm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raylm.launcher.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Each test runs in its own directory (where `runs/` would appear) with no Ray cluster named in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["launch", "model.n_hed=4"], "did you mean 'model.n_head'"),
        (["launch", "tinyy"], "did you mean 'tiny'"),
        (["launch", "missing.yaml"], "missing.yaml does not exist"),
        (["launch", "data.source=/no/such/corpus.txt"], "/no/such/corpus.txt"),
        (["launch", "parallel.tp=3"], "parallel.tp=3 must divide"),
        (["launch", "train.max_steps=-1"], "train.max_steps=-1 must be > 0"),
        (["launch", "tiny", "125m"], "give one config (a YAML file or a preset), not 'tiny' and '125m'"),
        (["launch", "--nme", "x"], "unrecognized arguments: --nme"),
        (["config", "show", "stages.1.kind=dpo"], "stages.1.kind='dpo'"),
        (["config", "show", "model=[1, 2]"], "'model' must be a mapping of model.* keys"),
        (["launch", "stages.finetune.train.max_steps=3"], "stages has 2 items, so 'finetune' names none of them"),
        (["plan", "--gpu-mem", "lots"], "--gpu-mem 'lots' is not a size"),
        (["generate"], "the following arguments are required: run"),
        (["eval", "some-run", "--max-batches", "0"], "argument --max-batches: 0 must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, fragment):
    assert fragment in one_line_error(capsys, *args)
    assert not (tmp_path / "runs").exists()


PYDOC = "{path: 'builtin:pydoc', weight: 0.7}"
WEB = "{path: web.jsonl, weight: 0.3}"


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ([f"data.sources=[{PYDOC}, {{path: web.jsonl, weight: -0.3}}]"], "data.sources.1.weight=-0.3 must be a number >= 0"),
        (["data.sources=[{path: 'builtin:pydoc', weight: 0}, {path: web.jsonl, weight: 0}]"], "data.sources: every weight is 0; give at least one"),
        (["data.sources=[]"], "data.sources is empty; list sources as [{path: ..., weight: ...}, ...]"),
        (["data.source=web.jsonl", f"data.sources=[{PYDOC}, {WEB}]"], "data.source='web.jsonl' and data.sources are both set; keep one"),
        ([f"data.sources=[{PYDOC}, {{path: missing.jsonl, weight: 0.3}}]"], "data.sources.1.path='missing.jsonl': no such file, directory or glob"),
        ([f"data.sources=[{PYDOC}, {WEB}, {{path: web.jsonl, weight: 1}}]"], "data.sources.2.path='web.jsonl' is listed twice"),
        (["stages.0.data={sources: [{path: 'builtin:pydoc', weight: -1}]}"], "stage 'pretrain': stages.0.data.sources.0.weight=-1.0 must be"),
        ([f"stages=[{{name: pretrain, kind: pretrain}}, {{name: sft, kind: sft, data: {{sources: [{PYDOC}]}}}}]"],
         "stage 'sft': stages.1.data.sources mixes pretraining corpora but this stage is sft; give it one data.source"),
        ([f"stages.1.data.sources=[{PYDOC}]"], "stage 'sft': data.source='builtin:pydoc-sft' and stages.1.data.sources are both set"),
    ],
)
def test_a_bad_mixture_is_one_line_naming_its_key(tmp_path, capsys, overrides, fragment):
    (tmp_path / "web.jsonl").write_text('{"text": "some text"}\n')
    assert fragment in one_line_error(capsys, "launch", *overrides)
    assert not (tmp_path / "runs").exists()


def test_a_real_process_exits_2_without_a_traceback(tmp_path):
    """The reported case: exporting onto an existing file ended in NotADirectoryError."""
    run_dir = finished_run(tmp_path / "runs")
    (tmp_path / "a_file").write_text("keep me")
    result = raylm("export", str(run_dir), "--format", "hf", "--out", "a_file", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "raylm: error: --out a_file is a file; choose a new directory\n"
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_unreachable_cluster_address_is_a_user_error(tmp_path, capsys):
    line = one_line_error(capsys, "launch", "--address", "127.0.0.1:1")
    assert "--address 127.0.0.1:1" in line and "Connection refused" in line
    assert not (tmp_path / "runs").exists()


def test_ray_address_from_the_environment_is_honoured(tmp_path, capsys, monkeypatch):
    """Ray's convention: RAY_ADDRESS (set for a Ray Job's driver) names the cluster when no address is given."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    line = one_line_error(capsys, "launch")
    assert "RAY_ADDRESS='127.0.0.1:1'" in line and "unset RAY_ADDRESS" in line
    assert not (tmp_path / "runs").exists()
    # An explicit address still wins over the environment.
    assert "--address 127.0.0.1:2" in one_line_error(capsys, "launch", "--address", "127.0.0.1:2")


# Launches whose inputs turn out unusable only once data or weights are read: one line, and no runs/ left behind.
SHORT = TINY_SETTINGS


def _empty_corpus(tmp_path: Path) -> list:
    (tmp_path / "empty.txt").write_text("\n")
    return ["data.source=empty.txt"], "data.source 'empty.txt' holds only empty documents"


def _empty_source_in_a_mixture(tmp_path: Path) -> list:
    (tmp_path / "empty.txt").write_text("\n")
    return ["data.sources=[{path: 'builtin:pydoc', weight: 0.9}, {path: empty.txt, weight: 0.1}]"], (
        "data.sources.1.path 'empty.txt' holds only empty documents"
    )


def _bad_jsonl_line(tmp_path: Path) -> list:
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", \n')
    return ["stages.1.data.source=sft.jsonl"], "sft.jsonl:2: not valid JSON"


def _init_from_without_a_model(tmp_path: Path) -> list:
    (tmp_path / "no_model").mkdir()
    return ["stages.0.init_from=no_model"], "stages.0.init_from: no_model has no config.json"


def _init_from_truncated_weights(tmp_path: Path) -> list:
    final = finished_run(tmp_path / "elsewhere") / "pretrain" / "final"
    weights = final / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return [f"stages.1.init_from={final}"], "model.safetensors is truncated or not a safetensors file"


def _init_from_another_shape(tmp_path: Path) -> list:
    final = finished_run(tmp_path / "elsewhere") / "pretrain" / "final"
    return [f"stages.0.init_from={final}", "model.n_layer=2"], "do not fit this config (model.n_layer=2 vs 4)"


def _runs_dir_is_a_file(tmp_path: Path) -> list:
    (tmp_path / "a_file").write_text("")
    return ["runs_dir=a_file/runs"], "a_file is a file, not a directory"


@pytest.mark.parametrize(
    "make", [_empty_corpus, _empty_source_in_a_mixture, _bad_jsonl_line, _init_from_without_a_model, _init_from_truncated_weights, _init_from_another_shape, _runs_dir_is_a_file]
)
def test_a_failed_launch_leaves_nothing_behind(tmp_path, capsys, make):
    overrides, fragment = make(tmp_path)
    assert fragment in one_line_error(capsys, "launch", *SHORT, *overrides)
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "a_file" / "runs").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_launch_refused_after_ray_started_removes_its_run_directory(ray_cluster, capsys, tmp_path, monkeypatch):
    """The cluster's capacity is known only once Ray is up (here the session's); the run directory made by then goes again."""
    monkeypatch.chdir(tmp_path)
    assert "cluster.cpus_per_worker=4096 needs 8192 CPUs" in one_line_error(capsys, "launch", *SHORT, "cluster.cpus_per_worker=4096")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "options, fragment",
    [(["--top-p", "1.5"], "--top-p 1.5 must be in (0, 1]"), (["--top-k", "-1"], "--top-k: -1 must be >= 0"),
     (["--temperature", "-0.5"], "--temperature: -0.5 must be >= 0.0"), (["--max-new-tokens", "many"], "'many' is not an integer")],
)
def test_bad_sampling_options_are_user_errors(capsys, options, fragment):
    """Refused before any run is looked up."""
    assert fragment in one_line_error(capsys, "generate", "no-such-run", "--prompt", "x", *options)


def test_config_show_prints_resolved_yaml(capsys):
    assert main(["config", "show", "tiny", "train.max_steps=7"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out
    assert "builtin:pydoc-sft" in out


def test_config_keys_documents_every_key(capsys):
    assert main(["config", "keys"]) == 0
    out = capsys.readouterr().out
    assert "parallel.zero_stage" in out and "DeepSpeed ZeRO stage" in out
    assert "stages.N.init_from" in out
    assert "data.sources = None\n    A mixture instead of data.source" in out
