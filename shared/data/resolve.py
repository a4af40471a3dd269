"""Turn the `dataset` setting into a dataset directory."""

from __future__ import annotations

from pathlib import Path

from shared.config import ConfigError, RunConfig
from shared.data.movielens import movielens_100k
from shared.paths import default_data_root

BUILTIN = "movielens-100k"


def resolve_dataset(cfg: RunConfig) -> Path:
    """`movielens-100k` is imported (once, into the cache) from the original files; anything else must
    be a directory in avrec's dataset format."""
    if cfg.dataset == BUILTIN:
        root = Path(cfg.data_root) if cfg.data_root else default_data_root()
        return movielens_100k(root, Path(cfg.cache_dir) if cfg.cache_dir else None)
    path = Path(cfg.dataset).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"dataset = {cfg.dataset!r}: not {BUILTIN!r} and not a directory; expected a folder with "
            "interactions.csv and items.csv (see README, 'Dataset format')"
        )
    return path.resolve()
