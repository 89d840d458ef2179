"""A stage's checkpoints on object storage: listed, verified and fetched file by file, no shared disk.

Ray Train uploads each rank's staged files into ``<stage>/step_N`` of the
run's store; a rank resuming downloads only the files it reads (its own
DeepSpeed shards and RNG state, the manifest; the layout-free copy only when
it reshards) into the same place in its machine's run view.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from raylm.files import sha256_of
from raylm.storage import Store, fetch_files
from raylm.trainer.checkpoint import MANIFEST, STEP_DIR, TrainerState, manifest_files, verify_listing

RNG_FILE = re.compile(r"^rng_rank(\d+)\.pt$")


def stored_steps(store: Store, stage: str) -> List[str]:
    """Checkpoint directory names of ``stage`` in the store, newest first."""
    found = [(int(m.group(1)), name) for name in store.subdirs(stage) if (m := STEP_DIR.match(name))]
    return [name for _, name in sorted(found, reverse=True)]


def _manifest_text(store: Store, rel: str) -> Optional[str]:
    try:
        return store.read_bytes(f"{rel}/{MANIFEST}").decode()
    except (OSError, UnicodeDecodeError):
        return None


def stored_state(store: Store, rel: str) -> TrainerState:
    return TrainerState(**json.loads(store.read_bytes(f"{rel}/{MANIFEST}"))["state"])


def verify_stored(store: Store, rel: str) -> Optional[str]:
    """``checkpoint.verify`` of ``rel`` in the store, by sizes (each rank checks the hashes of what it fetches)."""
    sizes = store.files(rel)
    return verify_listing(_manifest_text(store, rel), sizes.get)


def fetch_stored(store: Store, rel: str, local: Path, wanted: Callable[[str], bool]) -> Tuple[int, int]:
    """The files ``wanted`` picks from checkpoint ``rel`` into ``local``, each checked against the manifest's sha256;
    (files, bytes) downloaded."""
    text = _manifest_text(store, rel)
    if text is None:
        raise RuntimeError(f"checkpoint {store.display(rel)} lost its manifest")
    files = manifest_files(text)
    local.mkdir(parents=True, exist_ok=True)
    (local / MANIFEST).write_text(text)
    def picked(name: str) -> bool:
        return name != MANIFEST and wanted(name)

    downloaded = fetch_files(store, rel, local, picked, {name: size for name, (size, _) in files.items()})
    for name, (_, sha256) in files.items():
        # A file this call downloaded was hashed on its way; one already on the machine is read once.
        if picked(name) and (downloaded[name][1] if name in downloaded else sha256_of(local / name)) != sha256:
            raise RuntimeError(f"{store.display(rel)}/{name} fails its sha256 check after download")
    return len(downloaded), sum(size for size, _ in downloaded.values())


def own_rng_file(rank: int) -> Callable[[str], bool]:
    return lambda name: (m := RNG_FILE.match(name)) is not None and int(m.group(1)) == rank


LAYER_FILE = re.compile(r"^layer_(\d+)-")


def read_by_rank(engine, rank: int) -> Callable[[str], bool]:
    """The files of a checkpoint that resuming reads on ``rank`` without resharding: the DeepSpeed
    files ``engine.load_checkpoint`` opens there (its model states, its ZeRO shard, its pipeline stage's
    layers; names from DeepSpeed's own naming) and its RNG state."""
    from raylm.trainer.checkpoint import DEEPSPEED_TAG

    own = {engine._get_ckpt_name("", DEEPSPEED_TAG)}
    if getattr(engine.optimizer, "dp_process_group", None) is not None:
        own.add(engine._get_zero_ckpt_name("", DEEPSPEED_TAG))
    module = engine.module
    layers = range(module._local_start, module._local_stop) if hasattr(module, "_local_start") else range(0)
    rng = own_rng_file(rank)

    def wanted(rel: str) -> bool:
        top, _, name = rel.partition("/")
        if top == DEEPSPEED_TAG:
            layer = LAYER_FILE.match(name)
            return int(layer.group(1)) in layers if layer else rel in own
        return rng(rel)

    return wanted
