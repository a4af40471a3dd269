"""Content-addressed on-device embedding cache.

Each vector is stored under sha256(encoder id, weights version, content): a changed title, a changed
file or new weights give a new key, and a second run over the same items computes nothing. Writes go to
a temporary file that is renamed into place, so an interrupted run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from shared.paths import default_cache_dir


def file_digest(path: str | Path) -> str:
    """sha256 of a file, read in blocks (media and weights files may be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_key(encoder_id: str, content: bytes) -> str:
    return hashlib.sha256(encoder_id.encode() + b"\0" + content).hexdigest()


class EmbeddingCache:
    """One `.npy` file per (encoder, content) under `root/embeddings/<key[:2]>/<key>.npy`."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root or default_cache_dir()) / "embeddings"

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        path = self._path(key)
        try:
            return np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            # A damaged entry is recomputed rather than trusted.
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, vector: np.ndarray) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, np.asarray(vector, dtype=np.float32), allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def embed_all(
        self,
        encoder_id: str,
        contents: Sequence[bytes],
        compute: Callable[[list[int]], Sequence[np.ndarray | None]],
        dim: int | None = None,
    ) -> tuple[np.ndarray, int]:
        """Vectors for every content, computing (via `compute(indices)`) only the missing ones.

        `compute` returns one vector per index, or None for an item that failed (a corrupt media file:
        the caller records why); failed items are not cached and get an all-zero row (`dim` wide), which
        the item tower reads as "modality absent". Returns the (n, dim) float32 matrix and how many
        vectors were computed (failures not counted).
        """
        keys = [content_key(encoder_id, c) for c in contents]
        found = [self.get(k) for k in keys]
        missing = [i for i, v in enumerate(found) if v is None]
        computed = 0
        if missing:
            for i, vector in zip(missing, compute(missing)):
                if vector is None:
                    continue
                self.put(keys[i], vector)
                found[i] = np.asarray(vector, dtype=np.float32)
                computed += 1
        width = dim if dim is not None else next((len(v) for v in found if v is not None), 0)
        rows = [v if v is not None else np.zeros(width, np.float32) for v in found]
        return (np.stack(rows).astype(np.float32) if rows else np.zeros((0, width), np.float32)), computed
