"""meta.json (and a prepared dataset's manifest.json): written last, so its presence means the
files beside it are complete."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

META_FILE = "meta.json"


def read_meta(out_dir: Path, name: str = META_FILE) -> Optional[Dict[str, Any]]:
    """The JSON object ``out_dir/name``, or None when missing or unreadable (then what it describes is rebuilt)."""
    try:
        meta = json.loads((Path(out_dir) / name).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def invalidate(out_dir: Path, name: str = META_FILE) -> None:
    """Forget the dataset before rewriting its files, so a crash cannot leave a stale record."""
    (Path(out_dir) / name).unlink(missing_ok=True)


def write_meta(out_dir: Path, meta: Mapping[str, Any], name: str = META_FILE) -> None:
    # A rename is atomic: readers see the old state or the whole new file.
    path = Path(out_dir) / name
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def matches(meta: Optional[Mapping[str, Any]], recipe: Mapping[str, Any]) -> bool:
    """Whether an existing dataset was built from this recipe."""
    return meta is not None and all(meta.get(key) == value for key, value in recipe.items())
