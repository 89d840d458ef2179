"""A stage's tokenizer, datasets and sample order, prepared once per run.

The driver prepares them before any worker starts (so data errors surface as
one-line messages, not worker tracebacks); under torchrun rank 0 prepares and
the others wait. Files live in ``runs/<name>/data/<stage>/`` and the tokenizer
in ``runs/<name>/tokenizer/``, shared by all stages. A run in object storage has
them uploaded by the driver and fetched into each machine's view of the run;
ranks there only open them (the sources may live on the driver's disk alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from raylm.configs.loader import resolve_stage
from raylm.configs.schema import RunConfig
from raylm.data import open_dataset, prepare_dataset, training_order
from raylm.data.sampler import StreamOrder
from raylm.data.tokenizer import Tokenizer
from raylm.storage import store_of
from raylm.trainer.distill import check_teacher_tokenizer, teacher_fix
from raylm.trainer.run_inputs import DATA_DIR, TOKENIZER_DIR, outside_teacher

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class StageData:
    train: object
    val: object
    tokenizer: Tokenizer
    order: StreamOrder


def _existing_tokenizer(run_dir: Path, run: RunConfig, stage_index: int):
    """The run's tokenizer, else one shipped with the weights the stage starts from, else its teacher's
    (a student reads the teacher's tokens)."""
    if (run_dir / TOKENIZER_DIR / TOKENIZER_FILE).is_file():
        return Tokenizer.load(run_dir / TOKENIZER_DIR, fix="restore it from a finished stage's final/tokenizer.json (every stage shares it)")
    init_from = run.stages[stage_index].init_from
    if init_from and (Path(init_from) / TOKENIZER_FILE).is_file():
        return Tokenizer.load(Path(init_from), fix=f"stages.{stage_index}.init_from needs weights trained with a raylm tokenizer")
    teacher = outside_teacher(run, stage_index)
    if teacher is not None:
        return Tokenizer.load(teacher, teacher_fix(f"stages.{stage_index}.teacher"))
    return None


def prepare_stage_data(run_dir: Path, run: RunConfig, stage_index: int) -> StageData:
    cfg = resolve_stage(run, stage_index)
    stage = run.stages[stage_index]
    tokenizer = _existing_tokenizer(run_dir, run, stage_index)
    teacher = outside_teacher(run, stage_index)
    if teacher is not None:  # before the data is tokenized with a tokenizer the teacher cannot read
        check_teacher_tokenizer(tokenizer, teacher, f"stages.{stage_index}.teacher")
    train, val, tokenizer = prepare_dataset(stage.kind, cfg.data, cfg.model, run_dir / DATA_DIR / stage.name, cfg.train.seed, tokenizer=tokenizer)
    if not (run_dir / TOKENIZER_DIR / TOKENIZER_FILE).is_file():
        tokenizer.save(run_dir / TOKENIZER_DIR)
    return StageData(train, val, tokenizer, _order(train, cfg))


def _order(train, cfg: RunConfig) -> StreamOrder:
    """The stage's training order, over the samples its steps consume."""
    return training_order(train, cfg.train.seed, cfg.train.max_steps * cfg.train.global_batch_size)


def open_stage_data(run_dir: Path, run: RunConfig, stage_index: int) -> StageData:
    """The tokenizer and datasets the driver prepared, opened without their sources."""
    cfg = resolve_stage(run, stage_index)
    stage = run.stages[stage_index]
    tokenizer = Tokenizer.load(run_dir / TOKENIZER_DIR, fix="the run's storage lost it; start a new run")
    train, val = open_dataset(stage.kind, cfg.model, run_dir / DATA_DIR / stage.name)
    return StageData(train, val, tokenizer, _order(train, cfg))


def load_stage_data(run_dir: Path, run: RunConfig, stage_index: int, leader: bool, barrier: Callable[[], None]) -> StageData:
    """Every rank's view; the leader builds whatever is missing first (on a shared disk)."""
    if store_of(run_dir) is not None:
        return open_stage_data(run_dir, run, stage_index)
    if leader:
        data = prepare_stage_data(run_dir, run, stage_index)
    barrier()
    if not leader:
        data = prepare_stage_data(run_dir, run, stage_index)
    return data
