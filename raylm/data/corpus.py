"""Pretraining documents from a built-in corpus, files, directories, globs or JSONL."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Iterator, List

from raylm.errors import UserError
from raylm.files import read_text

BUILTIN_PYDOC = "builtin:pydoc"
TEXT_SUFFIXES = (".txt", ".md")
"""Files a directory source contributes."""

GLOB_CHARS = "*?["
UNUSABLE_FILE = "make it readable UTF-8 text or leave it out of data.source"


def pydoc_topics() -> List[tuple]:
    """(key, text) of the Python help topics that ship with the standard library, sorted by key."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def iter_jsonl(path: Path) -> Iterator[tuple]:
    """(line number, object) of every non-blank line; UserError naming file:line otherwise."""
    for line_number, line in enumerate(read_text(path, UNUSABLE_FILE).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{line_number}: not valid JSON ({e.msg}); write one JSON object per line") from e
        if not isinstance(record, dict):
            raise UserError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}; write one object per line")
        yield line_number, record


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for line_number, record in iter_jsonl(path):
        if text_field not in record:
            raise UserError(
                f"{path}:{line_number}: no field '{text_field}' (fields: {', '.join(record) or 'none'}); set data.text_field to the field holding the text"
            )
        text = record[text_field]
        if not isinstance(text, str):
            raise UserError(f"{path}:{line_number}: field '{text_field}' is {type(text).__name__}, not a string")
        yield text


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path, text_field)
    else:
        yield read_text(path, UNUSABLE_FILE)


def _source_files(source: str) -> List[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise UserError(f"data.source directory {path} has no {' or '.join(TEXT_SUFFIXES)} files; add some or point to a file")
        return files
    if any(c in source for c in GLOB_CHARS):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"data.source glob {source!r} matched no files; check the pattern")
        return files
    raise UserError(f"data.source {source!r} not found; give a file, a directory, a glob, a .jsonl or {BUILTIN_PYDOC}")


def iter_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """Every non-empty document of ``source`` in a deterministic order."""
    if source == BUILTIN_PYDOC:
        documents = (text for _, text in pydoc_topics())
    elif source.startswith("builtin:"):
        raise UserError(f"data.source={source!r} is not a pretraining corpus; use {BUILTIN_PYDOC}, a file, a directory, a glob or a .jsonl")
    else:
        documents = (doc for path in _source_files(source) for doc in _file_documents(path, text_field))
    empty = True
    for document in documents:
        if document.strip():
            empty = False
            yield document
    if empty:
        raise UserError(f"data.source {source!r} holds only empty documents; point it at text")
