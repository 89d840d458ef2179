"""A prepared dataset: every input tokenized once into its own Megatron ``.bin``/``.idx`` shard.

```
DIR/
  tokenizer.json        the tokenizer every shard was made with
  shards/NAME.bin|.idx  one pair per input file, documents each ending in <|endoftext|>
  shards/NAME.json      that shard's record: its input (size, mtime, sha256), tokenizer, counts
  manifest.json         written last: tokenizer, dtype, every shard's record in input order
```

A shard is reused while its record matches its input (size and content hash:
an unchanged size and mtime skip the hash) and the tokenizer, so a rerun with
the same inputs is a no-op and a changed input re-tokenizes only its shard.
``tokenize_input`` is one shard's whole job: it runs in this process or as a
Ray task (``raylm.cluster.tasks``), which is how ``raylm data prepare`` spreads
the inputs over a cluster.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from tokenizers import Tokenizer as HFTokenizer

from raylm.data.corpus import BUILTIN_PYDOC, Piece, input_pieces, pydoc_topics, whole_documents
from raylm.data.indexed import IndexedShard, ShardWriter, token_dtype
from raylm.data.meta import invalidate, read_meta, write_meta
from raylm.data.tokenizer import Tokenizer
from raylm.errors import UserError

MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
FORMAT = "raylm-prepared-1"
ENCODE_BATCH_DOCUMENTS = 512
ENCODE_BATCH_CHARS = 1 << 20
"""Documents, or pieces of documents, handed to the tokenizer at once: up to 512 of them and about 1 MiB of
text (whichever comes first; a longer one goes alone), big enough to use every core, small enough to
stream. The text bound caps one batch's memory: HF tokenizers' encodings and the lists of ids cost a few
hundred bytes per token while a batch is in flight (+46 MB over the process' baseline instead of +183 MB
for 512 documents of 16 KB Python sources: BENCHMARKS.md, "Data preparation throughput"). A longer
document comes in pieces of about ``raylm.data.corpus.PIECE_CHARS`` (64 KiB) where the tokenizer allows it."""
TOKENIZER_SAMPLE_BYTES = 64 << 20
"""Text a tokenizer is trained on at most, taken evenly from the inputs' first documents."""
HASH_CHUNK = 1 << 20

Progress = Callable[[int, int], None]
"""Called with (text bytes, tokens) as a shard advances."""


def is_prepared(path: str) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _builtin_text() -> bytes:
    return "".join(text for _, text in pydoc_topics()).encode()


def input_identity(input_: str) -> Dict[str, Any]:
    """What is cheap to know about an input: its size and modification time."""
    if input_ == BUILTIN_PYDOC:
        return {"size": len(_builtin_text()), "mtime_ns": None}
    try:
        stat = Path(input_).stat()
    except OSError as err:
        raise UserError(f"cannot read {input_} ({err.strerror or err}); make it readable or leave it out of the sources") from None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def content_sha256(input_: str) -> str:
    if input_ == BUILTIN_PYDOC:
        return hashlib.sha256(_builtin_text()).hexdigest()
    digest = hashlib.sha256()
    with open(input_, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def shard_name(input_: str) -> str:
    """Stable per input path (inputs may be added or removed around it): its stem and a hash of the path."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(input_).name)[:48]
    return f"{stem}-{hashlib.sha1(input_.encode()).hexdigest()[:10]}"


@dataclass
class ShardJob:
    """Everything one input's tokenization needs; small and picklable, for a Ray task."""

    input: str
    prefix: str
    tokenizer_json: str
    text_field: str


def _batches(pieces: Iterable[Piece], size: int, max_chars: int) -> Iterator[List[Piece]]:
    """Lists of at most ``size`` pieces whose text stays under ``max_chars`` (a longer piece goes alone)."""
    batch: List[Piece] = []
    chars = 0
    for piece in pieces:
        if batch and chars + len(piece[0]) > max_chars:
            yield batch
            batch, chars = [], 0
        batch.append(piece)
        chars += len(piece[0])
        if len(batch) == size:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encodable_pieces(job: ShardJob, tokenizer: Tokenizer) -> Iterator[Piece]:
    """The input's non-blank documents as (text, ends the document) pairs: in pieces when they encode to the
    ids of the whole (``Tokenizer.encodes_pieces_alone``), else joined, a text file's held whole."""
    pieces = input_pieces(job.input, job.text_field)
    if not tokenizer.encodes_pieces_alone:
        pieces = ((document, True) for document in whole_documents(pieces))
    # Only a document of one piece can be blank: a piece that does not end its document ends with a
    # non-whitespace character and "\n", and the next starts with a non-whitespace one.
    return (piece for piece in pieces if piece[0].strip())


def tokenize_input(job: ShardJob, progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Write the shard of one input and its record (the record last); return the record."""
    tokenizer = Tokenizer(HFTokenizer.from_str(job.tokenizer_json))
    identity = input_identity(job.input)
    dtype = token_dtype(tokenizer.vocab_size)
    writer = ShardWriter(job.prefix, dtype)
    documents = tokens = text_bytes = 0
    try:
        for batch in _batches(_encodable_pieces(job, tokenizer), ENCODE_BATCH_DOCUMENTS, ENCODE_BATCH_CHARS):
            batch_tokens = 0
            for (_, ends), ids in zip(batch, tokenizer.encode_batch([text for text, _ in batch])):
                if ends:
                    ids.append(tokenizer.eos_id)
                writer.extend(ids)
                if ends:
                    writer.end_document()
                batch_tokens += len(ids)
            batch_bytes = sum(len(text.encode()) for text, _ in batch)
            documents += sum(ends for _, ends in batch)
            tokens, text_bytes = tokens + batch_tokens, text_bytes + batch_bytes
            if progress:
                progress(batch_bytes, batch_tokens)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    record = {
        "input": job.input,
        **identity,
        "sha256": content_sha256(job.input),
        "shard": Path(job.prefix).name,
        "tokenizer_sha256": tokenizer.fingerprint,
        "text_field": job.text_field,
        "dtype": dtype.name,
        "documents": documents,
        "tokens": tokens,
        "text_bytes": text_bytes,
    }
    write_meta(Path(job.prefix).parent, record, name=Path(job.prefix).name + ".json")
    return record


def _saved_fingerprint(out_dir: Path) -> Optional[str]:
    try:
        return Tokenizer.load(out_dir).fingerprint
    except UserError:  # none yet, or damaged: it is written anew
        return None


def _reusable(record: Optional[Dict[str, Any]], input_: str, tokenizer: Tokenizer, text_field: str, prefix: Path) -> Optional[Dict[str, Any]]:
    """The shard's record if the shard still stands for this input and tokenizer, else None."""
    if record is None or (record.get("input"), record.get("tokenizer_sha256"), record.get("text_field")) != (input_, tokenizer.fingerprint, text_field):
        return None
    identity = input_identity(input_)
    if identity["size"] != record.get("size"):
        return None
    if identity["mtime_ns"] != record.get("mtime_ns"):
        if content_sha256(input_) != record.get("sha256"):
            return None
        record = {**record, **identity}  # touched, not changed
        write_meta(prefix.parent, record, name=prefix.name + ".json")
    try:
        if IndexedShard(prefix).num_tokens != record.get("tokens"):
            return None
    except UserError:
        return None
    return record


Runner = Callable[[Callable, Sequence[ShardJob]], Iterator[Tuple[int, Dict[str, Any]]]]
"""Runs ``tokenize_input`` over jobs, yielding (job index, record) as each finishes."""


def run_here(progress: Optional[Progress] = None) -> Runner:
    """The runner of one process (the launch path, and ``raylm data prepare --workers 1``)."""

    def run(fn: Callable, jobs: Sequence[ShardJob]) -> Iterator[Tuple[int, Dict[str, Any]]]:
        for index, job in enumerate(jobs):
            yield index, fn(job, progress)

    return run


def prepare(
    inputs: Sequence[str],
    out_dir: Path,
    tokenizer: Tokenizer,
    text_field: str = "text",
    runner: Optional[Runner] = None,
    on_shard_done: Optional[Callable[[Dict[str, Any], bool], None]] = None,
) -> Dict[str, Any]:
    """Bring ``out_dir`` up to date with ``inputs``; return its manifest.

    ``on_shard_done(record, reused)`` is told about every shard, reused or new.
    """
    out_dir = Path(out_dir)
    shards_dir = out_dir / SHARDS_DIR
    shards_dir.mkdir(parents=True, exist_ok=True)
    if _saved_fingerprint(out_dir) != tokenizer.fingerprint:
        invalidate(out_dir, MANIFEST)
        tokenizer.save(out_dir)
    records: List[Optional[Dict[str, Any]]] = []
    for input_ in inputs:
        prefix = shards_dir / shard_name(input_)
        record = _reusable(read_meta(shards_dir, prefix.name + ".json"), input_, tokenizer, text_field, prefix)
        records.append(record)
        if record is not None and on_shard_done:
            on_shard_done(record, True)
    # Largest first: the cluster's last task is then a small one, not a large file tokenizing alone on one core.
    todo = sorted((i for i, record in enumerate(records) if record is None), key=lambda i: -_input_bytes(inputs[i]))
    if todo:
        invalidate(out_dir, MANIFEST)
        tokenizer_json = tokenizer.hf.to_str()
        jobs = [ShardJob(inputs[i], str(shards_dir / shard_name(inputs[i])), tokenizer_json, text_field) for i in todo]
        for job_index, record in (runner or run_here())(tokenize_input, jobs):
            records[todo[job_index]] = record
            if on_shard_done:
                on_shard_done(record, False)
    if sum(r["documents"] for r in records) == 0:
        raise UserError(_only_empty(inputs))
    # Shards of inputs no longer among the sources, and leftovers of interrupted writes.
    keep = {r["shard"] + suffix for r in records for suffix in (".bin", ".idx", ".json")}
    for path in shards_dir.iterdir():
        if path.name not in keep:
            path.unlink(missing_ok=True)  # ranks of a launch may check the same directory at once
    manifest = {
        "format": FORMAT,
        "tokenizer_sha256": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "text_field": text_field,
        "documents": sum(r["documents"] for r in records),
        "tokens": sum(r["tokens"] for r in records),
        "shards": records,
    }
    if read_meta(out_dir, MANIFEST) != manifest:
        write_meta(out_dir, manifest, name=MANIFEST)
    return manifest


def _input_bytes(input_: str) -> int:
    path = Path(input_)
    return path.stat().st_size if path.is_file() else 0


def read_manifest(out_dir: Path) -> Dict[str, Any]:
    manifest = read_meta(out_dir, MANIFEST)
    if manifest is None or manifest.get("format") != FORMAT or not isinstance(manifest.get("shards"), list):
        raise UserError(f"{Path(out_dir) / MANIFEST} is missing or damaged; run 'raylm data prepare ... --out {out_dir}' again")
    return manifest


def shard_prefixes(out_dir: Path, manifest: Dict[str, Any]) -> List[Path]:
    return [Path(out_dir) / SHARDS_DIR / record["shard"] for record in manifest["shards"]]


def tokenizer_sample(inputs: Sequence[str], text_field: str, budget_bytes: int = TOKENIZER_SAMPLE_BYTES) -> Iterator[str]:
    """A bounded, deterministic sample to train a tokenizer on: each input's first documents
    up to an equal share of ``budget_bytes`` (a document that crosses the share is cut there).

    Documents come in their pieces (``raylm.data.corpus.input_pieces``), so a large text file is never read
    whole: training on them equals training on their document, because raylm trains byte-level BPE, whose
    pre-tokens (what the trainer counts) never span a cut between pieces."""
    share = max(1, budget_bytes // max(1, len(inputs)))
    empty = True
    for input_ in inputs:
        left = share
        for text, _ in input_pieces(input_, text_field):
            if left <= 0:
                break
            if text.strip():
                taken = text if len(text) <= left else text[:left]
                left -= len(taken.encode())
                empty = False
                yield taken
    if empty:
        raise UserError(_only_empty(inputs))


def _only_empty(inputs: Sequence[str]) -> str:
    names = " ".join(repr(i) for i in inputs[:3]) + (" ..." if len(inputs) > 3 else "")
    return f"data.source {names} holds only empty documents; point it at text"
