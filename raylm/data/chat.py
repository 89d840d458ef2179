"""The one chat template, shared by SFT data and by generation.

A conversation renders as::

    <|system|>\\n{content}<|end|>\\n
    <|user|>\\n{content}<|end|>\\n
    <|assistant|>\\n{content}<|end|>\\n

and a generation prompt ends with ``<|assistant|>\\n``. The model learns to
write the assistant content and the ``<|end|>`` closing it.
"""

from __future__ import annotations

import json
from typing import Dict, List, Sequence, Tuple

from raylm.data.tokenizer import ASSISTANT, END, SYSTEM, USER, Tokenizer

ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

Message = Dict[str, str]


def check_messages(messages: Sequence[Message]) -> None:
    """Raise ValueError saying what is wrong with a conversation (callers add where it came from)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("a conversation must be a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} must be an object with a string 'content'")
        if message.get("role") not in ROLE_TOKENS:
            raise ValueError(f"message {i} has role {message.get('role')!r}; use one of {', '.join(ROLE_TOKENS)}")


def _segments(messages: Sequence[Message], add_generation_prompt: bool) -> List[Tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces; trained = the model must produce it."""
    check_messages(messages)
    pieces: List[Tuple[str, bool]] = []
    for message in messages:
        is_reply = message["role"] == "assistant"
        pieces.append((ROLE_TOKENS[message["role"]] + "\n", False))
        pieces.append((message["content"] + END, is_reply))
        pieces.append(("\n", False))
    if add_generation_prompt:
        pieces.append((ASSISTANT + "\n", False))
    return pieces


def format_chat(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    return "".join(text for text, _ in _segments(messages, add_generation_prompt))


def jinja_chat_template() -> str:
    """``format_chat`` as the Jinja ``chat_template`` Hugging Face tokenizers render in ``apply_chat_template``.

    Built from the same role tokens, so the two cannot drift apart. Every tag
    trims the whitespace around it (``-``), so only expressions write text.
    ``raise_exception`` is the helper transformers gives templates for a
    conversation they cannot render.
    """
    return (
        "{%- set role_tokens = " + json.dumps(ROLE_TOKENS) + " -%}\n"
        "{%- for message in messages -%}\n"
        "  {%- if message['role'] not in role_tokens -%}\n"
        "    {{- raise_exception('message ' ~ loop.index0 ~ ' has role ' ~ message['role'] ~ '; use one of " + ", ".join(ROLE_TOKENS) + "') -}}\n"
        "  {%- endif -%}\n"
        "  {{- role_tokens[message['role']] ~ '\\n' ~ message['content'] ~ " + json.dumps(END) + " ~ '\\n' -}}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "  {{- role_tokens['assistant'] ~ '\\n' -}}\n"
        "{%- endif -%}\n"
    )


def tokenize_chat(tokenizer: Tokenizer, messages: Sequence[Message]) -> Tuple[List[int], List[int]]:
    """Token ids of the conversation and a loss mask that is 1 exactly on assistant content and its <|end|>.

    Each piece is tokenized on its own so that no token straddles a mask boundary.
    """
    ids: List[int] = []
    loss_mask: List[int] = []
    for text, trained in _segments(messages, add_generation_prompt=False):
        piece = tokenizer.encode(text)
        ids.extend(piece)
        loss_mask.extend([int(trained)] * len(piece))
    return ids, loss_mask
