"""meta.json: written last, so its presence means the dataset beside it is complete."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

META_FILE = "meta.json"


def read_meta(out_dir: Path) -> Optional[Dict[str, Any]]:
    """The dataset's meta.json, or None when missing or unreadable (then the dataset is rebuilt)."""
    try:
        meta = json.loads((Path(out_dir) / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def invalidate(out_dir: Path) -> None:
    """Forget the dataset before rewriting its files, so a crash cannot leave a stale meta.json."""
    (Path(out_dir) / META_FILE).unlink(missing_ok=True)


def write_meta(out_dir: Path, meta: Mapping[str, Any]) -> None:
    # A rename is atomic: readers see the old state or the whole new file.
    path = Path(out_dir) / META_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def matches(meta: Optional[Mapping[str, Any]], recipe: Mapping[str, Any]) -> bool:
    """Whether an existing dataset was built from this recipe."""
    return meta is not None and all(meta.get(key) == value for key, value in recipe.items())
