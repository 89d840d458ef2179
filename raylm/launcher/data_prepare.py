"""``raylm data prepare``: tokenize corpora once into a prepared dataset directory.

With ``--workers 1`` (and no ``--address``) the inputs are tokenized in this
process; otherwise each input file is a Ray task on the cluster
(``raylm.cluster.tasks``), writing its own shard to ``--out``, which every node
must see (shared storage) on a multi-node cluster.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from raylm.configs.schema import ModelConfig
from raylm.data.corpus import source_inputs
from raylm.data.prepare import prepare, run_here, tokenizer_sample
from raylm.data.tokenizer import TOKENIZER_FILE, Tokenizer, train_tokenizer
from raylm.errors import UserError

RUN_TOKENIZER_DIR = "tokenizer"
"""Where a raylm run keeps its tokenizer (``launcher.stage_data``)."""


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer.json, or the one in a directory: a raylm ``final/``, tokenizer/ or run directory, a Hugging Face model."""
    given = Path(path).expanduser()
    fix = "give a tokenizer.json or a directory holding one (a raylm run, its final/, a Hugging Face model)"
    for candidate in (given, given / TOKENIZER_FILE, given / RUN_TOKENIZER_DIR / TOKENIZER_FILE):
        if candidate.is_file():
            return Tokenizer.load_file(candidate, fix=f"--tokenizer: {fix}")
    raise UserError(f"--tokenizer {path}: no tokenizer.json there; {fix}")


def _tokenizer(out: Path, inputs: List[str], args) -> Tokenizer:
    """--tokenizer, else the one an earlier prepare of --out trained (so a rerun re-tokenizes nothing), else a new BPE."""
    if args.tokenizer:
        if args.vocab_size is not None:
            raise UserError("--vocab-size trains a new tokenizer; leave it out with --tokenizer (its vocabulary is fixed)")
        return load_tokenizer(args.tokenizer)
    vocab_size = args.vocab_size or ModelConfig().vocab_size
    if (out / TOKENIZER_FILE).is_file():
        saved = Tokenizer.load(out, fix=f"delete {out / TOKENIZER_FILE} to train a new one")
        if saved.vocab_size == vocab_size:
            return saved
    sample = tokenizer_sample(inputs, args.text_field, int(args.tokenizer_sample_mb * (1 << 20)))
    return train_tokenizer(sample, "bpe", vocab_size)


class _Rate(ProgressColumn):
    """Text megabytes per second since the start."""

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        return Text(f"{task.fields['mb'] / elapsed:.1f} MB/s" if elapsed > 0 else "- MB/s", style="progress.data.speed")


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("files"),
        TextColumn("{task.fields[mb]:,.1f} MB"), _Rate(), TextColumn("{task.fields[tokens]:,} tokens"), TimeElapsedColumn(),
        console=console, transient=False,
    )


CLI_NAMES = (("data.source", "SOURCE"), ("data.text_field", "--text-field"), ("model.vocab_size", "--vocab-size"))
"""The readers name the config keys a launch reads; here the same settings are these arguments."""


def prepare_command(args) -> int:
    try:
        return _prepare(args)
    except UserError as err:
        message = str(err)
        for key, argument in CLI_NAMES:
            message = message.replace(key, argument)
        raise UserError(message) from None


def _prepare(args) -> int:
    console = Console(stderr=False)
    inputs = source_inputs(args.sources)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    created = not out.exists()
    connected = False
    try:
        tokenizer = _tokenizer(out, inputs, args)
        reused: List[Dict[str, Any]] = []
        on_ray = args.workers != 1 or args.address is not None
        with _progress(console) as bar:
            # On Ray the bar's clock starts once the cluster is up, so that its MB/s is the tokenizing rate.
            task = bar.add_task("tokenizing", total=len(inputs), mb=0.0, tokens=0, start=not on_ray)

            def advance(text_bytes: int, tokens: int) -> None:
                fields = bar.tasks[task].fields
                bar.update(task, mb=fields["mb"] + text_bytes / 1e6, tokens=fields["tokens"] + tokens)

            def shard_done(record: Dict[str, Any], was_reused: bool) -> None:
                if was_reused:
                    reused.append(record)
                elif on_ray:  # a task reports once, when its shard is written
                    advance(record["text_bytes"], record["tokens"])
                bar.advance(task)

            def on_cluster(fn, jobs):
                # Called only when some shard needs tokenizing: a rerun with nothing to do starts no cluster.
                nonlocal connected
                from raylm.cluster.connect import choose_address, start_or_connect
                from raylm.cluster.tasks import map_unordered

                address, chosen_by = choose_address(args.address, "--address")
                info = start_or_connect(address, args.workers, chosen_by=chosen_by or "--address")
                connected = True
                bar.start_task(task)
                return map_unordered(fn, jobs, args.workers or max(1, int(info.cpus)))

            runner = on_cluster if on_ray else run_here(advance)
            manifest = prepare(inputs, out, tokenizer, args.text_field, runner=runner, on_shard_done=shard_done)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)  # nothing half-written left behind
        raise
    finally:
        if connected:
            from raylm.cluster.connect import shutdown

            shutdown()
    shards = manifest["shards"]
    console.print(
        f"[green]prepared[/] {out}: {len(shards)} shard(s) ({len(reused)} unchanged), {manifest['documents']:,} documents, "
        f"{manifest['tokens']:,} tokens ({manifest['dtype']}, vocabulary {manifest['vocab_size']:,}); train on it with data.source={out}"
    )
    return 0
