"""Using a finished stage outside training: generate and evaluate (raylm.launcher.export exports it).

Single-process and Ray-free: everything reads a stage's ``final/`` directory
(consolidated safetensors + tokenizer), so it works on any machine that can
see the run directory, on its GPU when it has one.
"""

from __future__ import annotations

import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np
import torch

from raylm import storage
from raylm.configs.loader import resolve_stage
from raylm.configs.schema import ModelConfig, RunConfig
from raylm.data import open_dataset, prepare_dataset
from raylm.data.classify import ClassifyRows, encode_examples, iter_classify_examples
from raylm.data.indexed import token_dtype
from raylm.data.sft import save_rows
from raylm.data.tokenizer import Tokenizer
from raylm.errors import UserError
from raylm.trainer import run_dir as rundir
from raylm.trainer.sample import prompt_for, stop_tokens
from raylm.trainer.run_inputs import DATA_DIR
from raylm.models.generate import stream
from raylm.models.llama import Llama
from raylm.models.loss import cross_entropy_loss
from raylm.evals.classification import score_classifier
from raylm.models.classifier import LlamaClassifier
from raylm.models.weights import load_consolidated, stored_labels


@dataclass
class FinishedStage:
    run: RunConfig
    name: str
    kind: str
    index: int
    final_dir: Path
    model_cfg: ModelConfig
    model: Llama
    """A ``LlamaClassifier`` for a classify stage."""
    tokenizer: Tokenizer
    labels: Optional[List[str]] = None
    """A classify stage's class names, in the order of its head's rows."""


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_stage(run_dir: Path, stage: Optional[str] = None, device: Optional[torch.device] = None) -> FinishedStage:
    """The given stage's (default: the last finished stage's) model, on ``device`` (default: the GPU if any), and tokenizer."""
    run = rundir.load(run_dir)
    final_dir = rundir.latest_final(run_dir, run, stage)
    name = final_dir.parent.name
    index = [s.name for s in run.stages].index(name)
    # A stage whose final/ is gone counts as unfinished; resuming writes it again from the last checkpoint.
    fix = f"delete {final_dir} and run 'raylm resume {storage.where(run_dir)}' to write it again from the stage's last checkpoint"
    cfg, state = load_consolidated(final_dir, fix)
    labels = stored_labels(final_dir, fix)
    tokenizer = Tokenizer.load(final_dir, fix)
    with torch.device(device or default_device()):
        model = Llama(cfg) if labels is None else LlamaClassifier(cfg, len(labels))
    model.load_state_dict(state)
    model.eval()
    return FinishedStage(run, name, run.stages[index].kind, index, final_dir, cfg, model, tokenizer, labels)


def refuse_classifier(stage: FinishedStage, what: str) -> None:
    """A classifier has no language-model head: ``what`` (generating, lm-eval tasks, GGUF) needs one."""
    if stage.labels is not None:
        raise UserError(f"stage '{stage.name}' is a classifier (labels {', '.join(stage.labels)}) and cannot {what}; "
                        f"give --stage with a pretrain or sft stage, or score it with 'raylm eval --stage {stage.name}'")


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """Refuse sampling settings the sampler cannot honour (a top-k below 1 would keep no token at all;
    the CLI's ``--top-k 0`` means no top-k and arrives here as None)."""
    if temperature < 0:
        raise UserError(f"--temperature {temperature} must be >= 0 (0 is greedy)")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k {top_k} must be >= 1: the number of most likely tokens to sample from")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p} must be in (0, 1]: the probability mass of the most likely tokens to sample from")


def generate_text(
    stage: FinishedStage,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    seed: int,
) -> Iterator[str]:
    """Yield decoded text pieces as tokens arrive; sft stages use the chat template."""
    check_sampling(temperature, top_k, top_p)
    refuse_classifier(stage, "generate text")
    tok = stage.tokenizer
    text = prompt_for(stage.kind, prompt) if stage.kind == "sft" else prompt
    ids = tok.encode(text)
    if not ids:
        raise UserError("--prompt is empty; give some text to continue")
    stops = tok.ids_of(stop_tokens(stage.kind))
    produced: list = []
    shown = ""
    with torch.no_grad():
        for token in stream(stage.model, torch.tensor([ids]), max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, eos_id=stops, seed=seed):
            if token in stops:
                break
            produced.append(token)
            decoded = tok.decode(produced)
            # A byte-level token can end inside a UTF-8 character; wait for the rest.
            if not decoded.endswith("\ufffd"):
                yield decoded[len(shown):]
                shown = decoded


def evaluate(stage: FinishedStage, run_dir: Path, data: Optional[str], max_batches: int, batch_size: int = 8) -> dict:
    """Mean held-out loss and perplexity (responses only for sft data); a classifier's accuracy and counts on
    every held-out example (or every example of ``data``)."""
    cfg = resolve_stage(stage.run, stage.index)
    if data is None:
        val = _held_out_split(stage, run_dir, cfg)
        what = f"the held-out split of {stage.name}"
        if stage.labels is not None:
            return {"data": what, **score_classifier(stage.model, val, stage.labels, stage.tokenizer.pad_id)}
        return _mean_loss(stage.model, val, max_batches, batch_size, what)
    if not Path(data).exists():
        raise UserError(f"--data {data}: no such file or directory")
    if stage.labels is not None:
        return {"data": data, **_score_file(stage, cfg, data)}
    data_cfg = replace(cfg.data, source=data, sources=None)  # --data replaces a mixture too
    with tempfile.TemporaryDirectory(prefix="raylm-eval-") as scratch, _named_as_data_option():
        train, val, _ = prepare_dataset(stage.kind, data_cfg, stage.model_cfg, Path(scratch), cfg.train.seed, tokenizer=stage.tokenizer)
        return _mean_loss(stage.model, _Concat(train, val), max_batches, batch_size, data)


def _held_out_split(stage: FinishedStage, run_dir: Path, cfg: RunConfig):
    """The reader of the stage's held-out split, as it was prepared for training."""
    held_out = run_dir / DATA_DIR / stage.name
    if storage.store_of(run_dir) is not None:  # a run in object storage: its prepared data, not its sources
        storage.fetch_tree(run_dir, f"{DATA_DIR}/{stage.name}")
        return open_dataset(stage.kind, stage.model_cfg, held_out)[1]
    return prepare_dataset(stage.kind, cfg.data, stage.model_cfg, held_out, cfg.train.seed, tokenizer=stage.tokenizer)[1]


@contextmanager
def _named_as_data_option() -> Iterator[None]:
    """The corpus readers name the setting they read, which here is --data, not the config's data.source."""
    try:
        yield
    except UserError as err:
        raise UserError(str(err).replace("data.source", "--data")) from None


def _score_file(stage: FinishedStage, cfg: RunConfig, data: str) -> dict:
    """``score_classifier`` on every example of the JSONL ``data``, labelled with the stage's labels."""
    with _named_as_data_option():
        examples = list(iter_classify_examples(data, cfg.data.text_field, cfg.data.label_field))
    rows = encode_examples(examples, stage.labels, stage.tokenizer, stage.model_cfg.max_seq_len,
                           "the stage was trained on those labels only; leave this example out of --data")
    with tempfile.TemporaryDirectory(prefix="raylm-eval-") as scratch:
        save_rows(Path(scratch), "eval", rows, token_dtype(stage.tokenizer.vocab_size))
        return score_classifier(stage.model, ClassifyRows(scratch, "eval", stage.labels), stage.labels, stage.tokenizer.pad_id)


class _Concat:
    """All rows of a user-given file: its 'train' and 'held-out' parts together."""

    def __init__(self, first, second):
        self.parts = (first, second)
        self.num_samples = first.num_samples + second.num_samples

    def batch(self, indices):
        rows = [self.parts[0].batch([i]) if i < self.parts[0].num_samples else self.parts[1].batch([i - self.parts[0].num_samples]) for i in indices]
        return np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])


def _mean_loss(model: Llama, reader, max_batches: int, batch_size: int, what: str) -> dict:
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, min(reader.num_samples, max_batches * batch_size), batch_size):
            indices = list(range(start, min(start + batch_size, reader.num_samples)))
            inputs, targets = reader.batch(indices)
            loss = cross_entropy_loss(model(torch.from_numpy(inputs).to(device)), torch.from_numpy(targets).to(device))
            total += loss.item() * len(indices)
            count += len(indices)
    if count == 0:
        raise UserError(f"{what} has no sequences to evaluate")
    loss = total / count
    return {"data": what, "sequences": count, "loss": loss, "perplexity": math.exp(min(loss, 50.0))}
