"""Read back what an offline W&B run recorded (its ``run-<id>.wandb`` file).

wandb 0.31 no longer ships a Python reader (``wandb.sdk.internal.datastore``
is gone; wandb-core writes the file), so this follows the file's framing,
leveldb's log format: a 7-byte header (``:W&B``, magic 0xBEE1, version), then
32 KiB blocks of records ``crc32 (4) | length (2) | type (1) | data``, where
a record too big for a block is split FIRST / MIDDLE* / LAST and a block's
last < 7 bytes are zero padding. Each whole record is a ``wandb_internal_pb2.Record``.
A file whose writer was killed may end in a torn record; reading stops there.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from wandb.proto import wandb_internal_pb2

HEADER = struct.Struct("<4sHB")
RECORD_HEADER = struct.Struct("<IHB")
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    ident, magic, _version = HEADER.unpack_from(data)
    assert ident == b":W&B" and magic == 0xBEE1, "not a W&B datastore file"
    pos, pending = HEADER.size, b""
    while pos < len(data):
        space = BLOCK - pos % BLOCK
        if space < RECORD_HEADER.size:
            pos += space
            continue
        if pos + RECORD_HEADER.size > len(data):
            return
        checksum, length, kind = RECORD_HEADER.unpack_from(data, pos)
        if kind == 0:  # zeros: the rest of the block is padding
            pos += space
            continue
        chunk = data[pos + RECORD_HEADER.size : pos + RECORD_HEADER.size + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != checksum:
            return  # torn tail of a killed writer
        pos += RECORD_HEADER.size + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def records(path: Path) -> List[wandb_internal_pb2.Record]:
    out = []
    for payload in _payloads(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        out.append(record)
    return out


@dataclass
class WandbFile:
    """One offline run directory's history rows and metric definitions."""

    path: Path
    history: List[Dict[str, object]] = field(default_factory=list)
    metrics: List[wandb_internal_pb2.MetricRecord] = field(default_factory=list)

    def step_metric(self, key: str) -> Optional[str]:
        """The x-axis W&B plots ``key`` against: its own definition, else the last matching glob's."""
        named = [m.step_metric for m in self.metrics if m.name == key]
        if named:
            return named[-1]
        globbed = [m.step_metric for m in self.metrics if m.glob_name and fnmatchcase(key, m.glob_name)]
        return globbed[-1] if globbed else None


def read_run(offline_dir: Path) -> WandbFile:
    """The history and metric definitions of ``wandb/offline-run-*/`` (its one ``run-*.wandb`` file)."""
    (path,) = offline_dir.glob("run-*.wandb")
    run = WandbFile(path)
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({
                (item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item
            })
        elif kind == "metric":
            run.metrics.append(record.metric)
    return run
