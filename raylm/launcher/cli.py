"""The ``raylm`` command line.

Every user mistake is a ``UserError``: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import List, Optional

from rich.console import Console

from raylm.configs.loader import load_config, preset_names, to_yaml
from raylm.configs.schema import RunConfig, StageConfig
from raylm.errors import StageFailed, UserError

EXIT_USER_ERROR = 2


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help=f"a YAML file or a preset ({', '.join(preset_names())}); default: tiny")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=50 parallel.zero_stage=3")


def _split_config_and_overrides(args: argparse.Namespace) -> tuple[Optional[str], List[str]]:
    """``raylm launch train.max_steps=5`` means no config and one override."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        return None, [config, *overrides]
    return config, overrides


def _prefix(config: Optional[str]) -> str:
    if config is None:
        return "tiny"
    return Path(config).stem if config not in preset_names() else config


def cmd_launch(args: argparse.Namespace) -> int:
    config, overrides = _split_config_and_overrides(args)
    if args.name:
        overrides.append(f"name={args.name}")
    if args.address:
        overrides.append(f"cluster.address={args.address}")
    run = load_config(config, overrides)

    from raylm.cluster.connect import start_or_connect
    from raylm.launcher import run_dir as rundir
    from raylm.launcher.stages import run_all

    info = start_or_connect(run.cluster.address, run.cluster.local_cpus)
    run_dir = rundir.create(run, _prefix(config))
    run_all(run_dir, run, info, Console())
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    config, overrides = _split_config_and_overrides(args)
    sys.stdout.write(to_yaml(load_config(config, overrides)))
    return 0


def _walk_keys(cls: type, prefix: str = ""):
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            yield from _walk_keys(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", default, f.metadata.get("help", "")


def cmd_config_keys(args: argparse.Namespace) -> int:
    for key, default, help_text in [*_walk_keys(RunConfig), *_walk_keys(StageConfig, "stages.N.")]:
        if key == "stages":
            continue
        print(f"{key} = {default!r}\n    {help_text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description="Pretrain and fine-tune Llama-style models on Ray + DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True)

    launch = sub.add_parser("launch", help="run every stage of a config (default: the tiny preset, pretrain -> sft)")
    _config_args(launch)
    launch.add_argument("--name", help="run name (directory under runs/); default: <config>-<time>")
    launch.add_argument("--address", help="an existing Ray cluster ('auto', 'host:6379', 'ray://host:10001'); default: start a local one")
    launch.set_defaults(func=cmd_launch)

    config = sub.add_parser("config", help="inspect configs without running anything")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved YAML")
    _config_args(show)
    show.set_defaults(func=cmd_config_show)
    keys = config_sub.add_parser("keys", help="list every key with its default and meaning")
    keys.set_defaults(func=cmd_config_keys)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"raylm: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except StageFailed as err:
        print(f"raylm: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("raylm: interrupted; continue later with 'raylm resume <run>'", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
