"""Every `raylm ...` command line in README.md's code blocks parses with the real parser, and the
configs of launch, plan and config show load, without starting anything."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import List

import pytest

from raylm.launcher.cli import build_parser, resolved_config

README = Path(__file__).resolve().parent.parent / "README.md"
CONFIG_COMMANDS = ("launch", "plan", "show")


def readme_commands() -> List[List[str]]:
    """The arguments after `raylm` of each command line in a fenced code block (synopses like `[k=v ...]` excepted)."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    commands = []
    for line in (line for block in blocks for line in block.splitlines()):
        for part in line.split("&&"):
            if part.split()[:1] and Path(part.split()[0]).name == "raylm":
                words = shlex.split(part)
                if not any(w.startswith("[") for w in words):
                    commands.append(words[1:])
    return commands


def test_the_readme_has_commands_to_check():
    verbs = {words[0] for words in readme_commands() if words}
    assert {"launch", "resume", "config"} <= verbs


@pytest.mark.parametrize("words", readme_commands(), ids=" ".join)
def test_a_readme_command_parses_and_its_config_loads(words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(words)
    if (args.command if args.command != "config" else args.config_command) in CONFIG_COMMANDS:
        # A YAML file the README names stands for the reader's own: an empty one adds nothing to the preset.
        for word in words:
            if word.endswith((".yaml", ".yml")):
                (tmp_path / word).write_text("")
        resolved_config(args)


@pytest.mark.parametrize(
    "words, config, overrides, options",
    [
        ("launch 1.3b --address H:6379 runs_dir=/x", "1.3b", ["runs_dir=/x"], {"address": "H:6379"}),
        ("launch --name x tiny train.max_steps=5", "tiny", ["train.max_steps=5"], {"name": "x"}),
        ("launch train.max_steps=5 --name x tiny model.n_layer=2", "train.max_steps=5", ["tiny", "model.n_layer=2"], {"name": "x"}),
        ("plan 1.3b --gpu-mem 80GB parallel.tp=2", "1.3b", ["parallel.tp=2"], {"gpu_mem": "80GB"}),
        ("config show parallel.tp=2 1.3b", "parallel.tp=2", ["1.3b"], {}),
    ],
)
def test_options_and_overrides_mix_in_any_order(words, config, overrides, options):
    args = build_parser().parse_args(words.split())
    assert (args.config, args.overrides) == (config, overrides)
    assert {key: getattr(args, key) for key in options} == options
    run = resolved_config(args)
    for item in overrides:
        if "=" in item:
            key, value = item.split("=")
            section, field = key.split(".") if "." in key else (None, key)
            assert str(getattr(getattr(run, section) if section else run, field)) == value
    if "address" in options:
        assert run.cluster.address == options["address"]


def test_resume_takes_settings_after_set():
    args = build_parser().parse_args(["resume", "runs/big", "--set", "parallel.tp=1", "--set", "cluster.num_workers=4", "--runs-dir", "r"])
    assert (args.run, args.set, args.runs_dir) == ("runs/big", ["parallel.tp=1", "cluster.num_workers=4"], "r")
