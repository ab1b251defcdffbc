"""Locate the real data sets (MovieLens, OTTO) that live beside the repository, not inside it."""

from __future__ import annotations

import os
from pathlib import Path

_MARKER = "ml-latest-small"


def shared_data_dir() -> Path | None:
    """The ``shared/data`` directory: from $RECSYS_SHARED_DATA, else the nearest one above the repository."""
    configured = os.environ.get("RECSYS_SHARED_DATA")
    if configured:
        path = Path(configured)
        return path if (path / _MARKER).is_dir() else None
    repo_root = Path(__file__).resolve().parent.parent
    for folder in (repo_root, *repo_root.parents):
        candidate = folder / "shared" / "data"
        if (candidate / _MARKER).is_dir():
            return candidate
    return None
