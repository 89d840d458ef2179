"""Complete checkpoints: shards first, a manifest last, verified before loading.

A checkpoint directory holds DeepSpeed's files under ``deepspeed/`` (readable
by the same layout only), the layout-free copy of the training state under
``layout_free/`` (see ``raylm.parallelism.layout_free``), each rank's RNG
states, rank 0's metrics records so far and ``manifest.json``. The manifest
(step, layout, consumed samples, every file's size and sha256) is written
after every rank has finished its files; a directory without a manifest, or
whose files disagree with it, is incomplete and never loaded. DeepSpeed's own
``latest`` file is ignored: it is written without a barrier.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from raylm.files import sha256_of

MANIFEST = "manifest.json"
DEEPSPEED_TAG = "deepspeed"
STEP_DIR = re.compile(r"^step_(\d+)$")
RECORDS_FILE = "records.jsonl"
"""Rank 0's metrics records of the stage up to the checkpoint's step (see ``StageTrainer.replay_records``)."""
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train's own record of a stage's registered checkpoints."""


@dataclass
class TrainerState:
    """What the loop needs, besides DeepSpeed's state, to continue exactly."""

    step: int
    consumed_samples: int
    tokens_seen: int
    world_size: int
    tp: int
    pp: int
    dp: int
    zero_stage: int = 0
    bf16: bool = False
    lora: Optional[Dict[str, Any]] = None
    """The stage's LoRA settings (None: every weight trains); a checkpoint holds adapters of these settings only."""
    consumed_by_source: Dict[str, int] = field(default_factory=dict)
    """A mixture's consumed samples per source (its blend's split of ``consumed_samples``); empty for one source."""

    def layout(self) -> str:
        """What DeepSpeed's own shards depend on; another layout loads the layout-free copy instead."""
        return f"tp={self.tp} pp={self.pp} dp={self.dp} zero_stage={self.zero_stage} {'bf16' if self.bf16 else 'fp32'}"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"



def describe_files(root: Path) -> Dict[str, Tuple[int, str]]:
    """relative path -> (size, sha256) of every file below ``root``."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in (MANIFEST, "latest")):
        out[path.relative_to(root).as_posix()] = (path.stat().st_size, sha256_of(path))
    return out


def write_manifest(root: Path, state: TrainerState, files: Dict[str, Tuple[int, str]]) -> None:
    """Atomically commit the manifest (write to a temp name, fsync, rename)."""
    manifest = {"state": asdict(state), "files": {k: {"size": s, "sha256": h} for k, (s, h) in sorted(files.items())}}
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, root / MANIFEST)


def verify(root: Path, check_hashes: bool = True) -> Optional[str]:
    """None when ``root`` is a complete checkpoint, else why it is not."""
    manifest_path = root / MANIFEST
    try:
        manifest_text = manifest_path.read_text() if manifest_path.is_file() else None
    except (OSError, UnicodeDecodeError) as err:
        return f"unreadable manifest ({err})"
    return verify_listing(
        manifest_text,
        lambda rel: (root / rel).stat().st_size if (root / rel).is_file() else None,
        (lambda rel: sha256_of(root / rel)) if check_hashes else None,
    )


def verify_listing(manifest_text: Optional[str], size_of: Callable[[str], Optional[int]],
                   hash_of: Optional[Callable[[str], str]] = None) -> Optional[str]:
    """``verify`` over any storage: ``size_of`` a relative path (None when missing), ``hash_of`` (None skips hashes)."""
    if manifest_text is None:
        return "no manifest (the save did not finish)"
    try:
        files = manifest_files(manifest_text)
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # anything but the manifest raylm writes
        return f"unreadable manifest ({err})"
    for rel, (size, sha256) in files.items():
        found = size_of(rel)
        if found is None:
            return f"missing shard {rel}"
        if found != size:
            return f"shard {rel} has {found} bytes, manifest says {size}"
        if hash_of is not None and hash_of(rel) != sha256:
            return f"shard {rel} fails its sha256 check"
    return None


def manifest_files(manifest_text: str) -> Dict[str, Tuple[int, str]]:
    """relative path -> (size, sha256) of a manifest's files (its state checked too)."""
    manifest = json.loads(manifest_text)
    TrainerState(**manifest["state"])
    return {rel: (int(entry["size"]), entry["sha256"]) for rel, entry in manifest["files"].items()}


def read_state(root: Path) -> TrainerState:
    return TrainerState(**json.loads((root / MANIFEST).read_text())["state"])


def lacks_pipeline_embedding(root: Path, state: TrainerState) -> bool:
    """Whether pipelined checkpoint ``root`` has no DeepSpeed file of its first layer, the embedding: raylm's
    tied embedding was saved in no layer file before it ran as a module on the first stage (DeepSpeed saves a
    ``TiedLayerSpec`` only where it has no ``forward_fn``), so only the layout-free copy holds its trained value."""
    if state.pp == 1:
        return False
    files = manifest_files((root / MANIFEST).read_text())
    return not any(rel.startswith(f"{DEEPSPEED_TAG}/layer_00-") for rel in files)


def step_dirs(stage_dir: Path) -> List[Path]:
    """Checkpoint directories of a stage, newest first."""
    if not stage_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in stage_dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]

