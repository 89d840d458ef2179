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

    rundir.reserve(run, _prefix(config))
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


def cmd_resume(args: argparse.Namespace) -> int:
    from raylm.launcher import run_dir as rundir
    from raylm.launcher.resume import with_resume_overrides
    from raylm.launcher.status import driver_alive

    run_dir = rundir.locate(args.run, args.runs_dir)
    if driver_alive(run_dir):
        raise UserError(f"run {run_dir.name} is still running (its driver is alive); wait for it or stop it first")
    run = with_resume_overrides(rundir.load(run_dir), args.set or [])
    rundir.save_config(run_dir, run)

    from raylm.cluster.connect import start_or_connect
    from raylm.launcher.stages import run_all

    info = start_or_connect(run.cluster.address, run.cluster.local_cpus)
    run_all(run_dir, run, info, Console())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from rich.table import Table

    from raylm.launcher import run_dir as rundir
    from raylm.launcher.status import list_runs, run_status

    runs = [rundir.locate(args.run, args.runs_dir)] if args.run else list_runs(Path(args.runs_dir))
    console = Console()
    if not runs:
        console.print(f"no runs in {args.runs_dir}/")
        return 0
    table = Table()
    for column in ("run", "stage", "state", "step", "last checkpoint", "restarts"):
        table.add_column(column)
    for run_dir in runs:
        for s in run_status(run_dir):
            table.add_row(run_dir.name, f"{s.name} ({s.kind})", s.state, f"{s.step}/{s.max_steps}", s.last_checkpoint or "-", str(s.restarts))
    console.print(table)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from rich.table import Table

    from raylm.parallelism.memory import estimate, parse_size

    config, overrides = _split_config_and_overrides(args)
    run = load_config(config, overrides)
    bf16 = args.precision == "bf16"
    plan = estimate(run, bf16=bf16)
    p = run.parallel
    console = Console()
    console.print(
        f"{plan.params / 1e6:,.1f}M parameters, {plan.flops_per_token / 1e9:,.2f} GFLOPs per token; "
        f"layout tp={p.tp} pp={p.pp} dp={plan.dp}, ZeRO-{p.zero_stage}, {'bf16' if bf16 else 'fp32'}; "
        f"{plan.micro_batches} micro-batches of {plan.micro_batch} per rank"
    )
    table = Table(title=f"per-GPU memory (busiest rank holds {plan.params_per_rank / 1e6:,.1f}M parameters)")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    for label, value in (
        ("weights", plan.weights_gib),
        ("gradients", plan.grads_gib),
        ("optimizer state", plan.optimizer_gib),
        ("activations per step (no checkpointing)", plan.activations_gib),
        ("activations per step (checkpointing)", plan.activations_checkpointed_gib),
        ("total", plan.total_gib(p.activation_checkpointing)),
    ):
        table.add_row(label, f"{value:,.2f}")
    console.print(table)
    console.print(f"1F1B pipeline bubble: (p-1)/(m+p-1) = {plan.bubble_fraction:.3f}")
    if args.gpu_mem:
        capacity = parse_size(args.gpu_mem)
        total = plan.total_gib(p.activation_checkpointing)
        verdict = "fits" if total <= capacity else "does NOT fit"
        console.print(f"{verdict} in {capacity:,.1f} GiB per GPU ({total:,.1f} GiB needed)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from raylm.launcher import run_dir as rundir
    from raylm.launcher.inference import generate_text, load_stage

    stage = load_stage(rundir.locate(args.run, args.runs_dir), args.stage)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    prompts = [args.prompt] if args.prompt is not None else []
    if not prompts and not args.interactive:
        raise UserError("give --prompt TEXT or --interactive")
    if args.interactive:
        print(f"[{stage.name} ({stage.kind}) from {stage.final_dir}; an empty line or Ctrl-D ends]", file=sys.stderr)
    while True:
        if not prompts:
            if not args.interactive:
                return 0
            try:
                line = input("> ")
            except EOFError:
                return 0
            if not line.strip():
                return 0
            prompts.append(line)
        prompt = prompts.pop(0)
        if stage.kind != "sft":
            sys.stdout.write(prompt)
        for piece in generate_text(stage, prompt, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from raylm.launcher import run_dir as rundir
    from raylm.launcher.inference import evaluate, load_stage

    run_dir = rundir.locate(args.run, args.runs_dir)
    stage = load_stage(run_dir, args.stage)
    result = evaluate(stage, run_dir, args.data, args.max_batches)
    print(json.dumps({"stage": stage.name, **result}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from raylm.launcher import run_dir as rundir
    from raylm.launcher.inference import export_hf, load_stage

    stage = load_stage(rundir.locate(args.run, args.runs_dir), args.stage, device=torch.device("cpu"))  # export only copies weights
    out = export_hf(stage, Path(args.out))
    print(f"exported {stage.name} as a Hugging Face Llama to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description="Pretrain and fine-tune Llama-style models on Ray + DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True)

    launch = sub.add_parser("launch", help="run every stage of a config (default: the tiny preset, pretrain -> sft)")
    _config_args(launch)
    launch.add_argument("--name", help="run name (directory under runs/); default: <config>-<time>")
    launch.add_argument("--address", help="an existing Ray cluster ('auto', 'host:6379', 'ray://host:10001'); default: start a local one")
    launch.set_defaults(func=cmd_launch)

    resume = sub.add_parser("resume", help="continue a stopped or failed run from its last complete checkpoint")
    resume.add_argument("run", help="a run directory or a run name under --runs-dir")
    resume.add_argument("--set", action="append", metavar="KEY=VALUE", help="change a safe setting (steps, logging, fault handling)")
    resume.add_argument("--runs-dir", default="runs")
    resume.set_defaults(func=cmd_resume)

    status = sub.add_parser("status", help="show each run's stages, step, last checkpoint and restarts")
    status.add_argument("run", nargs="?", help="one run (directory or name); default: every run")
    status.add_argument("--runs-dir", default="runs")
    status.set_defaults(func=cmd_status)

    plan = sub.add_parser("plan", help="parameters, FLOPs and per-GPU memory of a layout, without starting Ray")
    _config_args(plan)
    plan.add_argument("--gpu-mem", help="GPU memory to check against, e.g. 80GB")
    plan.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    plan.set_defaults(func=cmd_plan)

    generate = sub.add_parser("generate", help="sample from a finished stage (sft stages use the chat template)")
    generate.add_argument("run")
    generate.add_argument("--prompt")
    generate.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line")
    generate.add_argument("--stage", help="default: the last finished stage")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-k", type=int, default=40)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--runs-dir", default="runs")
    generate.set_defaults(func=cmd_generate)

    evaluate = sub.add_parser("eval", help="held-out loss and perplexity of a finished stage")
    evaluate.add_argument("run")
    evaluate.add_argument("--stage", help="default: the last finished stage")
    evaluate.add_argument("--data", help="a corpus (pretrain) or JSONL (sft) to evaluate on instead of the held-out split")
    evaluate.add_argument("--max-batches", type=int, default=50)
    evaluate.add_argument("--runs-dir", default="runs")
    evaluate.set_defaults(func=cmd_eval)

    export = sub.add_parser("export", help="write a finished stage in another format")
    export.add_argument("run")
    export.add_argument("--format", choices=("hf",), default="hf")
    export.add_argument("--out", required=True)
    export.add_argument("--stage", help="default: the last finished stage")
    export.add_argument("--runs-dir", default="runs")
    export.set_defaults(func=cmd_export)

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
