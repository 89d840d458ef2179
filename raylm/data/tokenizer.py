"""Tokenizers trained locally: byte-level BPE, or raw UTF-8 bytes.

Both kinds are a Hugging Face ``tokenizers.Tokenizer`` over the 256-symbol
ByteLevel alphabet, so any text round-trips exactly and the saved
``tokenizer.json`` loads in ``transformers.PreTrainedTokenizerFast``. The byte
kind is simply that BPE model with no merges.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, List, Sequence, Union

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from raylm.errors import UserError, first_line

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
SPECIAL_TOKENS = (EOS, PAD, SYSTEM, USER, ASSISTANT, END)
"""Special tokens, given ids 0..5 in this order by both kinds."""

KINDS = ("bpe", "byte")
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
"""Both kinds need every byte plus the specials (configs.validate mirrors this for 'byte')."""

TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"

HF_SPECIAL_TOKENS = {
    # No begin-of-sequence token of its own: <|endoftext|> follows every pretraining document, so it is
    # also what every document but the first starts after (GPT-2's convention, which lm-eval relies on
    # to score a continuation of an empty context).
    "bos_token": EOS,
    "eos_token": EOS,
    "pad_token": PAD,
    "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END],
}
"""The special tokens' roles as Hugging Face's tokenizer_config.json names them."""


class Tokenizer:
    """A thin wrapper that knows raylm's special tokens."""

    def __init__(self, hf_tokenizer: HFTokenizer, source: str = "the tokenizer", fix: str = "use a tokenizer trained by raylm"):
        missing = [t for t in SPECIAL_TOKENS if hf_tokenizer.token_to_id(t) is None]
        if missing:
            raise UserError(f"{source} lacks raylm's special tokens {', '.join(missing)}; {fix}")
        self.hf = hf_tokenizer
        self.eos_id = hf_tokenizer.token_to_id(EOS)
        self.pad_id = hf_tokenizer.token_to_id(PAD)
        self.system_id = hf_tokenizer.token_to_id(SYSTEM)
        self.user_id = hf_tokenizer.token_to_id(USER)
        self.assistant_id = hf_tokenizer.token_to_id(ASSISTANT)
        self.end_id = hf_tokenizer.token_to_id(END)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def kind(self) -> str:
        """'byte' when the BPE model has no merges, else 'bpe'."""
        return "bpe" if json.loads(self.hf.to_str())["model"]["merges"] else "byte"

    @property
    def encodes_pieces_alone(self) -> bool:
        """Whether a text cut just after a "\\n" between two non-whitespace characters (``raylm.data.corpus``
        cuts long documents there) encodes, piece by piece, to the ids of the whole text.

        True for GPT-2's byte-level pre-tokenizer without a prefix space or a normalizer, raylm's own: the
        model merges within pre-tokens only, that "\\n" is a pre-token of its own whether the text goes on or
        ends there, and the next character starts one either way. Not known for anything else, so False: a
        pre-tokenizer that prefixes every text with a space (Metaspace, SentencePiece-like), a normalizer, or
        an added token that could span the cut (holding a "\\n") or take the "\\n" before it (``lstrip``).
        """
        spec = json.loads(self.hf.to_str())
        pre_tokenizer = spec.get("pre_tokenizer") or {}
        gpt2_pre_tokens = pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("add_prefix_space") is False and pre_tokenizer.get("use_regex") is True
        added_stay_whole = all("\n" not in token["content"] and not token.get("lstrip") for token in spec.get("added_tokens") or [])
        return gpt2_pre_tokens and spec.get("normalizer") is None and added_stay_whole

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer: datasets built with another one are stale."""
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()

    def encode(self, text: str) -> List[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Many texts at once; the Rust side spreads them over the cores."""
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def ids_of(self, tokens: Sequence[str]) -> List[int]:
        """The ids of special tokens (every one of raylm's is in the vocabulary)."""
        return [self.hf.token_to_id(token) for token in tokens]

    def decode(self, ids: Sequence[int]) -> str:
        # Special tokens are kept so that decode(encode(text)) == text for any text.
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: Union[str, Path]) -> None:
        """Write tokenizer.json and the tokenizer_config.json Hugging Face's AutoTokenizer reads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / TOKENIZER_FILE))
        hf_config = {"tokenizer_class": "PreTrainedTokenizerFast", **HF_SPECIAL_TOKENS, "model_max_length": 1_000_000_000}
        (directory / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Union[str, Path], fix: str = "point to a directory holding a raylm tokenizer.json") -> "Tokenizer":
        """The tokenizer.json in ``directory``; ``fix`` ends the message when it is missing or unusable."""
        return cls.load_file(Path(directory) / TOKENIZER_FILE, fix)

    @classmethod
    def load_file(cls, path: Union[str, Path], fix: str) -> "Tokenizer":
        """A tokenizer.json under any name."""
        if not Path(path).is_file():
            raise UserError(f"no tokenizer at {path}; {fix}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a plain Exception for bad files
            raise UserError(f"{path} is not a valid tokenizer.json ({first_line(e)}); {fix}") from None
        return cls(hf, str(path), fix)


def _byte_level_tokenizer(model: models.Model) -> HFTokenizer:
    hf = HFTokenizer(model)
    # No prefix space: a leading space would break exact round trips.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


def _byte_tokenizer() -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({symbol: len(SPECIAL_TOKENS) + i for i, symbol in enumerate(alphabet)})
    hf = _byte_level_tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(hf)


def _bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    hf = _byte_level_tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte symbol, seen or not, so that any text stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    learned = hf.get_vocab_size(with_added_tokens=True)
    if learned != vocab_size:
        raise UserError(
            f"the corpus is too small to learn {vocab_size} BPE tokens (it supports {learned}); "
            f"set model.vocab_size<={learned}, use a bigger data.source, or data.tokenizer=byte"
        )
    return Tokenizer(hf)


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int) -> Tokenizer:
    """A tokenizer of exactly ``vocab_size`` tokens ('bpe') or of the 262 byte tokens ('byte')."""
    if kind not in KINDS:
        raise UserError(f"data.tokenizer={kind!r} is not a tokenizer kind; use one of {', '.join(KINDS)}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"model.vocab_size={vocab_size} is too small for data.tokenizer={kind!r}; use at least {MIN_VOCAB_SIZE}")
    return _byte_tokenizer() if kind == "byte" else _bpe_tokenizer(texts, vocab_size)
