"""What a stage's ranks read besides checkpoints, and (for a run in object storage) how it gets to them.

The driver stages every input into its view of the run and uploads it
(``stage_inputs``): the tokenizer, the stage's prepared data (with a prepared
``data.source``'s shards linked in, so workers never need the driver's disk)
and ``init_from`` weights (under ``<stage>/init/``). Each machine's first rank
then fetches them into its own view (``fetch_inputs``), once per file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import List, Optional

from raylm import storage
from raylm.configs.schema import RunConfig
from raylm.trainer.layout import CONFIG_FILE, FINAL_DIR

TOKENIZER_DIR = "tokenizer"
DATA_DIR = "data"
INIT_DIR = "init"
"""Where a run in object storage keeps a stage's ``init_from`` weights."""


def initial_weights(run_dir: Path, run: RunConfig, index: int) -> Optional[Path]:
    """The consolidated weights stage ``index`` starts from, if any."""
    stage = run.stages[index]
    if stage.init_from:
        return run_dir / stage.name / INIT_DIR if storage.store_of(run_dir) is not None else Path(stage.init_from)
    if index > 0:
        return run_dir / run.stages[index - 1].name / FINAL_DIR
    return None


def outside_teacher(run: RunConfig, index: int) -> Optional[Path]:
    """The directory a distill stage ``index`` names as its teacher, unless it names one of the run's stages
    (a stage's name wins over a directory of that name); None for other kinds."""
    teacher = run.stages[index].teacher
    return Path(teacher) if teacher is not None and teacher not in [stage.name for stage in run.stages] else None


def teacher_weights(run_dir: Path, run: RunConfig, index: int) -> Optional[Path]:
    """The weights a distill stage ``index`` learns from: its outside teacher, or its teacher stage's final/."""
    teacher = run.stages[index].teacher
    if teacher is None:
        return None
    return outside_teacher(run, index) or run_dir / teacher / FINAL_DIR


def _input_trees(run: RunConfig, index: int) -> List[str]:
    stage = run.stages[index]
    trees = [TOKENIZER_DIR, f"{DATA_DIR}/{stage.name}"]
    if stage.init_from:
        trees.append(f"{stage.name}/{INIT_DIR}")
    elif index > 0:
        trees.append(f"{run.stages[index - 1].name}/{FINAL_DIR}")
    return trees


def _link_tree(source: Path, target: Path) -> None:
    """``target`` holds ``source``'s files, hard-linked (copied across filesystems)."""
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        destination = target / path.relative_to(source)
        if destination.exists():
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:
            shutil.copy2(path, destination)


def _link_prepared(prepared: Path, target: Path) -> None:
    """``target`` holds a prepared dataset's shards and manifest, as a stage opens them from its own files."""
    from raylm.data.prepare import MANIFEST, SHARDS_DIR

    _link_tree(prepared / SHARDS_DIR, target / SHARDS_DIR)
    shutil.copy2(prepared / MANIFEST, target / MANIFEST)


def stage_inputs(run_dir: Path, run: RunConfig, index: int, prepared_source: Optional[Path]) -> None:
    """On the driver of a run in object storage: upload what stage ``index`` reads (its data prepared in
    ``run_dir/data/<stage>``; ``prepared_source`` is the prepared dataset its shards live in, if not there;
    a mixture's prepared sources are linked into their own directories there)."""
    from raylm.configs.loader import resolve_stage
    from raylm.data import prepared_mixture_sources

    stage = run.stages[index]
    data = run_dir / DATA_DIR / stage.name
    if prepared_source is not None and prepared_source.resolve() != data.resolve():
        _link_prepared(prepared_source, data)
    for prepared, target in prepared_mixture_sources(resolve_stage(run, index).data, data):
        _link_prepared(prepared, target)
    if stage.init_from:
        _link_tree(Path(stage.init_from), run_dir / stage.name / INIT_DIR)
    for tree in _input_trees(run, index):
        if (run_dir / tree).is_dir():
            storage.push_tree(run_dir, tree)


def fetch_inputs(run_dir: Path, index: int) -> int:
    """On a worker of a run in object storage: the config and stage ``index``'s inputs into this machine's view;
    the bytes this call downloaded."""
    from raylm.configs.loader import from_yaml_file

    storage.pull(run_dir, CONFIG_FILE)
    run = from_yaml_file(run_dir / CONFIG_FILE)
    return sum(storage.fetch_tree(run_dir, tree) for tree in _input_trees(run, index))
