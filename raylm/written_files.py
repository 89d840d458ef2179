"""Files written once and hashed on their way out: a checkpoint's manifest needs every file's size and sha256,
and reading a file back to hash it costs about as much again as writing it.

``WrittenFiles`` is the ledger of one directory tree: every file written through it (``torch.save``, safetensors,
text) passes its bytes to sha256 as they go to the file, and ``sync`` makes them durable before a manifest that
names them is committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


class HashingWriter:
    """A write-only file object that feeds sha256 the bytes it writes (what ``torch.save`` needs of a file)."""

    def __init__(self, handle):
        self._handle = handle
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data)
        self._digest.update(view)
        self._handle.write(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._handle.flush()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


class WrittenFiles:
    """Size and sha256 of every file written through it, by path relative to ``root`` (posix); ``on_written`` gets
    that path as soon as a file is complete."""

    def __init__(self, root: Path, on_written: Callable[[str], None] = lambda rel: None):
        self.root = Path(root)
        self.files: Dict[str, Tuple[int, str]] = {}
        self.on_written = on_written

    @contextmanager
    def open(self, path: Union[str, Path]) -> Iterator[HashingWriter]:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            writer = HashingWriter(handle)
            yield writer
        rel = path.relative_to(self.root).as_posix()
        self.files[rel] = (writer.size, writer.hexdigest())
        self.on_written(rel)

    def write_bytes(self, path: Union[str, Path], data: bytes) -> None:
        with self.open(path) as out:
            out.write(data)

    def write_text(self, path: Union[str, Path], text: str) -> None:
        self.write_bytes(path, text.encode())

    def torch_save(self, obj, path: Union[str, Path]) -> None:
        """``torch.save`` (its zip format) through the hash; torch writes the archive front to back."""
        with self.open(path) as out:
            torch.save(obj, out)

    def save_safetensors(self, tensors: Mapping[str, torch.Tensor], path: Union[str, Path],
                         metadata: Optional[Dict[str, str]] = None) -> None:
        """A safetensors file streamed tensor by tensor (``safetensors.torch.save`` would first build the whole file in memory)."""
        header: Dict[str, object] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it
        with self.open(path) as out:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            for tensor in tensors.values():
                if tensor.numel():
                    out.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())

    def write_with(self, job: Callable[["WrittenFiles", Any], None], state: Any) -> None:
        """Call ``job(ledger, state)``, which writes through the ledger it is given, in this ledger's order of writes
        (here at once; a background ledger calls it later, on its writer thread, with a host snapshot of ``state``,
        which may share storages with the ledger's other snapshots: ``job`` must not change ``state`` in place)."""
        job(self, state)

    def sync(self) -> None:
        """Every written file, and the directories naming them, on disk (before a manifest commits them)."""
        paths = [self.root / rel for rel in self.files]
        for path in [*paths, *sorted({path.parent for path in paths})]:
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)

    # A ledger that writes in the background (``raylm.background_writes``) finishes later; this one is done as
    # soon as each call returns.
    def done(self) -> bool:
        """Whether every write and sync asked for is finished."""
        return True

    def wait(self) -> None:
        """Return once every write and sync asked for is finished."""

    def abandon(self) -> None:
        """Stop writing: nothing is written after this returns."""
