"""Reading the files raylm depends on: a missing, unreadable or damaged one is a
``UserError`` that names the file and what to do, never a traceback."""

from __future__ import annotations

import codecs
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Iterator

from raylm.errors import UserError


def _not_utf8(path: Path, offset: int, fix: str) -> UserError:
    return UserError(f"{path} is not UTF-8 text (bad byte at offset {offset}); {fix}")


def _unreadable(path: Path, err: OSError, fix: str) -> UserError:
    return UserError(f"cannot read {path} ({err.strerror or err}); {fix}")


def read_text(path: Path, fix: str, errors: str = "strict") -> str:
    """The UTF-8 text of ``path``; ``fix`` ends the message when it cannot be read
    (``errors="replace"`` for files whose damaged lines the reader skips)."""
    try:
        return Path(path).read_text(encoding="utf-8", errors=errors)
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err.start, fix) from None
    except OSError as err:
        raise _unreadable(path, err, fix) from None


def read_text_chunks(path: Path, fix: str, chunk_bytes: int) -> Iterator[str]:
    """The text ``read_text`` gives (universal newlines included), read and decoded ``chunk_bytes`` at a time;
    a bad byte is the same error, with its offset in the file."""
    utf8 = codecs.getincrementaldecoder("utf-8")()
    decoder = io.IncrementalNewlineDecoder(utf8, translate=True)
    offset = 0  # of the chunk being decoded
    try:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(chunk_bytes)
                # The first bytes of a character the previous chunk ended inside: the error counts from them.
                held = len(utf8.getstate()[0])
                try:
                    text = decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as err:
                    raise _not_utf8(path, offset - held + err.start, fix) from None
                if text:
                    yield text
                if not chunk:
                    return
                offset += len(chunk)
    except OSError as err:
        raise _unreadable(path, err, fix) from None


def read_json(path: Path, fix: str, expect: type = dict) -> Any:
    """The JSON value of ``path``, which must be an ``expect`` (an object by default)."""
    try:
        value = json.loads(read_text(path, fix))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); {fix}") from None
    if not isinstance(value, expect):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not {'an object' if expect is dict else expect.__name__}; {fix}")
    return value


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
