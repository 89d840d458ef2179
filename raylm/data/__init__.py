"""Tokenizer, datasets and sample order: everything a stage reads, built once on local files.

``prepare_dataset`` is the entry point; the modules beside it each do one job
(corpus formats, tokenizer, chat template, prepared shards in Megatron's
indexed format, packed pretraining samples over them, sft rows, classify rows, held-out
split, sample order, mixtures of several corpora and their blend).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np

from raylm.configs.schema import DataConfig, ModelConfig
from raylm.data.blend import BlendSource, cached_blend
from raylm.data.classify import ClassifyRows, build_classify, iter_classify_examples
from raylm.data.corpus import source_inputs
from raylm.data.indexed import IndexedShard
from raylm.data.meta import invalidate, matches, read_meta, write_meta
from raylm.data.mixture import BlendedSamples, MixedTokens
from raylm.data.packed import SPLITS, PackedTokens, Samples, split_segments
from raylm.data.prepare import SHARDS_DIR, is_prepared, prepare, read_manifest, shard_name, shard_prefixes, tokenizer_sample
from raylm.data.sampler import SampleOrder, StreamOrder
from raylm.data.sft import SftRows, build_sft, iter_sft_examples
from raylm.data.tokenizer import TOKENIZER_FILE, Tokenizer, train_tokenizer
from raylm.errors import UserError, first_line

STAGE_KINDS = ("pretrain", "sft", "classify", "distill")


def data_kind(kind: str) -> str:
    """The kind of dataset a stage kind reads: a distill stage learns from a teacher on pretraining data."""
    return "pretrain" if kind == "distill" else kind


MIXTURE_FILE = "mixture.json"
"""A mixture's record in its stage directory (its sources in order, the seed): written last."""
SOURCES_DIR = "sources"
BLEND_DIR = "blend"


def _saved_tokenizer(out_dir: Path, data_cfg: DataConfig, model_cfg: ModelConfig) -> Optional[Tokenizer]:
    """The tokenizer saved beside an earlier build, if it is still the one the config asks for."""
    if not (out_dir / TOKENIZER_FILE).is_file():
        return None
    try:
        saved = Tokenizer.load(out_dir)
    except UserError:
        return None  # a damaged copy in a cache: the dataset is rebuilt with a new one
    wanted_size = saved.vocab_size if data_cfg.tokenizer == "byte" else model_cfg.vocab_size
    return saved if saved.kind == data_cfg.tokenizer and saved.vocab_size == wanted_size else None


def _prepared_source(data_cfg: DataConfig, model_cfg: ModelConfig, out_dir: Path, tokenizer: Optional[Tokenizer]) -> Tuple[Path, Dict[str, Any], Tokenizer]:
    """(dataset directory, manifest, tokenizer): ``data.source`` as prepared by ``raylm data prepare``,
    or a raw source prepared into ``out_dir`` by the same code."""
    source = data_cfg.source
    if is_prepared(source):
        dataset_dir = Path(source).expanduser().resolve()
        prepared = Tokenizer.load(dataset_dir, fix=f"run 'raylm data prepare ... --out {source}' again")
        if tokenizer is not None and tokenizer.fingerprint != prepared.fingerprint:
            raise UserError(
                f"data.source {source} was prepared with another tokenizer than this run's; "
                "prepare it with 'raylm data prepare ... --tokenizer <the run's tokenizer/ directory>' or start a new run"
            )
        _check_vocab(prepared, model_cfg)
        return dataset_dir, read_manifest(dataset_dir), prepared
    if (Path(source) / SHARDS_DIR).is_dir():
        raise UserError(f"data.source {source} is an unfinished prepared dataset (no manifest.json); run 'raylm data prepare ... --out {source}' again")
    inputs = source_inputs([source])
    tokenizer = tokenizer or _saved_tokenizer(out_dir, data_cfg, model_cfg)
    if tokenizer is None:
        tokenizer = train_tokenizer(tokenizer_sample(inputs, data_cfg.text_field), data_cfg.tokenizer, model_cfg.vocab_size)
    _check_vocab(tokenizer, model_cfg)  # before minutes of tokenizing
    return out_dir, prepare(inputs, out_dir, tokenizer, data_cfg.text_field), tokenizer


def _segments_path(out_dir: Path, split: str) -> Path:
    return out_dir / f"{split}.segments.npy"


def _pretrain_splits(data_cfg: DataConfig, model_cfg: ModelConfig, out_dir: Path, seed: int, tokenizer: Optional[Tokenizer]):
    dataset_dir, manifest, tokenizer = _prepared_source(data_cfg, model_cfg, out_dir, tokenizer)
    prefixes = shard_prefixes(dataset_dir, manifest)
    # The held-out split is a pure function of the shards, the fraction and the seed; cached here
    # (rank 0 computes it, the other ranks and later runs of the stage read it).
    recipe = {
        "format": "packed",
        "dataset": str(dataset_dir),
        "manifest_sha256": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
        "val_fraction": data_cfg.val_fraction,
        "seed": seed,
    }
    if not matches(read_meta(out_dir), recipe):
        invalidate(out_dir)
        segments = split_segments([IndexedShard(p) for p in prefixes], data_cfg.val_fraction, seed)
        for split in SPLITS:
            np.save(_segments_path(out_dir, split), segments[split])
        counts = {f"{split}_tokens": int((segments[split][:, 2] - segments[split][:, 1]).sum()) for split in SPLITS}
        write_meta(out_dir, {**recipe, **counts, "source": data_cfg.source, "tokenizer_sha256": tokenizer.fingerprint})
    with _damaged_files_are_user_errors(out_dir, data_cfg):
        train, val = _packed_splits(prefixes, out_dir, model_cfg)
    return train, val, tokenizer


def _packed_splits(prefixes, out_dir: Path, model_cfg: ModelConfig) -> Tuple[PackedTokens, PackedTokens]:
    return tuple(PackedTokens(prefixes, np.load(_segments_path(out_dir, split)), model_cfg.max_seq_len, split) for split in SPLITS)


@contextmanager
def _named(key: str) -> Iterator[None]:
    """The one-source code names the setting it reads data.source; within a mixture that source is ``key``."""
    try:
        yield
    except UserError as err:
        raise UserError(str(err).replace("data.source", key)) from None


def _source_dir(out_dir: Path, path: str) -> Path:
    """Where a mixture keeps one source's split (and shards, for a raw source): named after its path."""
    return out_dir / SOURCES_DIR / shard_name(path)


def _mixture_splits(data_cfg: DataConfig, model_cfg: ModelConfig, out_dir: Path, seed: int, tokenizer: Optional[Tokenizer]):
    """Each of ``data.sources`` prepared as ``data.source`` would be, into its own directory, all with one tokenizer."""
    sources = data_cfg.sources
    saved = _saved_tokenizer(out_dir, data_cfg, model_cfg)
    tokenizer = tokenizer or saved
    # A prepared source brings the tokenizer it was made with, which then tokenizes the raw ones: it goes first.
    first_to_last = sorted(range(len(sources)), key=lambda k: not is_prepared(sources[k].path))
    if tokenizer is None and not is_prepared(sources[first_to_last[0]].path):
        sample = tokenizer_sample(source_inputs([source.path for source in sources]), data_cfg.text_field)
        tokenizer = train_tokenizer(sample, data_cfg.tokenizer, model_cfg.vocab_size)
    splits: Dict[int, Tuple[PackedTokens, PackedTokens]] = {}
    for k in first_to_last:
        path, source_dir = sources[k].path, _source_dir(out_dir, sources[k].path)
        source_dir.mkdir(parents=True, exist_ok=True)
        with _named(f"data.sources.{k}.path"):
            train, val, tokenizer = _pretrain_splits(replace(data_cfg, source=path, sources=None), model_cfg, source_dir, seed, tokenizer)
        splits[k] = (train, val)
    # Written only when they change: the ranks of a launch on a shared disk all pass here.
    if saved is None or saved.fingerprint != tokenizer.fingerprint:
        tokenizer.save(out_dir)
    record = {"sources": [{"path": s.path, "weight": s.weight} for s in sources], "seed": seed}
    if read_meta(out_dir, MIXTURE_FILE) != record:
        write_meta(out_dir, record, name=MIXTURE_FILE)
    return (*_mixture(out_dir, model_cfg, [splits[k] for k in range(len(sources))]), tokenizer)


def prepared_mixture_sources(data_cfg: DataConfig, out_dir: Path) -> List[Tuple[Path, Path]]:
    """(prepared dataset, the directory of ``out_dir`` its shards and manifest are read from when the sources are
    out of reach) of each source of a mixture made by ``raylm data prepare``."""
    return [(Path(s.path).expanduser(), _source_dir(out_dir, s.path)) for s in data_cfg.sources or [] if is_prepared(s.path)]


def _mixture(out_dir: Path, model_cfg: ModelConfig, splits: List[Tuple[PackedTokens, PackedTokens]]) -> Tuple[MixedTokens, BlendedSamples]:
    """(train, val) of a mixture recorded in ``out_dir``: each split the sources' samples back to back,
    the held-out one read through its blend."""
    record = read_meta(out_dir, MIXTURE_FILE)
    listed = record["sources"]
    # What each source's samples are made of: its split's record (shards' manifest, fraction, seed, counts).
    fingerprints = [hashlib.sha256(json.dumps(read_meta(_source_dir(out_dir, s["path"])), sort_keys=True).encode()).hexdigest() for s in listed]
    train, val = (
        MixedTokens(
            [pair[split] for pair in splits],
            [BlendSource(s["path"], s["weight"], pair[split].num_samples, fingerprint) for s, pair, fingerprint in zip(listed, splits, fingerprints)],
            out_dir / BLEND_DIR,
        )
        for split in range(len(SPLITS))
    )
    return train, BlendedSamples(val, cached_blend(out_dir / BLEND_DIR, "val", val.sources, record["seed"], model_cfg.max_seq_len, val.num_samples))


@contextmanager
def _damaged_files_are_user_errors(out_dir: Path, data_cfg: DataConfig) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError) as err:  # files removed or truncated after their record was written
        raise UserError(f"the dataset in {out_dir} is damaged ({first_line(err)}); delete {out_dir} to rebuild it from {data_cfg.source}") from None


def _check_vocab(tokenizer: Tokenizer, model_cfg: ModelConfig) -> None:
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={model_cfg.vocab_size}; set model.vocab_size>={tokenizer.vocab_size}")


def _rows_tokenizer(data_cfg: DataConfig, model_cfg: ModelConfig, out_dir: Path, tokenizer: Optional[Tokenizer],
                    texts: Callable[[], Iterable[str]]) -> Tokenizer:
    """The tokenizer of a stage whose examples become rows (sft, classify): the one given, else the one saved
    beside its rows, else one trained on ``texts()``."""
    tokenizer = tokenizer or _saved_tokenizer(out_dir, data_cfg, model_cfg)
    if tokenizer is None:
        tokenizer = train_tokenizer(texts(), data_cfg.tokenizer, model_cfg.vocab_size)
    _check_vocab(tokenizer, model_cfg)
    return tokenizer


def _rows_recipe(kind: str, data_cfg: DataConfig, model_cfg: ModelConfig, seed: int, tokenizer: Tokenizer) -> Dict[str, Any]:
    """What a stage's rows are a function of: they are rebuilt when any of it changes."""
    return {
        "format": kind,
        "source": data_cfg.source,
        "tokenizer_sha256": tokenizer.fingerprint,
        "val_fraction": data_cfg.val_fraction,
        "seed": seed,
        "seq_len": model_cfg.max_seq_len,
    }


def _sft_texts(source: str) -> Iterator[str]:
    return (message["content"] for conversation in iter_sft_examples(source) for message in conversation)


def _sft_splits(data_cfg: DataConfig, model_cfg: ModelConfig, out_dir: Path, seed: int, tokenizer: Optional[Tokenizer]):
    tokenizer = _rows_tokenizer(data_cfg, model_cfg, out_dir, tokenizer, partial(_sft_texts, data_cfg.source))
    recipe = _rows_recipe("sft", data_cfg, model_cfg, seed, tokenizer)
    if not matches(read_meta(out_dir), recipe):
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(out_dir)
        build_sft(iter_sft_examples(data_cfg.source), tokenizer, out_dir, model_cfg.max_seq_len, data_cfg.val_fraction, seed, recipe=recipe)
    with _damaged_files_are_user_errors(out_dir, data_cfg):
        return SftRows(out_dir, "train"), SftRows(out_dir, "val"), tokenizer


def _classify_splits(data_cfg: DataConfig, model_cfg: ModelConfig, out_dir: Path, seed: int, tokenizer: Optional[Tokenizer]):
    examples = partial(iter_classify_examples, data_cfg.source, data_cfg.text_field, data_cfg.label_field)
    tokenizer = _rows_tokenizer(data_cfg, model_cfg, out_dir, tokenizer, lambda: (example.text for example in examples()))
    recipe = {**_rows_recipe("classify", data_cfg, model_cfg, seed, tokenizer), "text_field": data_cfg.text_field,
              "label_field": data_cfg.label_field}
    if not matches(read_meta(out_dir), recipe):
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(out_dir)
        build_classify(examples(), tokenizer, out_dir, model_cfg.max_seq_len, data_cfg.val_fraction, seed, recipe)
    with _damaged_files_are_user_errors(out_dir, data_cfg):
        return ClassifyRows(out_dir, "train"), ClassifyRows(out_dir, "val"), tokenizer


def open_dataset(kind: str, model_cfg: ModelConfig, out_dir: Path) -> Tuple[Union[PackedTokens, SftRows], Union[PackedTokens, SftRows]]:
    """(train reader, val reader) of a stage dataset ``prepare_dataset`` built into ``out_dir`` from raw
    sources, opened from its files alone (where its sources are out of reach)."""
    out_dir, kind = Path(out_dir), data_kind(kind)
    try:
        if kind == "pretrain" and (out_dir / MIXTURE_FILE).is_file():
            source_dirs = [_source_dir(out_dir, s["path"]) for s in read_meta(out_dir, MIXTURE_FILE)["sources"]]
            return _mixture(out_dir, model_cfg, [_packed_splits(shard_prefixes(d, read_manifest(d)), d, model_cfg) for d in source_dirs])
        if kind == "pretrain":
            return _packed_splits(shard_prefixes(out_dir, read_manifest(out_dir)), out_dir, model_cfg)
        rows = ClassifyRows if kind == "classify" else SftRows
        return rows(out_dir, "train"), rows(out_dir, "val")
    except (OSError, ValueError) as err:
        raise UserError(f"the dataset in {out_dir} is damaged ({first_line(err)}); start the stage again to prepare it anew") from None


def prepare_dataset(
    kind: str,
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    out_dir: Union[str, Path],
    seed: int,
    tokenizer: Optional[Tokenizer] = None,
) -> Tuple[Union[PackedTokens, SftRows], Union[PackedTokens, SftRows], Tokenizer]:
    """(train reader, val reader, tokenizer) of a stage, building files in ``out_dir`` only when needed.

    The tokenizer is the one given, else the one a prepared ``data.source`` was
    made with, else the one saved in ``out_dir``, else one trained on a bounded
    sample of the stage's texts. Shards, splits and sft rows are reused while
    their records say they were built from the same inputs and recipe.

    ``data.sources`` (a mixture) prepares each source so, with that one
    tokenizer (a prepared source's, or one trained on a bounded sample across
    the sources); the train reader is then a ``MixedTokens`` whose order is its
    blend (``training_order``), the val reader its held-out samples in blend order.
    """
    if kind not in STAGE_KINDS:
        raise UserError(f"stage kind {kind!r} has no dataset; use one of {', '.join(STAGE_KINDS)}")
    out_dir, kind = Path(out_dir), data_kind(kind)
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "pretrain" and data_cfg.sources is not None:
        return _mixture_splits(data_cfg, model_cfg, out_dir, seed, tokenizer)
    build = {"pretrain": _pretrain_splits, "sft": _sft_splits, "classify": _classify_splits}[kind]
    return build(data_cfg, model_cfg, out_dir, seed, tokenizer)


def training_order(train: Union[Samples, SftRows], seed: int, samples: int) -> StreamOrder:
    """The order a stage reads ``train`` in: for a mixture, its blend over the ``samples`` the stage trains on
    (max_steps x global_batch_size); otherwise one stream of shuffled epochs."""
    if isinstance(train, MixedTokens):
        return cached_blend(train.blend_root, "train", train.sources, seed, train.seq_len, samples)
    return SampleOrder(train.num_samples, seed)
