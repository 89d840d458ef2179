"""Pretraining documents: the built-in corpus, or files of the supported formats named by
paths, directories or globs.

An *input* is one file (or ``builtin:pydoc``): the unit of tokenization, one
shard per input (``raylm.data.prepare``). Text files are one document each,
read in pieces (``text_pieces``); every other format holds one document per
line or row.
"""

from __future__ import annotations

import glob
import gzip
import json
import re
from pathlib import Path
from typing import IO, Iterable, Iterator, List, Sequence, Tuple

from raylm.errors import UserError
from raylm.files import read_text_chunks

BUILTIN_PYDOC = "builtin:pydoc"
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
COLUMNAR_SUFFIXES = (".parquet", ".arrow")
"""Parquet files and Arrow IPC files (a Hugging Face ``save_to_disk`` directory holds the latter)."""
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + COLUMNAR_SUFFIXES
"""Files a directory or glob contributes; a file given by name must have one of them too."""

GLOB_CHARS = "*?["
UNUSABLE_FILE = "make it readable UTF-8 text or leave it out of data.source"
FORMATS = "a .txt/.md text file, .jsonl, .jsonl.gz, .parquet, .arrow, a directory or glob of these, a prepared dataset directory"


def pydoc_topics() -> List[tuple]:
    """(key, text) of the Python help topics that ship with the standard library, sorted by key."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def suffix_of(path: Path) -> str:
    """The format suffix, with ``.jsonl.gz`` as one."""
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), path.suffix.lower())


def _open_lines(path: Path) -> IO[bytes]:
    try:
        return gzip.open(path, "rb") if suffix_of(path) == ".jsonl.gz" else open(path, "rb")
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err}); {UNUSABLE_FILE}") from None


def iter_jsonl(path: Path) -> Iterator[tuple]:
    """(line number, object) of every non-blank line, streamed; UserError naming file:line otherwise."""
    with _open_lines(path) as f:
        try:
            for line_number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise UserError(f"{path}:{line_number}: not UTF-8 text (bad byte at column {err.start + 1}); {UNUSABLE_FILE}") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{line_number}: not valid JSON ({e.msg}); write one JSON object per line") from None
                if not isinstance(record, dict):
                    raise UserError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}; write one object per line")
                yield line_number, record
        except (OSError, EOFError) as err:  # a truncated or damaged .gz
            raise UserError(f"{path} is damaged ({err}); {UNUSABLE_FILE}") from None


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


PIECE_CHARS = 1 << 16
"""A text file is read this many bytes at a time, and a document is cut into pieces of about this many
characters to be encoded (``input_pieces``). Small pieces bound what encoding holds, since HF tokenizers'
work on one text costs several hundred bytes per character until it finishes (an 8 MB text file, the byte
tokenizer, 1 MiB batches: +795 MB over the process' baseline with pieces of 1 MiB, +185 MB with pieces of
64 KiB), and a batch's pieces are encoded in parallel."""
CUT_POINT = re.compile(r"\S\n(?=\S)")
"""A text may be cut just after a "\n" between two non-whitespace characters: pieces cut there encode to the
ids of the whole (``Tokenizer.encodes_pieces_alone``). Python's whitespace includes the tokenizer's (checked
over every code point; Python's also has U+001C-U+001F), so no cut lands next to what the tokenizer sees as
whitespace."""

Piece = Tuple[str, bool]
"""Text and whether it ends its document."""


def _cut(chunks: Iterable[str], piece_chars: int) -> Iterator[str]:
    """One text, given in ``chunks``, as pieces that each end at the first cut point at least ``piece_chars``
    characters into them; the last piece is the rest (so a text without cut points is one piece)."""
    parts: List[str] = []  # the piece gathered so far
    gathered = 0
    tail = ""  # its last two characters, where a cut point may begin
    for chunk in chunks:
        while True:
            window = tail + chunk
            earliest_end = piece_chars - gathered + len(tail)  # in window, where the piece would be long enough
            cut = CUT_POINT.search(window, max(0, earliest_end - 2))
            if cut is None:
                break
            end = cut.end() - len(tail)
            yield "".join(parts) + chunk[:end]
            parts, gathered, tail, chunk = [], 0, "", chunk[end:]
        if chunk:
            parts.append(chunk)
            gathered += len(chunk)
            tail = (tail + chunk)[-2:]
    yield "".join(parts)


def _ending(pieces: Iterator[str]) -> Iterator[Piece]:
    """The pieces of one document, the last one marked as ending it."""
    piece = next(pieces)
    for following in pieces:
        yield piece, False
        piece = following
    yield piece, True


def text_pieces(path: Path) -> Iterator[Piece]:
    """The one document of a text file in pieces of about ``PIECE_CHARS`` (cut as ``_cut`` says), read
    incrementally: only a piece and a read are held at a time, and the whole file when it has no cut point."""
    return _ending(_cut(read_text_chunks(path, UNUSABLE_FILE, PIECE_CHARS), PIECE_CHARS))


def _record_documents(source: str, text_field: str) -> Iterator[str]:
    """The documents of an input that holds one per line or row, or of ``builtin:pydoc``."""
    if source == BUILTIN_PYDOC:
        yield from (text for _, text in pydoc_topics())
        return
    path = Path(source)
    suffix = suffix_of(path)
    if suffix in JSONL_SUFFIXES:
        yield from _jsonl_documents(path, text_field)
    elif suffix in COLUMNAR_SUFFIXES:
        from raylm.data.columnar import columnar_documents

        yield from columnar_documents(path, text_field)
    else:
        raise UserError(f"{path}: unknown format '{suffix or path.name}'; give {FORMATS} (rename plain text to .txt)")


def input_pieces(source: str, text_field: str = "text") -> Iterator[Piece]:
    """Every document of one input, empty ones included, as (text, ends the document) pairs, cut as ``_cut``
    says: a text file's read in pieces (``text_pieces``), a line's or row's cut once read (it is then held
    whole as text, but encoded piece by piece)."""
    if source != BUILTIN_PYDOC and suffix_of(Path(source)) in TEXT_SUFFIXES:
        return text_pieces(Path(source))
    return (piece for document in _record_documents(source, text_field) for piece in _ending(_cut([document], PIECE_CHARS)))


def whole_documents(pieces: Iterable[Piece]) -> Iterator[str]:
    """The documents the pieces make, each joined (held whole)."""
    parts: List[str] = []
    for text, ends in pieces:
        parts.append(text)
        if ends:
            yield "".join(parts)
            parts = []


def input_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """Every document of one input, empty ones included, each whole (``input_pieces`` holds less)."""
    return whole_documents(input_pieces(source, text_field))


def _source_files(source: str) -> List[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and suffix_of(p) in SUFFIXES)
        if not files:
            raise UserError(f"data.source directory {path} has no {', '.join(SUFFIXES)} files; add some or point to a file")
        return files
    if any(c in source for c in GLOB_CHARS):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"data.source glob {source!r} matched no files; check the pattern")
        return files
    raise UserError(f"data.source {source!r} not found; give {FORMATS} or {BUILTIN_PYDOC}")


def source_inputs(sources: Sequence[str]) -> List[str]:
    """The inputs of one or more sources, in order, each once."""
    inputs: List[str] = []
    for source in sources:
        if source == BUILTIN_PYDOC:
            found = [BUILTIN_PYDOC]
        elif source.startswith("builtin:"):
            raise UserError(f"data.source={source!r} is not a pretraining corpus; use {BUILTIN_PYDOC} or {FORMATS}")
        else:
            found = [str(p) for p in _source_files(source)]
        inputs.extend(p for p in found if p not in inputs)
    return inputs

