"""raylm's built-in lm-eval tasks, made from the Python help topics a run's pretraining held out.

Each task is an lm-eval task YAML beside a JSONL of its documents, written
anew (and identically for the same run) before every evaluation:

- ``raylm_pydoc_nextword``: LAMBADA's recipe (``loglikelihood``): predict a
  sentence's last word from the rest; ``perplexity`` of that word and ``acc``
  (the word is the greedy continuation).
- ``raylm_pydoc_topic``: ``multiple_choice`` like PIQA: which help topic a
  sentence comes from, out of four; ``acc`` and ``acc_norm``.
- ``raylm_pydoc_perplexity``: wikitext's recipe (``loglikelihood_rolling``)
  over whole held-out topics; ``word_perplexity``, ``byte_perplexity`` and
  ``bits_per_byte``, which compare across tokenizers.

The topics are the ones no pretraining stage up to the evaluated one trained
on (every topic, when none pretrained on ``builtin:pydoc``). An sft stage on
``builtin:pydoc-sft`` has seen the opening of every topic, held out or not.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import yaml

from raylm.configs.loader import resolve_stage
from raylm.configs.schema import RunConfig
from raylm.data import data_kind
from raylm.data.corpus import BUILTIN_PYDOC, pydoc_topics
from raylm.data.split import held_out_mask
from raylm.data.tokenizer import Tokenizer
from raylm.errors import UserError

NEXTWORD = "raylm_pydoc_nextword"
TOPIC = "raylm_pydoc_topic"
PERPLEXITY = "raylm_pydoc_perplexity"
BUILTIN_TASKS = (NEXTWORD, TOPIC, PERPLEXITY)

MAX_DOCS = 200
"""Documents per sentence task: enough for a stable score, few enough for a CPU."""
SENTENCES_PER_TOPIC = 25
"""So that the topic task asks about several topics, not only the longest one."""
CHOICES = 4
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_PROSE = re.compile(r"[A-Z][^*]* [A-Za-z]+\.")
"""A sentence that starts with a capital and ends with a word and a full stop, with no reST heading or emphasis (``*``)."""


def held_out_topics(run: RunConfig, stage_index: int, tokenizer: Tokenizer) -> List[Tuple[str, str]]:
    """(key, text) of the help topics that no pretraining stage up to ``stage_index`` trained on."""
    topics = pydoc_topics()
    keep = np.ones(len(topics), dtype=bool)
    for index in range(stage_index + 1):
        cfg = resolve_stage(run, index)
        if data_kind(run.stages[index].kind) == "pretrain" and BUILTIN_PYDOC in cfg.data.corpora():
            # The sizes split_segments holds documents out by: their tokens and the <|endoftext|> after each.
            sizes = [len(ids) + 1 for ids in tokenizer.encode_batch([text for _, text in topics])]
            keep &= held_out_mask(sizes, cfg.data.val_fraction, cfg.train.seed)
    if not keep.any():
        raise UserError("the run's pretraining stages held out no Python help topic in common, so the built-in tasks "
                        "have nothing unseen to ask; give --tasks a directory of your own lm-eval task YAMLs")
    return [topic for topic, kept in zip(topics, keep) if kept]


def _sentences(text: str) -> List[str]:
    """The prose sentences of a help topic, whitespace collapsed, 6 to 40 words long."""
    found = []
    for sentence in _SENTENCE_END.split(text):
        sentence = " ".join(sentence.split())
        if _PROSE.fullmatch(sentence) and 6 <= len(sentence.split()) <= 40:
            found.append(sentence)
    return found


def _nextword_docs(topics: List[Tuple[str, str]]) -> List[Dict]:
    # LAMBADA's documents: the text whose last (space-separated) word is the target, without the full stop.
    return [{"text": sentence[:-1]} for _, text in topics for sentence in _sentences(text)][:MAX_DOCS]


def _topic_docs(topics: List[Tuple[str, str]]) -> List[Dict]:
    every_key = [key for key, _ in pydoc_topics()]
    docs = []
    for key, text in topics:
        for number, sentence in enumerate(_sentences(text)[:SENTENCES_PER_TOPIC]):
            # Seeded by the question itself, so a document does not change when others come or go.
            rng = random.Random(f"{key}/{number}")
            choices = rng.sample([k for k in every_key if k != key], CHOICES - 1)
            label = rng.randrange(CHOICES)
            choices.insert(label, key)
            docs.append({"passage": sentence, "choices": choices, "label": label})
    return docs[:MAX_DOCS]


def _perplexity_docs(topics: List[Tuple[str, str]]) -> List[Dict]:
    return [{"page": text} for _, text in topics]


_METRIC = {
    "perplexity": ("perplexity", False),
    "acc": ("mean", True),
    "acc_norm": ("mean", True),
    "word_perplexity": ("weighted_perplexity", False),
    "byte_perplexity": ("weighted_perplexity", False),
    "bits_per_byte": ("bits_per_byte", False),
}


def _metrics(*names: str) -> List[Dict]:
    return [{"metric": name, "aggregation": _METRIC[name][0], "higher_is_better": _METRIC[name][1]} for name in names]


# The lm-eval task configs, as lambada_openai, piqa and wikitext spell theirs.
_TASKS = {
    NEXTWORD: (_nextword_docs, {
        "output_type": "loglikelihood",
        "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
        "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": _metrics("perplexity", "acc"),
    }),
    TOPIC: (_topic_docs, {
        "output_type": "multiple_choice",
        "doc_to_text": "{{passage}}\nQuestion: Which Python help topic is this sentence from?\nAnswer:",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": _metrics("acc", "acc_norm"),
    }),
    PERPLEXITY: (_perplexity_docs, {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{page}}",
        "metric_list": _metrics("word_perplexity", "byte_perplexity", "bits_per_byte"),
    }),
}


def write_builtin_tasks(out_dir: Path, topics: List[Tuple[str, str]]) -> Path:
    """Write every built-in task's YAML and JSONL into ``out_dir`` (an lm-eval ``include_path``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, (make_docs, config) in _TASKS.items():
        data = out_dir / f"{task}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in make_docs(topics)))
        spec = {
            "task": task,
            "dataset_path": "json",
            # datasets' cache goes beside the data, so nothing of an evaluation stays behind in ~/.cache.
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(out_dir / "cache")},
            "test_split": "test",
            **config,
            "metadata": {"version": 1.0},
        }
        (out_dir / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return out_dir
