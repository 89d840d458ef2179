"""The ``raylm`` command line.

Every user mistake is a ``UserError``: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import signal
import sys
import time
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import List, Optional

from rich.console import Console

from raylm.configs.loader import load_config, preset_names, to_yaml
from raylm.configs.schema import RunConfig, StageConfig
from raylm.errors import StageFailed, UserError
from raylm.storage import is_uri

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """raylm's parsers: options may stand anywhere among a command's positionals
    (``raylm launch 1.3b --address H:6379 runs_dir=/x``), which plain argparse
    refuses after an ``nargs="*"`` list; a usage mistake is a UserError like any other."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        has_subcommands = any(a.nargs == argparse.PARSER for a in self._get_positional_actions())
        if has_subcommands or self._intermixing:
            return super().parse_known_args(args, namespace)
        # parse_known_intermixed_args makes its two passes through this very method.
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}; see '{self.prog} --help'")


def _at_least(low: float, kind: type = int):
    """An argparse type: a number of ``kind`` that is >= ``low``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} must be >= {low}")
        return value

    return parse


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help=f"a YAML file or a preset ({', '.join(preset_names())}); default: tiny")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=50 parallel.zero_stage=3")


def _split_config_and_overrides(args: argparse.Namespace) -> tuple[Optional[str], List[str]]:
    """The one positional without '=' is the config, wherever it stands (``raylm launch train.max_steps=5 tiny``)."""
    items = [item for item in (args.config, *args.overrides) if item is not None]
    configs = [item for item in items if "=" not in item]
    if len(configs) > 1:
        raise UserError(f"give one config (a YAML file or a preset), not {' and '.join(repr(c) for c in configs)}; overrides look like key=value")
    return (configs[0] if configs else None), [item for item in items if "=" in item]


def resolved_config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig a launch, plan or config show command line describes (nothing is started)."""
    config, overrides = _split_config_and_overrides(args)
    if getattr(args, "name", None):
        overrides.append(f"name={args.name}")
    if getattr(args, "address", None):
        overrides.append(f"cluster.address={args.address}")
    return load_config(config, overrides)


def _prefix(args: argparse.Namespace) -> str:
    """Fresh run names start with the preset or the YAML file's stem."""
    config = _split_config_and_overrides(args)[0]
    if config is None:
        return "tiny"
    return Path(config).stem if config not in preset_names() else config


def cmd_launch(args: argparse.Namespace) -> int:
    run = resolved_config(args)

    from raylm.cluster.connect import choose_address, probe, start_or_connect
    from raylm.trainer import run_dir as rundir
    from raylm.launcher.stages import check_init_from, prepare_data, run_all

    if args.resume_if_exists:
        if run.name is None:
            raise UserError("--resume-if-exists needs --name (or name=): the run a relaunch continues")
        run_dir = rundir.existing(run)
        if run_dir is not None:
            from raylm.launcher.resume import relaunch_config

            _continue(run_dir, relaunch_config(rundir.load(run_dir), run), "--address" if args.address else "cluster.address")
            return 0
    # Everything a bad input can break is checked before the run directory exists or Ray starts;
    # what fails later (data, cluster capacity, a worker's start) removes the directory again.
    rundir.reserve(run, _prefix(args))
    check_init_from(run)
    address, chosen_by = choose_address(run.cluster.address, "--address" if args.address else "cluster.address")
    probe(address, chosen_by)
    console = Console()
    with rundir.created(run, _prefix(args)) as run_dir:
        prepare_data(run_dir, run, console)
        info = start_or_connect(address, run.cluster.local_cpus, chosen_by=chosen_by)
        run_all(run_dir, run, info, console)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(to_yaml(resolved_config(args)))
    return 0


def _walk_keys(cls: type, prefix: str = ""):
    import typing

    from raylm.configs.loader import optional_inner

    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            yield from _walk_keys(type(default), f"{prefix}{f.name}.")
            continue
        yield f"{prefix}{f.name}", default, f.metadata.get("help", "")
        section = optional_inner(hints[f.name])[1]
        if default is None and is_dataclass(section):
            # An optional section (stages.N.lora): the keys a mapping given there may set, and their defaults.
            yield from _walk_keys(section, f"{prefix}{f.name}.")


def cmd_config_keys(args: argparse.Namespace) -> int:
    for key, default, help_text in [*_walk_keys(RunConfig), *_walk_keys(StageConfig, "stages.N.")]:
        if key == "stages":
            continue
        print(f"{key} = {default!r}\n    {help_text}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from raylm.trainer import run_dir as rundir
    from raylm.launcher.resume import with_resume_overrides

    run_dir = rundir.locate(args.run, args.runs_dir)
    _continue(run_dir, with_resume_overrides(rundir.load(run_dir), args.set or []))
    return 0


def _continue(run_dir: Path, run: RunConfig, address_setting: str = "cluster.address") -> None:
    """Run a run's unfinished stages from their last complete checkpoints (resume, or a relaunch of an existing run)."""
    from raylm.cluster.connect import choose_address, start_or_connect
    from raylm.trainer import run_dir as rundir
    from raylm.launcher.stages import run_all
    from raylm.launcher.status import driver_alive

    if driver_alive(run_dir):
        raise UserError(f"run {run_dir.name} is still running (its driver is alive); wait for it or stop it first")
    for stage in run.stages:
        rundir.stage_summary(run_dir, stage.name)  # a damaged one is reported before Ray starts, not after
    rundir.save_config(run_dir, run)
    info = None  # every stage finished: nothing to run, no cluster to start or reach
    if not all(rundir.stage_finished(run_dir, stage.name) for stage in run.stages):
        address, chosen_by = choose_address(run.cluster.address, address_setting)
        info = start_or_connect(address, run.cluster.local_cpus, chosen_by=chosen_by)
    run_all(run_dir, run, info, Console())


def cmd_submit(args: argparse.Namespace) -> int:
    """Validate here, then run ``raylm launch`` as a Ray Job: the driver lives on the head node."""
    import tempfile

    from raylm.cluster import jobs
    from raylm.trainer import run_dir as rundir

    config, overrides = _split_config_and_overrides(args)
    run = load_config(config, [*overrides, *([f"name={args.name}"] if args.name else [])])
    if not is_uri(run.runs_dir) and not Path(run.runs_dir).is_absolute():
        raise UserError(
            f"runs_dir={run.runs_dir} is relative, and a Ray Job's driver runs in a scratch directory on the head node; "
            "give runs_dir=/absolute/path on storage every node sees"
        )
    run.name = run.name or rundir.fresh_name(_prefix(args), rundir.name_taken(run.runs_dir))
    with tempfile.TemporaryDirectory(prefix="raylm-submit-") as scratch:
        # The resolved config travels as the job's working_dir (Ray uploads it), so a local YAML file needs no copy there.
        (Path(scratch) / "run.yaml").write_text(to_yaml(run))
        launch_args = ["run.yaml", "--name", run.name, *(["--resume-if-exists"] if args.resume_if_exists else [])]
        # A resubmission of the same run is another job: Ray refuses a submission id twice.
        job_id = jobs.submit(args.address, launch_args, f"raylm-{run.name}-{time.strftime('%Y%m%d-%H%M%S')}", working_dir=scratch)
    address = f" --address {args.address}" if args.address else ""
    print(f"submitted run {run.name} as Ray job {job_id}; runs_dir={run.runs_dir}")
    print(f"follow it: raylm logs {job_id}{address} --follow    stop it: raylm stop {job_id}{address}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from raylm.cluster import jobs

    state = jobs.print_logs(args.address, args.job, args.follow)
    print(f"raylm: job {args.job} is {state}", file=sys.stderr)
    return 0 if state != "FAILED" else 1


def cmd_stop(args: argparse.Namespace) -> int:
    from raylm.cluster import jobs

    stopped = jobs.stop(args.address, args.job)
    print(f"stopping Ray job {args.job}" if stopped else f"Ray job {args.job} had already ended")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from rich.table import Table

    from raylm.trainer import run_dir as rundir
    from raylm.launcher.status import list_runs, run_status

    runs = [rundir.locate(args.run, args.runs_dir)] if args.run else list_runs(args.runs_dir)
    console = Console()
    if not runs:
        console.print(f"no runs in {args.runs_dir}/")
        return 0
    table = Table()
    for column in ("run", "stage", "state", "step", "last checkpoint", "restarts"):
        table.add_column(column)
    for run_dir in runs:
        try:
            stages = run_status(run_dir)
        except UserError:
            if args.run:
                raise
            # One damaged run must not hide the others; 'raylm status RUN' says what is wrong with it.
            table.add_row(run_dir.name, "-", f"unreadable ('raylm status {run_dir}' says why)", "-", "-", "-")
            continue
        for s in stages:
            table.add_row(run_dir.name, f"{s.name} ({s.kind})", s.state, f"{s.step}/{s.max_steps}", s.last_checkpoint or "-", str(s.restarts))
    console.print(table)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from rich.table import Table

    from raylm.parallelism.memory import estimate, parse_size

    run = resolved_config(args)
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
        ("final norm, logits and loss buffers (last stage)", plan.loss_gib),
        ("backward: the largest weight's gradient before accumulation", plan.backward_gib),
        ("DeepSpeed communication buckets", plan.buckets_gib),
        ("training", plan.training_gib(p.activation_checkpointing)),
        ("start-up: fp32 weights before deepspeed.initialize", plan.startup_gib),
        ("total", plan.total_gib(p.activation_checkpointing)),
    ):
        table.add_row(label, f"{value:,.2f}")
    console.print(table)
    console.print("total: the higher of training and start-up")
    console.print(f"host memory per rank while building its part of the model: {plan.host_startup_gib:,.2f} GiB")
    console.print(f"1F1B pipeline bubble: (p-1)/(m+p-1) = {plan.bubble_fraction:.3f}")
    if args.gpu_mem:
        capacity = parse_size(args.gpu_mem)
        total = plan.total_gib(p.activation_checkpointing)
        verdict = "fits" if total <= capacity else "does NOT fit"
        console.print(f"{verdict} in {capacity:,.1f} GiB per GPU ({total:,.1f} GiB needed)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from raylm.trainer import run_dir as rundir
    from raylm.launcher.inference import check_sampling, generate_text, load_stage

    check_sampling(args.temperature, args.top_k or None, args.top_p)  # before any run is looked up
    stage = load_stage(rundir.locate(args.run, args.runs_dir), args.stage)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, seed=args.seed)
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

    from raylm.trainer import run_dir as rundir
    from raylm.launcher.inference import evaluate, load_stage, refuse_classifier

    if args.tasks is not None and args.data is not None:
        raise UserError("give --tasks (lm-eval tasks) or --data (held-out loss on a file), not both")
    run_dir = rundir.locate(args.run, args.runs_dir)
    stage = load_stage(run_dir, args.stage)
    if args.tasks is not None:
        from raylm.evals.harness import record, run_tasks

        refuse_classifier(stage, "run lm-eval tasks")
        scores = run_tasks(stage, args.tasks)
        record(run_dir, stage, scores)
        print(json.dumps({"stage": stage.name, "eval_tasks": scores}))
        return 0
    result = evaluate(stage, run_dir, args.data, args.max_batches)
    print(json.dumps({"stage": stage.name, **result}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from raylm.trainer import run_dir as rundir
    from raylm.launcher.export import export_hf
    from raylm.launcher.inference import load_stage, refuse_classifier

    if args.quant is not None and args.format != "gguf":
        raise UserError(f"--quant {args.quant} applies to --format gguf only; drop it or add --format gguf")
    run_dir = rundir.locate(args.run, args.runs_dir)
    stage = load_stage(run_dir, args.stage, device=torch.device("cpu"))  # export only copies weights
    if args.format == "gguf":
        from raylm.data.chat import jinja_chat_template
        from raylm.models.gguf_export import export_gguf

        refuse_classifier(stage, "be exported to GGUF (llama.cpp's Llama has no class head; --format hf exports it)")
        quant = args.quant or "f16"
        template = jinja_chat_template() if stage.kind == "sft" else None
        out = export_gguf(stage.model.state_dict(), stage.model_cfg, stage.tokenizer, Path(args.out), quant, f"{run_dir.name}-{stage.name}",
                          template)
        print(f"exported {stage.name} as a llama.cpp GGUF ({quant}) to {out}")
        return 0
    out = export_hf(stage, Path(args.out))
    print(f"exported {stage.name} as a Hugging Face Llama to {out}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from raylm.launcher.data_prepare import prepare_command

    return prepare_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="raylm", description="Pretrain and fine-tune Llama-style models on Ray + DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True)

    launch = sub.add_parser("launch", help="run every stage of a config (default: the tiny preset, pretrain -> sft)")
    _config_args(launch)
    launch.add_argument("--name", help="run name (directory under runs/); default: <config>-<time>")
    launch.add_argument("--address", help="an existing Ray cluster ('auto', 'host:6379', 'ray://host:10001'); default: RAY_ADDRESS, else start a local one")
    launch.add_argument("--resume-if-exists", action="store_true",
                        help="if run --name exists, continue it from its last complete checkpoint (its config must match but for safe keys)")
    launch.set_defaults(func=cmd_launch)

    jobs_address = "the head's Ray dashboard, e.g. http://HEAD:8265; default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS"
    submit = sub.add_parser("submit", help="run a launch as a Ray Job on a cluster (the terminal may close)")
    _config_args(submit)
    submit.add_argument("--name", help="run name; default: <config>-<time>")
    submit.add_argument("--address", help=jobs_address)
    submit.add_argument("--resume-if-exists", action="store_true", help="a resubmission continues run --name")
    submit.set_defaults(func=cmd_submit)

    logs = sub.add_parser("logs", help="print a submitted job's driver output")
    logs.add_argument("job")
    logs.add_argument("--follow", action="store_true", help="until the job ends")
    logs.add_argument("--address", help=jobs_address)
    logs.set_defaults(func=cmd_logs)

    stop = sub.add_parser("stop", help="stop a submitted job (continue it later with --resume-if-exists)")
    stop.add_argument("job")
    stop.add_argument("--address", help=jobs_address)
    stop.set_defaults(func=cmd_stop)

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
    generate.add_argument("--max-new-tokens", type=_at_least(1), default=64)
    generate.add_argument("--temperature", type=_at_least(0.0, float), default=0.8, help="0 is greedy")
    generate.add_argument("--top-k", type=_at_least(0), default=40, help="0 keeps every token")
    generate.add_argument("--top-p", type=float, default=None, help="in (0, 1]; default: off")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--runs-dir", default="runs")
    generate.set_defaults(func=cmd_generate)

    evaluate = sub.add_parser("eval", help="held-out loss and perplexity of a finished stage (accuracy of a classify stage), or lm-eval tasks (--tasks)")
    evaluate.add_argument("run")
    evaluate.add_argument("--stage", help="default: the last finished stage")
    evaluate.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated: built-in ones "
                          "(raylm_pydoc_nextword, raylm_pydoc_topic, raylm_pydoc_perplexity) or directories of task YAMLs")
    evaluate.add_argument("--data", help="a corpus (pretrain) or JSONL (sft, classify) to evaluate on instead of the held-out split")
    evaluate.add_argument("--max-batches", type=_at_least(1), default=50)
    evaluate.add_argument("--runs-dir", default="runs")
    evaluate.set_defaults(func=cmd_eval)

    export = sub.add_parser("export", help="write a finished stage in another format")
    export.add_argument("run")
    export.add_argument("--format", choices=("hf", "gguf"), default="hf", help="hf: a Hugging Face Llama directory; gguf: one llama.cpp file")
    export.add_argument("--quant", choices=("f16", "q8_0"), help="gguf matrices (default f16; norms stay f32)")
    export.add_argument("--out", required=True)
    export.add_argument("--stage", help="default: the last finished stage")
    export.add_argument("--runs-dir", default="runs")
    export.set_defaults(func=cmd_export)

    data = sub.add_parser("data", help="prepare training data ahead of a launch")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prepare = data_sub.add_parser("prepare", help="tokenize corpora once into shards a launch reads with data.source=DIR")
    prepare.add_argument("sources", nargs="+", metavar="SOURCE", help="text, .jsonl(.gz), .parquet or .arrow files, directories or globs of them, builtin:pydoc")
    prepare.add_argument("--out", required=True, help="the prepared dataset directory (created, or brought up to date)")
    prepare.add_argument("--tokenizer", help="a tokenizer.json, or a raylm run / final/ / Hugging Face directory holding one; default: train a BPE")
    prepare.add_argument("--vocab-size", type=_at_least(262), help="vocabulary of the BPE trained when no --tokenizer is given (default 2048)")
    prepare.add_argument("--text-field", default="text", help="JSONL field or Parquet/Arrow column holding the text")
    prepare.add_argument("--tokenizer-sample-mb", type=_at_least(0.001, float), default=64.0, help="text the BPE is trained on at most, taken evenly from the inputs")
    prepare.add_argument("--workers", type=_at_least(1), help="parallel Ray tasks, one per input file (default: every CPU of the cluster); 1 tokenizes in this process")
    prepare.add_argument("--address", help="an existing Ray cluster; default: RAY_ADDRESS, else an embedded local one")
    prepare.set_defaults(func=cmd_data_prepare)

    config = sub.add_parser("config", help="inspect configs without running anything")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved YAML")
    _config_args(show)
    show.set_defaults(func=cmd_config_show)
    keys = config_sub.add_parser("keys", help="list every key with its default and meaning")
    keys.set_defaults(func=cmd_config_keys)
    return parser


def _no_final_collection() -> None:
    """Leave the objects alive at exit to the operating system: the interpreter's last garbage collection walks every
    object torch, Ray and the rest made (1.2 s of a `raylm launch`'s exit on 2 cores) only to free memory the process
    gives back anyway. Reference counting still closes files and runs finalizers; only cycles are left."""
    gc.freeze()


def main(argv: Optional[List[str]] = None) -> int:
    # Registered before Ray's shutdown and W&B's finish (ray.init and wandb register theirs later), so it runs after
    # them; once per process, however often main runs in it.
    atexit.unregister(_no_final_collection)
    atexit.register(_no_final_collection)
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as err:
        print(f"raylm: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except StageFailed as err:
        print(f"raylm: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        # A run's stages say how to continue (Stopped); any other command's Ctrl-C has nothing to continue.
        signum = getattr(err, "signum", signal.SIGINT)
        how = getattr(err, "how", None)
        print(f"raylm: {'terminated' if signum == signal.SIGTERM else 'interrupted'}{f'; {how}' if how else ''}", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
