"""Tokenizer, datasets and sample order: everything a stage reads, built once on local files.

``prepare_dataset`` is the entry point; the modules beside it each do one job
(corpus, tokenizer, chat template, packed pretraining tokens, sft rows,
held-out split, sample order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

from raylm.configs.schema import DataConfig, ModelConfig
from raylm.data.corpus import iter_documents
from raylm.data.meta import matches, read_meta
from raylm.data.packed import PackedTokens, build_packed
from raylm.data.sft import SftRows, build_sft, iter_sft_examples
from raylm.data.tokenizer import TOKENIZER_FILE, Tokenizer, train_tokenizer
from raylm.errors import UserError, first_line

STAGE_KINDS = ("pretrain", "sft")


def _training_texts(kind: str, data_cfg: DataConfig) -> Iterator[str]:
    if kind == "pretrain":
        return iter_documents(data_cfg.source, data_cfg.text_field)
    return (m["content"] for conversation in iter_sft_examples(data_cfg.source) for m in conversation)


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


def prepare_dataset(
    kind: str,
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    out_dir: Union[str, Path],
    seed: int,
    tokenizer: Optional[Tokenizer] = None,
) -> Tuple[Union[PackedTokens, SftRows], Union[PackedTokens, SftRows], Tokenizer]:
    """(train reader, val reader, tokenizer) of a stage, building files in ``out_dir`` only when needed.

    The tokenizer is the one given, else the one saved in ``out_dir``, else one
    trained on the stage's texts. An existing dataset is reused when its
    meta.json records the same recipe (source, tokenizer, split, seq_len).
    """
    if kind not in STAGE_KINDS:
        raise UserError(f"stage kind {kind!r} has no dataset; use one of {', '.join(STAGE_KINDS)}")
    out_dir = Path(out_dir)
    tokenizer = tokenizer or _saved_tokenizer(out_dir, data_cfg, model_cfg)
    if tokenizer is None:
        tokenizer = train_tokenizer(_training_texts(kind, data_cfg), data_cfg.tokenizer, model_cfg.vocab_size)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={model_cfg.vocab_size}; set model.vocab_size>={tokenizer.vocab_size}")
    recipe = {
        "format": "packed" if kind == "pretrain" else "sft",
        "source": data_cfg.source,
        "tokenizer_sha256": tokenizer.fingerprint,
        "val_fraction": data_cfg.val_fraction,
        "seed": seed,
    }
    if kind == "pretrain":
        recipe["text_field"] = data_cfg.text_field
    else:
        recipe["seq_len"] = model_cfg.max_seq_len
    meta = read_meta(out_dir)
    if not matches(meta, recipe):
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(out_dir)
        if kind == "pretrain":
            documents = iter_documents(data_cfg.source, data_cfg.text_field)
            meta = build_packed(documents, tokenizer, out_dir, data_cfg.val_fraction, seed, recipe=recipe)
        else:
            examples = iter_sft_examples(data_cfg.source)
            meta = build_sft(examples, tokenizer, out_dir, model_cfg.max_seq_len, data_cfg.val_fraction, seed, recipe=recipe)
    try:
        if kind == "pretrain":
            train, val = (PackedTokens(out_dir / f"{split}.bin", meta["dtype"], model_cfg.max_seq_len) for split in ("train", "val"))
        else:
            train, val = SftRows(out_dir, "train"), SftRows(out_dir, "val")
    except (OSError, ValueError) as err:  # files removed or truncated after meta.json was written
        raise UserError(f"the dataset in {out_dir} is damaged ({first_line(err)}); delete {out_dir} to rebuild it from {data_cfg.source}") from None
    return train, val, tokenizer
