"""Where avrec looks for data and keeps its caches, overridable by environment variables."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_root() -> Path | None:
    """Data root: env ``AVREC_DATA_DIR`` if set, else ``<repo>/../shared/data`` if it exists, else None."""
    env = os.environ.get("AVREC_DATA_DIR")
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[1]
    candidate = repo_root.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def default_cache_dir() -> Path:
    """Cache directory: env ``AVREC_CACHE_DIR`` if set, else ``~/.cache/avrec``."""
    env = os.environ.get("AVREC_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "avrec"
